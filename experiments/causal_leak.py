"""How much does a trained MoE decoder's routing leak the future? Teacher-forced vs causal eval.

    python experiments/causal_leak.py --workdir=RUN [--workdir=RUN2 ...] [--positions=256] \
        [--capacity_factor=1.25 | --capacity_factor=train]

Restores each run's latest checkpoint (with the config it wrote, `RUN/config.json`), takes one eval
batch of its own data, and evaluates `--positions` positions (evenly spaced over the sequence)
twice: teacher-forced (the whole row routed at once, as training and the trainer's eval do) and
causally (every token after t masked out of routing, as generation sees it). Prints both CEs and the
gap, the leak in nats (`moejax.causal`). The capacity factor is the run's eval one unless
`--capacity_factor` is given: a number, or `train` for each run's own train CF (where drops, and so
leaks, are larger). With several runs it also prints a markdown table of the leak per group of runs,
mean ± std over the runs of a group; a group is a run directory's parent (a study's arm:
`experiments/results/STUDY/runs/ARM/seedN`), e.g.

    python experiments/causal_leak.py --capacity_factor=train --positions=128 \
        --workdir="experiments/results/routing_policies/runs/*/seed*"
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax import cli  # noqa: E402  pylint: disable=wrong-import-position
from moejax import causal, train  # noqa: E402  pylint: disable=wrong-import-position
from moejax.study import runner  # noqa: E402  pylint: disable=wrong-import-position


def _capacity_factor(value: str | None, workdir: str) -> float | None:
  if value is None:
    return None
  if value == "train":
    return float(train.load_run_config(workdir).model.moe.capacity_factor)
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"--capacity_factor={value!r}; allowed: a number, or 'train'.") from None


def _mean_std(values: list[float]) -> str:
  mean = f"{statistics.mean(values):+.5f}"
  return f"{mean} ± {statistics.stdev(values):.5f}" if len(values) > 1 else mean


def _routing(moe) -> str:
  if moe.get("choice", "token") == "expert":
    return f"expert choice ({moe.top_k} experts per token on average)"
  return f"top-{moe.top_k} priority={moe.priority} overflow={moe.overflow}"


def main(argv: list[str] | None = None) -> dict[str, dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="a run directory or a glob of them (repeatable)")
  parser.add_argument("--positions", type=int, default=256,
                      help="positions per sequence at which causal and teacher-forced CE are "
                      "compared")
  parser.add_argument("--capacity_factor", default=None, help="a number, or 'train'")
  args = parser.parse_args(argv)
  workdirs = []
  for pattern in args.workdir:
    found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not found:
      raise FileNotFoundError(f"--workdir={pattern!r} matches no directory.")
    workdirs += found
  workdirs = list(dict.fromkeys(workdirs))  # A run named twice is measured once.
  cfs = {w: _capacity_factor(args.capacity_factor, w) for w in workdirs}  # Fails before loading.
  results = {}
  for workdir in workdirs:
    r = causal.measure_run(workdir, args.positions, cfs[workdir])
    moe = train.load_run_config(workdir).model.moe
    print(f"# {workdir} step {r['step']}: {_routing(moe)} CF {r['capacity_factor']:g}, "
          f"{r['positions']} positions")
    print(f"teacher-forced CE {r['teacher_forced_ce']:.5f}  causal CE {r['causal_ce']:.5f}  "
          f"leak {r['leak']:+.5f} nats" + ("" if math.isfinite(r["leak"]) else " (non-finite)"),
          flush=True)
    results[workdir] = r
    runner.release_compiled_programs()  # Runs of other shapes would pile up their executables.
  if len(workdirs) > 1:
    groups = collections.defaultdict(list)
    for workdir, r in results.items():
      groups[os.path.basename(os.path.dirname(os.path.abspath(workdir)))].append(r)
    print("\n| runs | n | CF | teacher-forced CE | causal CE | leak (nats, mean ± std over "
          "runs) |")
    print("|---|---|---|---|---|---|")
    for group, rs in groups.items():
      cf = ", ".join(sorted({f"{r['capacity_factor']:g}" for r in rs}))
      print(f"| {group} | {len(rs)} | {cf} | "
            f"{statistics.mean(r['teacher_forced_ce'] for r in rs):.4f} | "
            f"{statistics.mean(r['causal_ce'] for r in rs):.4f} | "
            f"{_mean_std([r['leak'] for r in rs])} |")
  return results


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
