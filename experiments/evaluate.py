"""Evaluate a trained run on any text: loss, perplexity, bits per byte, and eval CE against the
eval capacity factor (ST-MoE Table 8 for one run).

    python experiments/evaluate.py --workdir=RUN [--data=FILES|TFDS_NAME|builtin] [--split=S] \
        [--capacity_factors=0.5,1,1.25,2,inf] [--num_batches=N] [--step=N] [--mesh=data=-1] \
        [--out=DIR]

Without `--data` it evaluates the run's own eval split with the trainer's `eval_steps` batches,
so its `eval` and `nodrop` rows reproduce the trainer's last eval. With `--data` the text is
tokenized with the run's tokenizer and read once, all of it (text files: every document; TFDS:
`--split`, default the run's eval split). Prints a markdown table; `--out` also writes
`eval.md`, `eval.json` and `capacity_curve.png` (MoE runs). See `moejax.evaluation`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax import cli, evaluation, sharding  # noqa: E402  pylint: disable=wrong-import-position


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's directory (config.json "
                      "and checkpoints)")
  parser.add_argument("--data", default=None, help="text files to evaluate on, comma-separated "
                      "(whole files, nothing held out), 'builtin' or a TFDS name; default: the "
                      "run's own eval split")
  parser.add_argument("--split", default=None, help="split of the run's data (default: its eval "
                      "split)")
  parser.add_argument("--capacity_factors", default="0.5,1,1.25,2,inf",
                      help="eval capacity factors, comma-separated numbers > 0 or inf (no drop)")
  parser.add_argument("--num_batches", type=int, default=None,
                      help="batches of the run's shape (default: one pass over all the data)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--mesh", default=None, help="e.g. data=-1,expert=1 (default: the run's)")
  parser.add_argument("--out", default=None, help="directory for eval.md, eval.json and "
                      "capacity_curve.png (needs matplotlib)")
  args = parser.parse_args(argv)
  if args.out:
    cli.require(("matplotlib",), "studies", "evaluate.py --out (its capacity curve)")
  try:
    factors = [float(x) for x in args.capacity_factors.split(",") if x.strip()]
  except ValueError:
    factors = []
  if not factors or any(math.isnan(f) or f <= 0 for f in factors):
    raise ValueError(f"--capacity_factors={args.capacity_factors!r}: allowed a comma-separated "
                     "list of numbers > 0 or inf, e.g. 0.5,1,1.25,2,inf")
  if args.num_batches is not None and args.num_batches < 1:
    raise ValueError(f"--num_batches={args.num_batches}: allowed an integer >= 1")
  result = evaluation.evaluate_run(
      args.workdir, step=args.step, data=args.data, split=args.split,
      num_batches=args.num_batches, capacity_factors=factors,
      mesh_shape=sharding.parse_mesh(args.mesh) if args.mesh else None, progress=True)
  table = evaluation.format_table(result)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
      f.write(table)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    if "nodrop" in result["results"]:
      evaluation.plot_capacity_curve(result, os.path.join(args.out, "capacity_curve.png"))
  return result


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
