"""Command line: `python -m moejax.main --config=configs/tiny.py --workdir=/tmp/run`.

Any config field can be overridden (`--config.model.moe.num_experts=16`); the config is locked,
so a misspelled field is an error. Multi-host: run the same command on every host (with
`--jax_distributed` to call `jax.distributed.initialize()` first).
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # Imported after flag parsing so --jax_* flags apply.
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from moejax import train
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
