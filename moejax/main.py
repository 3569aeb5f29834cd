"""Command line: `python -m moejax.main --config=configs/tiny.py --workdir=/tmp/run`.

Any config field can be overridden (`--config.model.moe.num_experts=16`); the config is locked, so
a misspelled field is an error. Multi-host: the same command on every host (Cloud TPU, Slurm and
Open MPI are detected; elsewhere pass --coordinator_address, --num_processes, --process_id).
Rerunning resumes from the last complete checkpoint; on SIGTERM the run saves and exits 0.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moejax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Process 0's HOST:PORT.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv  # Imports after flag parsing, so --jax_* flags apply.
  from moejax import checkpoint, sharding, train  # pylint: disable=import-outside-toplevel
  # User errors are one line (moejax.cli), all found before anything is built.
  config = cli.run(lambda: _CONFIG.value)  # config_flags loads the file on first use.
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cli.run(train.validate_config, config)
  cli.run(cli.check_workdir, _WORKDIR.value)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except checkpoint.Preempted as e:  # The checkpoint is saved: exit 0, the scheduler restarts us.
    logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
