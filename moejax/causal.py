"""How much does a routing policy leak the future in a decoder? Teacher-forced vs causal eval.

Teacher-forced evaluation runs a whole packed batch at once, so an MoE layer routes every token of
a group together: with capacity, whether token t keeps its expert can depend on tokens after t
(choice-major `position` priority with k >= 2, batch-prioritized `probability` routing,
`reroute`), which generation never sees. Attention is causal, so routing is the only way the
future can reach position t.

`causal_vs_teacher_forced` measures it exactly: for each evaluated position t it runs the batch
with every token after t masked out (padding takes no capacity and is zeroed before the router, so
the masked tokens take no part in routing), which is what a batched generation at step t routes,
and reads the loss at t. The gap `causal - teacher_forced` (nats) is the leak: exactly zero, to
float precision, for a causal-safe policy (`priority="token"` with any k; `"position"` with k = 1
and `overflow="drop"`), and nonzero for the others, of either sign: the hidden future may have
taken slots the past wanted (causal is then better) or helped the model (causal is then worse).
Capacity stays C of the full group S, as in batched decoding with a fixed group. One forward per
evaluated position: use a few hundred positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def causal_vs_teacher_forced(model: nnx.Module, batch: dict[str, jax.Array],
                             positions: jax.Array, **call_kwargs) -> dict[str, jax.Array]:
  """Per-position CE, teacher-forced and causal, at the sequence positions `positions` [T].

  `model(tokens, positions, segment_ids, mask, **call_kwargs) -> (logits_BLV, aux)`
  (moejax.model.Transformer; `call_kwargs` its call variants, e.g. `deterministic=True,
  moe_capacity_factor=1.0`). Returns `teacher_forced_TB`, `causal_TB` (CE of target [b, t]) and
  `valid_TB` (the target is a real token).
  """
  graphdef, state = nnx.split(model)
  inputs_BL, targets_BL = batch["inputs"], batch["targets"]
  mask_BL, segments_BL, pos_BL = batch["mask"], batch["segment_ids"], batch["positions"]
  L = inputs_BL.shape[1]

  def ce_at(logits_BLV, t):
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BLV, t, axis=1, keepdims=False)
    target_B = jax.lax.dynamic_index_in_dim(targets_BL, t, axis=1, keepdims=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BV.astype(jnp.float32), target_B)

  @jax.jit
  def run(state, positions_T):
    forward = lambda mask: nnx.merge(graphdef, state)(inputs_BL, pos_BL, segments_BL, mask,
                                                      **call_kwargs)[0]
    full_BLV = forward(mask_BL)

    def causal_at(t):  # Every row truncated after t: what batched generation at step t routes.
      return ce_at(forward(mask_BL & (jnp.arange(L) <= t)[None, :]), t)

    teacher_TB = jax.vmap(lambda t: ce_at(full_BLV, t))(positions_T)
    causal_TB = jax.lax.map(causal_at, positions_T)
    valid_TB = jax.vmap(lambda t: jax.lax.dynamic_index_in_dim(mask_BL, t, 1, False))(positions_T)
    return {"teacher_forced_TB": teacher_TB, "causal_TB": causal_TB, "valid_TB": valid_TB}

  return run(state, jnp.asarray(positions, jnp.int32))


def measure_run(workdir: str, positions: int = 256, capacity_factor: float | None = None,
                seed: int = 0) -> dict[str, float]:
  """The leak of a trained run: its latest checkpoint, one eval batch of its own data, `positions`
  positions evenly spaced over the sequence, at its eval capacity factor (or `capacity_factor`)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  config = train.load_run_config(workdir)
  model, mesh, step = train.load_model(config, workdir)
  positions_T = np.unique(np.linspace(0, config.seq_len - 1, min(positions, config.seq_len))
                          .round().astype(np.int32))
  with jax.set_mesh(mesh):
    result = causal_vs_teacher_forced(model, train.first_eval_batch(config, mesh, seed),
                                      positions_T, deterministic=True,
                                      moe_capacity_factor=capacity_factor)
  moe = config.model.moe
  return {**leak_nats(result), "step": step, "positions": len(positions_T),
          "capacity_factor": capacity_factor or moe.eval_capacity_factor}


def leak_nats(result: dict[str, jax.Array]) -> dict[str, float]:
  """Mean teacher-forced and causal CE over valid targets, and their difference (the leak)."""
  valid = result["valid_TB"].astype(jnp.float32)
  n = jnp.maximum(valid.sum(), 1.0)
  teacher = float((result["teacher_forced_TB"] * valid).sum() / n)
  causal = float((result["causal_TB"] * valid).sum() / n)
  return {"teacher_forced_ce": teacher, "causal_ce": causal, "leak": causal - teacher}
