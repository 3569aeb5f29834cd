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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax import causal, train  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--positions", type=int, default=256)
  parser.add_argument("--capacity_factor", type=float, default=None)
  args = parser.parse_args()
  r = causal.measure_run(args.workdir, args.positions, args.capacity_factor)
  moe = train.load_run_config(args.workdir).model.moe
  print(f"# {args.workdir} step {r['step']}: top-{moe.top_k} priority={moe.priority} "
        f"overflow={moe.overflow} CF {r['capacity_factor']:g}, {r['positions']} positions")
  print(f"teacher-forced CE {r['teacher_forced_ce']:.5f}  causal CE {r['causal_ce']:.5f}  "
        f"leak {r['leak']:+.5f} nats" + ("" if math.isfinite(r["leak"]) else " (non-finite)"))


if __name__ == "__main__":
  main()
