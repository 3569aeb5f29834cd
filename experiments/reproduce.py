"""Run a reproduction study end to end: train its arms x seeds, write results, table, plots, verdict.

    python experiments/reproduce.py --study=moe_vs_dense --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
    python experiments/reproduce.py --study=moe_vs_dense --scale=tpu --dry_run   # sizes only
    python experiments/reproduce.py --study=moe_vs_dense --workdir=... --report_only

Studies live in `experiments/studies/<name>.py` (`STUDY`); `--study` also takes a path to such a
file. Rerunning the command resumes: finished runs (in `results.jsonl`) are skipped, an interrupted
run continues from its checkpoint; SIGTERM saves the running run and exits 0. `--data` is
`builtin`, a TFDS name, or comma-separated text files. See `moejax/study/` for the outputs and
the verdict rule (`moejax/study/stats.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from absl import logging as absl_logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from moejax import checkpoint  # noqa: E402  pylint: disable=wrong-import-position
from moejax import cli  # noqa: E402  pylint: disable=wrong-import-position
from moejax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from moejax import study as study_lib  # noqa: E402  pylint: disable=wrong-import-position


def load_study(name: str) -> study_lib.Study:
  path = name if name.endswith(".py") else os.path.join(HERE, "studies", f"{name}.py")
  if not os.path.exists(path):
    known = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, "studies"))
                   if f.endswith(".py") and not f.startswith("_") and f != "scales.py")
    cli.user_error(f"--study={name!r}: no such study; known studies are {known}")
  spec = importlib.util.spec_from_file_location(f"study_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.STUDY


def validate(study: study_lib.Study, scale: str, data: str, tokenizer: str, *,
             verbose: bool = False) -> None:
  """Builds and validates every arm's config at `scale` (nothing trained); `verbose` prints
  each arm's size (`--dry_run`)."""
  from moejax import model, train  # pylint: disable=import-outside-toplevel
  from studies import scales  # pylint: disable=import-outside-toplevel
  # --dry_run sizes a cpu study for one device (its committed setting); before a real run, the
  # devices present.
  devices = scales.TPU_DEVICES if scale == "tpu" else (1 if verbose else None)
  overrides = config_lib.data_overrides(data, tokenizer) if scale != "tpu" else {}
  if verbose:
    print(f"{study.name} at scale {scale} ({devices} devices):")
  for arm in study.arms:
    config = study_lib.arm_config(study, arm, 0, scale, overrides)
    model_cfg = train.validate_config(config, num_devices=devices)
    if verbose:
      counts = model.count_params(model_cfg, config.seq_len)
      tokens = config.num_train_steps * config.batch_size * config.seq_len
      print(f"  {arm.name:30s} {counts.summary()}; {tokens / 1e6:,.1f}M train tokens")


def _report(study: study_lib.Study, workdir: str) -> None:
  """After each finished run: the study's table and plots, and, for the repository's own results
  directory, docs/results.md, so that committed results always come with their pages."""
  study_lib.report(study, workdir)
  if os.path.abspath(workdir) == os.path.join(os.path.dirname(HERE), "experiments", "results"):
    import results_page  # pylint: disable=import-outside-toplevel
    results_page.write_page(workdir, os.path.join(os.path.dirname(HERE), "docs", "results.md"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", required=True,
                      help="a study name (experiments/studies/<name>.py) or a path to a study file")
  parser.add_argument("--workdir", default="experiments/results",
                      help="where <study>/results.jsonl, table.md and plots go")
  parser.add_argument("--data", default="builtin",
                      help="'builtin', a TFDS name, or comma-separated text files")
  parser.add_argument("--tokenizer", default="byte", choices=("byte", "sentencepiece"),
                      help="the runs' tokenizer")
  parser.add_argument("--scale", default="cpu",
                      help="the study's named scale: 'cpu' (runs here) or 'tpu' (validate with "
                      "--dry_run)")
  parser.add_argument("--seeds", default=None, help="comma-separated (default: the study's)")
  parser.add_argument("--dry_run", action="store_true", help="validate and size, train nothing")
  parser.add_argument("--report_only", action="store_true", help="table and plots from results")
  args = parser.parse_args()

  study = load_study(args.study)
  if not args.dry_run:
    cli.require(("matplotlib", "scipy"), "studies", "reproduce.py (verdicts and plots)")
  # The trainer's per-step progress lines (loss, tok/s, ETA) go through absl logging.
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  if args.dry_run:
    cli.run(validate, study, args.scale, args.data, args.tokenizer, verbose=True)
    return
  if not (args.report_only or study.reuse):
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    # Bad data or configs: one line (moejax.cli) before anything trains; later errors keep
    # their traceback.
    cli.run(validate, study, args.scale, args.data, args.tokenizer)
    try:
      study_lib.run_study(study, args.workdir, scale=args.scale, data=args.data,
                          tokenizer=args.tokenizer, seeds=seeds,
                          on_run_finished=lambda: _report(study, args.workdir))
    except checkpoint.Preempted as e:  # The run's checkpoint is saved; nothing was recorded.
      print(f"[{study.name}] {e}", flush=True)
      return
  # The table's regenerate command names the data by the repository's layout, not by the paths
  # given here, so a report from any clone is the same file.
  table, plots = study_lib.report(study, args.workdir)
  print(table)
  print("plots:", *plots)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
