"""Optimizers and learning-rate schedules (optax), built from `config.optim`.

- `adafactor` (T5 / Switch / ST-MoE default): factored second moments, no momentum, update
  clipping 1.0, relative step sizes off (the schedule below sets the step size).
- `adamw`: decoupled weight decay applied to matrices only (not norms' scales).
Both are preceded by global-norm gradient clipping (`grad_clip_norm`, 0 disables it).

Schedules: linear warmup over `warmup_steps`, then
- `rsqrt`:    lr * sqrt(warmup / step)                       (T5 / Switch "inverse square root"),
- `cosine`:   cosine from lr to lr * `end_lr_fraction` at `num_train_steps`,
- `constant`: lr.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")


def make_schedule(optim, num_train_steps: int) -> optax.Schedule:
  """Warmup-then-decay schedule; `optim` is the `config.optim` ConfigDict."""
  lr, warmup = float(optim.learning_rate), int(optim.warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if optim.schedule == "rsqrt":
      decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(step + 1, max(warmup, 1)))
    elif optim.schedule == "cosine":
      t = jnp.clip((step - warmup) / max(num_train_steps - warmup, 1), 0.0, 1.0)
      end = float(optim.end_lr_fraction)
      decay = end + (1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    else:
      decay = 1.0
    return lr * warm * decay

  return schedule


def _is_matrix(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """Returns `(tx, schedule)` for `config.optim`."""
  schedule = make_schedule(optim, num_train_steps)
  if optim.name == "adafactor":
    tx = optax.adafactor(learning_rate=schedule, multiply_by_parameter_scale=False,
                         clipping_threshold=1.0, decay_rate=0.8,
                         weight_decay_rate=float(optim.weight_decay) or None)
  elif optim.name == "adamw":
    tx = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=1e-8,
                     weight_decay=float(optim.weight_decay), mask=_is_matrix)
  else:
    raise ValueError(f"config.optim.name={optim.name!r}: allowed values are {OPTIMIZERS}.")
  if optim.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(optim.grad_clip_norm)), tx)
  return tx, schedule
