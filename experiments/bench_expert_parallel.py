"""Benchmark: MoE layer train-step time and all-to-all bytes for ep in {1, 2, 4, 8}.

    python experiments/bench_expert_parallel.py            # 8 fake CPU devices

Mesh (data = 8/ep, expert = ep). One step = forward + backward (grads of params and input) of one
MoE layer on the global batch. Fake CPU devices share this machine's cores, so the step time says
little about a pod; the bytes per device (read from the compiled HLO by `moejax.audit`) are the
stable figure. Per device the all-to-all volume does not depend on ep (each device sends its
whole `[E, g*C, D]` buffer, of which 1/ep stays local; 2 all-to-alls forward, 2 backward), while
the all-reduce of expert-weight gradients over `data` shrinks as experts stop being replicated
(at ep = devices only the router's gradient is all-reduced).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from moejax import cli  # light: imports no JAX


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8,
                      help="fake CPU devices (XLA flag) to spread the experts over")
  parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
  parser.add_argument("--seq_len", type=int, default=512,
                      help="tokens per sequence (one routing group each)")
  parser.add_argument("--d_model", type=int, default=256, help="model width D")
  parser.add_argument("--d_ff", type=int, default=1024, help="expert width F")
  parser.add_argument("--experts", type=int, default=32, help="number of experts E")
  parser.add_argument("--top_k", type=int, default=2, help="experts per token")
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="train capacity factor")
  parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from moejax import audit, sharding  # pylint: disable=import-outside-toplevel
  from moejax.moe import MoEConfig, MoELayer  # pylint: disable=import-outside-toplevel

  cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff,
                  capacity_factor=args.capacity_factor, gate="gshard")
  batch = args.tokens // args.seq_len
  print(f"# MoE layer fwd+bwd: T={args.tokens} (B={batch} x L={args.seq_len}) D={args.d_model} "
        f"F={args.d_ff} E={args.experts} k={args.top_k} CF={args.capacity_factor}, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, median of {args.repeats}")
  print(f"{'ep':>3} {'data':>4} {'ms/step':>9} {'a2a count':>9} {'a2a B/dev':>12} "
        f"{'all-reduce B/dev':>16}")
  ep = 1
  while ep <= jax.device_count():
    mesh = sharding.make_mesh({"data": -1, "expert": ep})
    with jax.set_mesh(mesh):
      layer = MoELayer(cfg, args.d_model, rngs=nnx.Rngs(0))
      x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, args.seq_len, args.d_model)),
                         sharding.batch_sharding(mesh, 3))
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

      def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y**2) + aux.loss

      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      summary = audit.summarize(audit.collectives(step.lower(params, x).compile()))
      jax.block_until_ready(step(params, x))
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    a2a = summary.get("all-to-all", {"count": 0, "bytes": 0})
    ar = summary.get("all-reduce", {"count": 0, "bytes": 0})
    print(f"{ep:>3} {mesh.shape['data']:>4} {1e3 * statistics.median(times):>9.1f} "
          f"{a2a['count']:>9} {a2a['bytes']:>12,} {ar['bytes']:>16,}", flush=True)
    ep *= 2


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
