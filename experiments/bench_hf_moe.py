"""Peer benchmark: the Hugging Face Switch and Mixtral MoE blocks (PyTorch, CPU), fwd+bwd.

Run by `experiments/bench_moe.py --peer_python=PYTHON` with a Python that has torch and
transformers (a separate virtual environment: neither is a moejax dependency), or alone:

    /tmp/peer/bin/python experiments/bench_hf_moe.py --tokens 8192 --groups 8 --experts 8,32

For each E: `SwitchTransformersSparseMLP` (top-1, expert capacity per sequence C = ceil(CF * S /
E), the same capacity moejax's `switch` convention gives one group per sequence) and
`MixtralSparseMoeBlock` (top-2, dropless), both with random weights, one forward + backward of
loss = sum(y^2) w.r.t. every parameter and the input, median of --repeats after a warm-up, in
float32 with torch using --threads threads, for each of transformers' experts implementations in
--impls (`eager`: a loop over the experts that hold tokens; `grouped_mm`, `batched_mm`). Prints
one JSON line per block, implementation and E.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from moejax import cli  # light: imports no JAX


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192, help="tokens T in the batch")
  parser.add_argument("--groups", type=int, default=8, help="sequences (T / groups tokens each)")
  parser.add_argument("--d_model", type=int, default=256, help="model width D")
  parser.add_argument("--d_ff", type=int, default=1024, help="expert width F")
  parser.add_argument("--experts", default="8,32,128", help="comma-separated E")
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="Switch only")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--impls", default="eager,grouped_mm,batched_mm",
                      help="transformers' experts implementations to time (config."
                           "_experts_implementation)")
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.models.mixtral import modeling_mixtral  # pylint: disable=import-outside-toplevel
  from transformers.models.switch_transformers import (  # pylint: disable=import-outside-toplevel
      modeling_switch_transformers as switch)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  B, L, D, F = args.groups, args.tokens // args.groups, args.d_model, args.d_ff

  def time_block(block):
    block.train()
    x = torch.randn(B, L, D, requires_grad=True)

    def step():
      block.zero_grad(set_to_none=True)
      x.grad = None
      y = block(x)
      y = y[0] if isinstance(y, tuple) else y
      (y ** 2).sum().backward()
    step()
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  for E in (int(e) for e in args.experts.split(",")):
    blocks = (  # (name, k, config, block class)
        ("hf-switch", 1, switch.SwitchTransformersConfig(
            d_model=D, d_ff=F, num_experts=E, router_jitter_noise=0.0, dropout_rate=0.0,
            expert_capacity=math.ceil(args.capacity_factor * L / E)),
         switch.SwitchTransformersSparseMLP),
        ("hf-mixtral", 2, modeling_mixtral.MixtralConfig(
            hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2,
            router_jitter_noise=0.0), modeling_mixtral.MixtralSparseMoeBlock))
    for impl in args.impls.split(","):
      for name, k, cfg, block in blocks:
        cfg._experts_implementation = impl  # pylint: disable=protected-access
        try:
          ms = 1e3 * time_block(block(cfg))
        except Exception as e:  # pylint: disable=broad-except
          ms = f"failed: {type(e).__name__}"
        print(json.dumps({"block": f"{name}:{impl}", "k": k, "E": E, "ms": ms, **versions}),
              flush=True)

if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
