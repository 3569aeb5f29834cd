"""Command line: `python -m moejax.main --config=configs/tiny.py --workdir=/tmp/run`.

Any config field can be overridden (`--config.model.moe.num_experts=16`); the config is locked,
so a misspelled field is an error. Multi-host: run the same command on every host. Cloud TPU,
Slurm and Open MPI are detected; other clusters pass `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (see `sharding.initialize_distributed`; a single process needs
nothing).
"""

from absl import app, flags
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
  from moejax import sharding, train  # After flag parsing, so --jax_* flags apply.
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
