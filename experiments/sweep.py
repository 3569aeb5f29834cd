"""Run a config's `sweep()` over seeds and print the comparison table.

    python experiments/sweep.py --config=configs/switch.py --workdir=/tmp/sweeps/switch --seeds=0,1,2
    python experiments/sweep.py --config=configs/switch.py:runlocal --workdir=/tmp/s --seeds=0

Each entry of the config file's `sweep()` (a dict of dotted overrides, e.g.
`{"model.moe.capacity_factor": 1.0}`) is trained once per seed with `moejax.train` in
`WORKDIR/<overrides>/seed<k>` (a finished run is resumed: it only re-evaluates). For studies with
claims, tables, plots and verdicts, see `experiments/reproduce.py`. The table shows, per
entry, the final eval cross-entropy at the eval capacity factor and with no drop, the fraction of
choices dropped at the eval capacity factor, as mean ± sample std over seeds (seed noise at tiny
scale is a few 1e-3 nats, so effects below ~0.005 need several seeds). `results.json` in
WORKDIR holds every run's final eval metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

from absl import logging as absl_logging

from moejax import cli  # light: imports no JAX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(path: str):
  """Imports a config file (as `config_flags` does) with the repository root on sys.path."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_name(overrides: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"


def run_sweep(config_spec: str, workdir: str, seeds: list[int], train_fn=None) -> list[dict]:
  """Trains every (sweep entry, seed); returns one record per run with its final eval metrics.

  `train_fn(config, run_dir)` defaults to `moejax.train.train_and_evaluate` (which resumes, so a
  finished run only re-evaluates).
  """
  if train_fn is None:
    from moejax import train  # pylint: disable=import-outside-toplevel
    train_fn = train.train_and_evaluate
  from moejax.study import runner  # pylint: disable=import-outside-toplevel
  path, _, arg = config_spec.partition(":")
  module = load_config_module(path)
  entries = module.sweep() if hasattr(module, "sweep") else [{}]
  records = []
  runs = [(overrides, seed) for overrides in entries for seed in seeds]
  for i, (overrides, seed) in enumerate(runs):
    config = module.get_config(arg or None)
    config.update_from_flattened_dict({**overrides, "seed": seed})
    run_dir = os.path.join(workdir, run_name(overrides), f"seed{seed}")
    print(f"[sweep] run {i + 1}/{len(runs)}: {run_name(overrides)} seed {seed} -> {run_dir}",
          flush=True)
    train_fn(config, run_dir)
    runner.release_compiled_programs()  # A sweep of shapes would pile up their executables.
    records.append({"overrides": overrides, "seed": seed, **last_eval(run_dir)})
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(records, f, indent=2)
  return records


def last_eval(run_dir: str) -> dict:
  """The final eval record of a run (from its metrics.jsonl, so finished runs need no rerun).

  Adds `eval_drop`: the fraction of choices dropped at the eval capacity factor, averaged over
  choices and MoE layers.
  """
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  if not evals:
    raise RuntimeError(f"{run_dir}: no eval record in metrics.jsonl")
  record = evals[-1]
  drops = [statistics.mean(v) for k, v in record.items()
           if k.startswith("moe/layer") and k.endswith("/dropped_fraction")]
  if drops:
    record["eval_drop"] = statistics.mean(drops)
  return record


def format_table(records: list[dict]) -> str:
  """Markdown table: one row per sweep entry, mean ± std over seeds."""
  columns = [("ce", "eval CE"), ("nodrop/ce", "no-drop CE"), ("eval_drop", "eval drop")]
  rows = {}
  for r in records:
    rows.setdefault(run_name(r["overrides"]), []).append(r)
  lines = ["| run | seeds | " + " | ".join(title for _, title in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for name, runs in rows.items():
    cells = []
    for key, _ in columns:
      values = [r[key] for r in runs if key in r]
      if not values:
        cells.append("-")
      elif len(values) == 1:
        cells.append(f"{values[0]:.4f}")
      else:
        cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg]")
  parser.add_argument("--workdir", required=True,
                      help="one subdirectory per (sweep point, seed) goes here")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds")
  args = parser.parse_args()
  # The trainer's per-step progress lines (loss, tok/s, ETA) go through absl logging.
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  os.makedirs(args.workdir, exist_ok=True)
  records = run_sweep(args.config, args.workdir, [int(s) for s in args.seeds.split(",")])
  print(format_table(records))


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
