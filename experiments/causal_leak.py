"""How much does a trained MoE decoder's routing leak the future? Teacher-forced vs causal eval.

    python experiments/causal_leak.py --workdir=RUN [--positions=256] [--capacity_factor=1.25]

Restores the run's latest checkpoint (with the config it wrote, `RUN/config.json`), takes one eval
batch of its own data, and evaluates `--positions` positions (evenly spaced over the sequence) twice:
teacher-forced (the whole row routed at once, as training and the trainer's eval do) and causally
(every token after t masked out of routing, as generation sees it). Prints both CEs and the gap,
the leak in nats (`moejax.causal`). The capacity factor is the run's eval one unless
`--capacity_factor` is given (e.g. its train CF, where drops and so leaks are larger).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax import causal, data as data_lib, train  # noqa: E402  pylint: disable=wrong-import-position


def measure(workdir: str, positions: int, capacity_factor: float | None) -> dict[str, float]:
  config = train.load_run_config(workdir)
  model, mesh, step = train.load_model(config, workdir)
  if capacity_factor is not None:
    model.set_capacity_factor_override(capacity_factor)
  it = data_lib.make_pipeline(config.data, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, split=config.data.eval_split,
                              seed=0)
  batch = {k: np.asarray(v) for k, v in next(it).items() if k in train.BATCH_KEYS}
  positions_T = np.unique(np.linspace(0, config.seq_len - 1, min(positions, config.seq_len))
                          .round().astype(np.int32))
  with jax.set_mesh(mesh):
    result = causal.causal_vs_teacher_forced(
        model, data_lib.make_global_batch(batch, mesh, config.batch_size), positions_T)
  moe = config.model.moe
  out = causal.leak_nats(result)
  out.update(step=step, positions=len(positions_T), top_k=moe.top_k, priority=moe.priority,
             overflow=moe.overflow,
             capacity_factor=capacity_factor or moe.eval_capacity_factor)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--positions", type=int, default=256)
  parser.add_argument("--capacity_factor", type=float, default=None)
  args = parser.parse_args()
  r = measure(args.workdir, args.positions, args.capacity_factor)
  print(f"# {args.workdir} step {r['step']}: top-{r['top_k']} priority={r['priority']} "
        f"overflow={r['overflow']} CF {r['capacity_factor']:g}, {r['positions']} positions")
  print(f"teacher-forced CE {r['teacher_forced_ce']:.5f}  causal CE {r['causal_ce']:.5f}  "
        f"leak {r['leak']:+.5f} nats" + ("" if math.isfinite(r["leak"]) else " (non-finite)"))


if __name__ == "__main__":
  main()
