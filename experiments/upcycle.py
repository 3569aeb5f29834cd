"""Upcycle a trained dense run into a MoE run (Komatsuzaki et al. 2022), then train it as usual.

    python experiments/upcycle.py --dense_workdir=DENSE_RUN --config=configs/switch.py \
        --workdir=NEW_RUN [--noise=0.0] [--config.model.moe.gate=gshard ...]
    python -m moejax.main --config=configs/switch.py --workdir=NEW_RUN [same overrides]

Restores the dense run's latest checkpoint (with the config it wrote), builds the MoE model of
`--config` (it must match the dense one except for the MoE layers, whose `d_ff` and activation
must equal the dense MLP's), copies every parameter (each expert = that block's dense MLP, times
`1 + noise * N(0, 1)`; routers fresh; `moejax.upcycle`), and saves it with a fresh optimizer
state as step 0 of NEW_RUN. `moejax.main` on NEW_RUN then resumes from that checkpoint: the
upcycled model trains for `num_train_steps` more steps on a fresh data order.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define_flags():
  """Command-line flags, defined only when run as a script (importing this module for
  `upcycle_run` must not clash with moejax.main's flags of the same names)."""
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  names = {"config": config_flags.DEFINE_config_file(
               "config", None, "MoE config (configs/*.py[:arg]).", lock_config=True),
           "dense_workdir": flags.DEFINE_string("dense_workdir", None,
                                                "A trained dense run's directory."),
           "workdir": flags.DEFINE_string("workdir", None,
                                          "The new MoE run's directory (must be new)."),
           "noise": flags.DEFINE_float("noise", 0.0,
                                       "Multiplicative noise on each expert's copy.")}
  flags.mark_flags_as_required(["config", "dense_workdir", "workdir"])
  return names


def upcycle_run(dense_workdir: str, config, workdir: str, noise: float = 0.0) -> int:
  """Writes `workdir/checkpoints/0`: `config`'s model upcycled from the dense run
  (`moejax.upcycle.start_run`). Returns the dense run's step."""
  from moejax import train, upcycle  # pylint: disable=import-outside-toplevel
  if not train.validate_config(config).moe_layer_indices:
    raise ValueError("--config has no MoE layer to upcycle into (set model.moe_every or "
                     "model.moe_layers).")
  return upcycle.start_run(dense_workdir, config, workdir, noise=noise)


def main(argv, names):
  del argv
  dense, workdir = names["dense_workdir"].value, names["workdir"].value
  step = upcycle_run(dense, names["config"].value, workdir, names["noise"].value)
  print(f"upcycled {dense} (step {step}) into {workdir}/checkpoints/0; train it with "
        f"python -m moejax.main --config=... --workdir={workdir}")


if __name__ == "__main__":
  from moejax import cli  # pylint: disable=import-outside-toplevel
  _names = _define_flags()
  # User errors (bad flags, config, workdirs): one `error:` line, exit 2.
  app.run(lambda argv: cli.run(main, argv, _names), flags_parser=cli.parse_flags)
