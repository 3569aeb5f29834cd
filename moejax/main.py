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
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moejax import cli

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
  # config_flags defers a file it could not load to the config's first use: check it now.
  problem = config_load_error(sys.argv[1:])
  if problem is not None and not cli.tracebacks_wanted():
    cli.user_error(problem)
  config = _CONFIG.value
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  # User errors found before anything is built are one line (moejax.cli); errors later in the
  # run keep their traceback.
  cli.run(train.validate_config, config)
  workdir = _WORKDIR.value
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    cli.user_error(f"--workdir={workdir} is a file; allowed: a directory (new or a run's, to "
                   "resume it).")
  try:
    train.train_and_evaluate(config, workdir)
  except checkpoint.Preempted as e:  # The checkpoint is saved: exit 0, the scheduler restarts us.
    logging.warning("%s", e)


def _config_of(argv: list[str]):
  """(path, ConfigDict) of the `--config=path[:arg]` in argv, or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  from moejax import study  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  try:
    return path, study.load_config_module(path).get_config(arg or None)
  except Exception:  # pylint: disable=broad-except
    return None  # The config itself fails to load: that error is reported, not this one.


def unknown_override(argv: list[str]) -> str | None:
  """For a `--config.a.b=v` naming a field the config lacks: a one-line "did you mean"."""
  loaded = _config_of(argv)
  if loaded is None:
    return None
  for item in argv:
    if not item.startswith("--config."):
      continue
    node, parts = loaded[1], item[len("--config."):].split("=", 1)[0].split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, fields, n=1)
        where = ".".join(["config", *parts[:depth]])
        return (f"{item}: {where} has no field {part!r}"
                + (f"; did you mean {where}.{close[0]}?" if close else f"; fields: {fields}"))
      node = node[part]
  return None


def expected_type(argv: list[str], error: str) -> str:
  """`"; allowed: an int (configs/tiny.py sets 2)"` for the config field a flag error names."""
  loaded, name = _config_of(argv), error.removeprefix("flag ").split("=", 1)[0]
  if loaded is None or not name.startswith("--config."):
    return ""
  path, node = loaded
  for part in name[len("--config."):].split("."):
    if not hasattr(node, "keys") or part not in node:
      return ""
    node = node[part]
  kind = type(node).__name__
  return f"; allowed: {'an' if kind[0] in 'aeiou' else 'a'} {kind} ({path} sets {node!r})"


def config_load_error(argv: list[str]) -> str | None:
  """Why `--config=path[:arg]` cannot be loaded (missing file, unknown arg, ...), or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  from moejax import study  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    return (f"--config={spec}: no such config file {path!r} (run from the repository root, or "
            "give a path to a configs/*.py file)")
  try:
    study.load_config_module(path).get_config(arg or None)
  except ValueError as e:  # a config's own message (e.g. an unknown config arg)
    return f"--config={spec}: {e}"
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec}: {type(e).__name__}: {e}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error (exit 2, no traceback; set MOEJAX_TRACEBACK=1 for
  one) for a config file that does not load, a misspelled config field or a value of the wrong
  type."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if cli.tracebacks_wanted():
      raise
    cli.user_error(unknown_override(argv[1:]) or config_load_error(argv[1:]) or str(e))
  except flags.IllegalFlagValueError as e:  # `--config.batch_size=abc`: name the expected type.
    if cli.tracebacks_wanted():
      raise
    cli.user_error(config_load_error(argv[1:])
                   or f"{str(e).removeprefix('flag ')}{expected_type(argv[1:], str(e))}")
  except Exception:  # pylint: disable=broad-except  # the config file raised while loading
    problem = config_load_error(argv[1:])
    if problem is None or cli.tracebacks_wanted():
      raise
    cli.user_error(problem)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
