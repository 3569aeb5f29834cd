"""Command line: `python -m moejax.main --config=configs/tiny.py --workdir=/tmp/run`.

Any config field can be overridden (`--config.model.moe.num_experts=16`); the config is locked,
so a misspelled field is an error. Multi-host (Cloud TPU, Slurm, MPI): run the same command on
every host; `sharding.initialize_distributed()` joins the job (a no-op on a single process).
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from moejax import sharding, train  # After flag parsing, so --jax_* flags apply.
  sharding.initialize_distributed()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
