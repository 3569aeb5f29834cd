"""Benchmark: forward+backward time of the MoE layer vs a dense FFN of the same active size.

    python experiments/bench_moe.py                 # the issue's setting (T=8192, D=256, F=1024)
    python experiments/bench_moe.py --tokens 2048 --experts 8,32 --repeats 3   # quicker
    python experiments/bench_moe.py --options --experts 32 --top_k 2 --dispatch sort  # options
    python experiments/bench_moe.py --dispatch sort,dropless,dropless:ragged_dot  # grouped impls

For each E in --experts, k in --top_k and dispatch in --dispatch (capacity buffers: sort, onehot;
no capacity: dropless, whose experts do exactly the dense FLOPs) it times one jitted
`value_and_grad` step (loss = sum(y^2) + aux loss; gradients w.r.t. all params and the input) and
prints the median over --repeats runs after a warm-up, next to a dense FFN whose hidden width is
k*F (the same active parameters and FLOPs per token, without the capacity slack). Ratios:
`vs dense` = MoE / dense-active; `vs E=min` = this E / the smallest E with the same k and
dispatch. Two floors to read the ratios against: with capacity factor CF the experts do CF x the
dense FLOPs (empty slots are computed too), and every step reads all E experts' weights twice and
writes their gradients once (`param MB` = the expert weights), which makes large E memory-bound
on a CPU whatever the dispatch costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import cli
from moejax.moe import MoEConfig, MoELayer


def dense_ffn_step(d_model: int, d_ff: int, tokens: int, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"wi": jax.random.normal(k1, (d_model, d_ff)) * d_model**-0.5,
            "wo": jax.random.normal(k2, (d_ff, d_model)) * d_ff**-0.5}
  x = jax.random.normal(k3, (tokens, d_model), dtype)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      h = jax.nn.relu(x @ params["wi"].astype(x.dtype))
      return jnp.sum(jnp.square((h @ params["wo"].astype(x.dtype)).astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  return lambda: step(params, x)


# `--options`: routing variants timed against the plain layer at one (E, k, dispatch).
OPTIONS = {
    "plain": {},
    "sigmoid+scale": {"score": "sigmoid", "routed_scaling_factor": 2.5},
    "expert choice": {"choice": "expert", "gate": "softmax"},
    "4 groups, 2/token": {"num_expert_groups": 4, "topk_groups": 2},
    "selection bias": {"bias_update_rate": 1e-3},
    "1 shared expert": {"num_shared_experts": 1},
    "balance any": {"balance_loss_choices": "any"},
    "global-batch balance": {"balance_loss_scope": "batch"},
}


def moe_step(d_model: int, d_ff: int, tokens: int, groups: int, experts: int, top_k: int,
             capacity_factor: float, dispatch: str, dtype=jnp.float32, **options):
  """`dispatch`: sort | onehot | dropless, or dropless:<grouped_matmul> (e.g.
  dropless:ragged_dot) to pick the grouped-matmul implementation."""
  dispatch, _, impl = dispatch.partition(":")
  if dispatch == "dropless":  # no capacity
    sizes = {"grouped_matmul": impl or "auto"}
  else:  # A training step: eval capacity plays no part, so it is set to the train CF (which
    # expert choice requires: its capacity is part of the model).
    sizes = {"capacity_factor": capacity_factor, "eval_capacity_factor": capacity_factor}
  cfg = MoEConfig(num_experts=experts, top_k=top_k, d_ff=d_ff, num_groups=groups,
                  dispatch=dispatch, **sizes,
                  **{"gate": "softmax" if top_k == 1 else "gshard", **options})
  layer = MoELayer(cfg, d_model, dtype=dtype, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (groups, tokens // groups, d_model), dtype)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(jnp.square(y.astype(jnp.float32))) + aux.loss
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  return lambda: step(params, x)


def interleaved_times(steps: dict, repeats: int) -> dict[str, list[float]]:
  """Times every step once per round, `repeats` rounds: a change of machine load (other jobs on
  a shared host) lands on every variant alike instead of on whichever ran during it."""
  for fn in steps.values():
    jax.block_until_ready(fn())  # compile + warm-up
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, fn in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def time_it(fn, repeats: int) -> float:
  """Median seconds of one call of `fn` after a compile + warm-up call."""
  return statistics.median(interleaved_times({"fn": fn}, repeats)["fn"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192, help="tokens T per step")
  parser.add_argument("--d_model", type=int, default=256, help="model width D")
  parser.add_argument("--d_ff", type=int, default=1024, help="expert width F (dense FFN: F * k)")
  parser.add_argument("--groups", type=int, default=8, help="routing groups G")
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="capacity factor")
  parser.add_argument("--experts", default="8,32,128", help="comma-separated numbers of experts E")
  parser.add_argument("--top_k", default="1,2", help="comma-separated k")
  parser.add_argument("--dispatch", default="sort,dropless",
                      help="comma-separated: sort, onehot, dropless (grouped matmuls: 'auto' = "
                           "blocked on CPU, ragged_dot on GPU/TPU), dropless:ragged_dot, "
                           "dropless:blocked, dropless:megablox")
  parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
  parser.add_argument("--dtype", default="float32", help="activations: float32 | bfloat16")
  parser.add_argument("--peer_python", default="",
                      help="a Python with torch + transformers (a separate venv): also time the "
                           "Hugging Face Switch / Mixtral blocks at the same sizes "
                           "(experiments/bench_hf_moe.py) and print them in the same table")
  parser.add_argument("--options", action="store_true",
                      help="time each routing option of OPTIONS at the first E, k and dispatch "
                           "(interleaved rounds, median)")
  args = parser.parse_args()
  if args.options:
    e, k = int(args.experts.split(",")[0]), int(args.top_k.split(",")[0])
    dispatch = args.dispatch.split(",")[0]
    print(f"# fwd+bwd, T={args.tokens} D={args.d_model} F={args.d_ff} G={args.groups} "
          f"CF={args.capacity_factor} E={e} k={k} {dispatch}, median of {args.repeats}, "
          f"{jax.devices()[0].platform}")
    steps = {name: moe_step(args.d_model, args.d_ff, args.tokens, args.groups, e, k,
                            args.capacity_factor, dispatch, **options)
             for name, options in OPTIONS.items()}
    times = interleaved_times(steps, args.repeats)
    base = statistics.median(times["plain"])
    for name, ts in times.items():
      t = statistics.median(ts)
      print(f"{name:>20} {1e3 * t:>9.1f} ms {t / base:>6.2f}x", flush=True)
    return
  experts = [int(e) for e in args.experts.split(",")]
  dtype = jnp.dtype(args.dtype)
  print(f"# fwd+bwd, T={args.tokens} D={args.d_model} F={args.d_ff} G={args.groups} "
        f"CF={args.capacity_factor} {args.dtype}, median of {args.repeats}, "
        f"{jax.devices()[0].device_kind}")
  print(f"{'k':>2} {'dispatch':>19} {'E':>4} {'param MB':>9} {'ms':>9} {'dense ms':>9} "
        f"{'vs dense':>9} {'vs E=min':>9}")
  for k in [int(k) for k in args.top_k.split(",")]:
    dense = time_it(dense_ffn_step(args.d_model, k * args.d_ff, args.tokens, dtype),
                    args.repeats)
    for dispatch in args.dispatch.split(","):
      base = None
      for e in experts:
        t = time_it(moe_step(args.d_model, args.d_ff, args.tokens, args.groups, e, k,
                             args.capacity_factor, dispatch, dtype), args.repeats)
        base = base or t
        param_mb = e * 2 * args.d_model * args.d_ff * 4 / 2**20
        print(f"{k:>2} {dispatch:>19} {e:>4} {param_mb:>9.0f} {1e3 * t:>9.1f} {1e3 * dense:>9.1f} "
              f"{t / dense:>9.2f} {t / base:>9.2f}", flush=True)
  if args.peer_python:
    peers(args, experts)


def peers(args, experts):
  """The Hugging Face blocks at the same sizes, in a subprocess of `--peer_python` (torch and
  transformers stay out of this process); printed as rows of the same table (no dense column:
  compare ms with our rows of the same k and E)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_hf_moe.py")
  root = os.path.dirname(os.path.dirname(script))  # moejax's light `cli`, without installing it
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
  proc = subprocess.run(
      [args.peer_python, script, "--tokens", str(args.tokens), "--groups", str(args.groups),
       "--d_model", str(args.d_model), "--d_ff", str(args.d_ff), "--capacity_factor",
       str(args.capacity_factor), "--repeats", str(args.repeats),
       "--experts", ",".join(map(str, experts))], capture_output=True, text=True, check=False,
      env=env)
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not rows:
    print(f"# peer benchmark failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return
  print(f"# Hugging Face blocks: torch {rows[0]['torch']}, transformers {rows[0]['transformers']}"
        " (hf-switch: top-1, capacity C per sequence; hf-mixtral: top-2, dropless)")
  for r in rows:
    ms = f"{r['ms']:>9.1f}" if isinstance(r["ms"], float) else f"{r['ms']:>9}"
    print(f"{r['k']:>2} {r['block']:>19} {r['E']:>4} {'':>9} {ms}", flush=True)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
