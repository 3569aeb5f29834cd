"""Command line: `python -m moejax.main --config=configs/tiny.py --workdir=/tmp/run`.

Any config field can be overridden (`--config.model.moe.num_experts=16`); the config is locked,
so a misspelled field is an error. Multi-host: run the same command on every host. Cloud TPU,
Slurm and Open MPI are detected; other clusters pass `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (see `sharding.initialize_distributed`; a single process needs
nothing).

Rerunning the command resumes from the last complete checkpoint. On SIGTERM (preemption) the run
finishes its step, saves a checkpoint there and exits 0; see docs/reliability.md.
"""

import difflib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process jobs outside TPU/Slurm/MPI: process 0's HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # After flag parsing, so --jax_* flags apply.
  from moejax import checkpoint, sharding, train  # pylint: disable=import-outside-toplevel
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except checkpoint.Preempted as e:  # The checkpoint is saved: exit 0, the scheduler restarts us.
    logging.warning("%s", e)


def unknown_override(argv: list[str]) -> str | None:
  """For a `--config.a.b=v` naming a field the config lacks: a one-line "did you mean"."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  from moejax import study  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  config = study.load_config_module(path).get_config(arg or None)
  for item in argv:
    if not item.startswith("--config."):
      continue
    node, parts = config, item[len("--config."):].split("=", 1)[0].split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, fields, n=1)
        where = ".".join(["config", *parts[:depth]])
        return (f"{item}: {where} has no field {part!r}"
                + (f"; did you mean {where}.{close[0]}?" if close else f"; fields: {fields}"))
      node = node[part]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for a misspelled config field (not a traceback)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {unknown_override(argv[1:]) or e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
