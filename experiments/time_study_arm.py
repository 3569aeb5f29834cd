"""Time a few hundred steps of study arms before planning a study (seeds x arms x steps).

    python experiments/time_study_arm.py --study=moe_vs_dense_size --steps=300 \
        --arms="switch E=8 d=192,dense d=192" \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt

Trains each arm's seed-0 config for `--steps` steps in a scratch directory (no intermediate
evals or checkpoints; the last step evaluates every variant and saves, as a run's last step
does) and prints the wall time, compilation and that final eval included, and its linear
projection to the study's step count (an upper bound: compilation and the final eval happen
once per run). Run it on an idle machine: a study training alongside halves the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from moejax import cli  # noqa: E402  pylint: disable=wrong-import-position
from moejax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from moejax import study as study_lib  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", required=True, help="a study name (experiments/studies/<name>.py)")
  parser.add_argument("--arms", required=True, help="comma-separated arm names")
  parser.add_argument("--steps", type=int, default=300, help="steps to time per arm")
  parser.add_argument("--data", default="builtin",
                      help="'builtin', a TFDS name, or comma-separated text files")
  parser.add_argument("--scale", default="cpu", help="the study's named scale")
  args = parser.parse_args()
  from moejax import train  # pylint: disable=import-outside-toplevel
  from reproduce import load_study  # pylint: disable=import-outside-toplevel
  study = load_study(args.study)
  arms = {a.name: a for a in study.arms}
  for name in args.arms.split(","):
    if name not in arms:
      cli.user_error(f"--arms: {name!r} is not an arm of {study.name}; arms: {sorted(arms)}")
    config = study_lib.arm_config(study, arms[name], 0, args.scale,
                                  config_lib.data_overrides(args.data))
    full = config.num_train_steps
    config.num_train_steps = args.steps
    config.eval_every = config.checkpoint_every = args.steps + 1
    workdir = tempfile.mkdtemp(prefix="moejax_time_")
    start = time.time()
    try:
      train.train_and_evaluate(config, workdir)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    wall = time.time() - start
    print(f"{name}: {args.steps} steps in {wall:.0f} s (compilation included); "
          f"{full} steps at most ~{wall * full / args.steps / 60:.0f} min (compilation and the "
          f"final eval counted {full // args.steps} times; intermediate evals not counted)",
          flush=True)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
