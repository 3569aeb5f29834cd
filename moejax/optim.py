"""Optimizers and learning-rate schedules (optax), built from `config.optim`.

- `adafactor` (T5 / Switch / ST-MoE default): factored second moments (for dims >= 128), no
  momentum, update clipping 1.0, relative step sizes off (the schedule below sets the step size).
- `adamw`: Adam with decoupled weight decay.
`weight_decay` means the same for both: `param -= lr(t) * weight_decay * param` each step, on
matrices only (not norms' scales). (optax.adafactor's own `weight_decay_rate` is not multiplied by
the learning rate and decays every parameter, so it is not used.)
Both are preceded by global-norm gradient clipping (`grad_clip_norm`, 0 disables it).
Optimizer state is float32 whatever the parameters' dtype (`float32_state`): with
`model.param_dtype="bfloat16"` the parameters take half the memory and the moments keep full
precision. The update is still added to bfloat16 parameters (no float32 master copy, no stochastic
rounding), so updates below a parameter's bfloat16 resolution are lost: fine for memory-bound
runs, a quality risk for long ones.

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


# Adafactor factors the second moment of a parameter whose second-largest dim is at least this.
FACTOR_MIN_DIM = 128


def factored_moment_axis(shape: tuple[int, ...], moment: str) -> int | None:
  """The param axis that Adafactor's `v_row` / `v_col` drops (optax's rule), or None when the
  parameter is not factored: v_row drops the largest dim, v_col the second largest."""
  if len(shape) < 2:
    return None
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i))  # == np.argsort (stable)
  if shape[order[-2]] < FACTOR_MIN_DIM:
    return None
  return order[-1] if moment == "v_row" else order[-2]


def _is_matrix(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim, num_train_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
  """Returns `(tx, schedule)` for `config.optim`."""
  schedule = make_schedule(optim, num_train_steps)
  if optim.name == "adafactor":
    tx = optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8, min_dim_size_to_factor=FACTOR_MIN_DIM),
        optax.clip_by_block_rms(1.0),
        optax.add_decayed_weights(float(optim.weight_decay), mask=_is_matrix),
        optax.scale_by_learning_rate(schedule))
  elif optim.name == "adamw":
    tx = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=1e-8,
                     weight_decay=float(optim.weight_decay), mask=_is_matrix)
  else:
    raise ValueError(f"config.optim.name={optim.name!r}: allowed values are {OPTIMIZERS}.")
  if optim.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(float(optim.grad_clip_norm)), tx)
  return float32_state(tx), schedule


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` run in float32: its state is created from float32 copies of the parameters, gradients
  and parameters enter it in float32, and its updates leave in the gradients' dtype. The
  identity for float32 parameters."""
  to_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

  def init(params):
    return tx.init(to_f32(params))

  def update(updates, state, params=None):
    new, state = tx.update(to_f32(updates), state, None if params is None else to_f32(params))
    return jax.tree.map(lambda u, g: u.astype(jnp.asarray(g).dtype), new, updates), state

  return optax.GradientTransformation(init, update)
