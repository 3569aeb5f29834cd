"""Moving tokens into expert capacity buffers and back, given a `routing.Routing`.

Two implementations with identical results (tests check outputs and gradients agree):

- `sort` (default; MaxText / Megatron style): every kept choice has a flat buffer index
  `expert * C + slot` (Y = E * C slots per group); the buffer is filled by one gather of token
  rows and the output is read back by one gather per choice. Cost O(G*E*C*D + U*K*D) =
  O(U*K*CF*D) for U tokens: independent of E.
- `onehot` (GShard / Mesh TF / flaxformer "mask" routers): build `dispatch_GSEC` and
  `combine_GSEC`, then `einsum('GSEC,GSD->GECD')` and back. Cost O(U*E*C*D) = O(U*S*K*CF*D): it
  grows with the group size. The paper-shaped reference.

Both produce the buffer `x_GECD` (empty slots are zero) and consume `y_GECD`.

`dropless` dispatch (`expert_sort`, `dispatch_sorted`, `combine_sorted`) has no buffer: every
kept (token, choice) pair of the device's U tokens becomes one row of `x_AD` (A = U*K rows),
sorted by expert, for a grouped matmul (`moejax.grouped`). The same gathers as `sort` move the
rows, with one "group" of all U tokens and the sorted position in place of `expert * C + slot`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from typing import NamedTuple

from moejax.routing import Routing

DISPATCHES = ("sort", "onehot")


def buffer_index(r: Routing, num_experts: int, capacity: int) -> jax.Array:
  """`idx_GSK = expert * C + slot` for kept choices, `E * C` (a zero row) otherwise."""
  return jnp.where(r.kept, r.expert * capacity + r.slot, num_experts * capacity)


def dispatch(x_GSD: jax.Array, r: Routing, num_experts: int, capacity: int,
             method: str = "sort") -> jax.Array:
  """Token rows into the capacity buffer `x_GECD`; empty slots hold zeros."""
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  idx_GSK = buffer_index(r, E, C)
  if method == "onehot":
    dispatch_GSEC = _one_hot_slots(idx_GSK, E, C).sum(axis=2)
    return jnp.einsum("GSEC,GSD->GECD", dispatch_GSEC.astype(x_GSD.dtype), x_GSD)
  token_of_slot_GY, _ = _slot_owners(idx_GSK, E * C)
  return _gather_dispatch(x_GSD, token_of_slot_GY, idx_GSK).reshape(G, E, C, D)


def combine(y_GECD: jax.Array, r: Routing, method: str = "sort") -> jax.Array:
  """Gate-weighted sum of each token's expert outputs: `y_GSD`. Dropped choices add zero."""
  G, E, C, D = y_GECD.shape
  idx_GSK = buffer_index(r, E, C)
  gate_GSK = r.gate.astype(y_GECD.dtype)
  if method == "onehot":
    combine_GSEC = jnp.einsum("GSKEC,GSK->GSEC", _one_hot_slots(idx_GSK, E, C, y_GECD.dtype),
                              gate_GSK)
    return jnp.einsum("GECD,GSEC->GSD", y_GECD, combine_GSEC)
  token_of_slot_GY, choice_of_slot_GY = _slot_owners(idx_GSK, E * C)
  return _gather_combine(y_GECD.reshape(G, E * C, D), gate_GSK, idx_GSK, token_of_slot_GY,
                         choice_of_slot_GY)


# The sort path is written with gathers only, in both directions: the kept choices and the
# filled slots are in one-to-one correspondence, so the transpose of "gather tokens into slots"
# is "gather slots back into tokens" -- no scatter-add, which is slow on CPU and needs atomics on
# GPU. Integer index arrays get no cotangent.


def _slot_owners(idx_GSK: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """For each slot: the token in it (S if empty) and which of its K choices put it there."""
  G, S, K = idx_GSK.shape
  token_A = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, K)).reshape(-1)
  choice_A = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32)[None, :], (S, K)).reshape(-1)

  def owners(idx_SK):  # Unkept choices write to one extra slot, cut off at the end.
    token_Y = jnp.full((num_slots + 1,), S, jnp.int32).at[idx_SK.reshape(-1)].set(token_A)
    choice_Y = jnp.zeros((num_slots + 1,), jnp.int32).at[idx_SK.reshape(-1)].set(choice_A)
    return token_Y[:num_slots], choice_Y[:num_slots]

  return jax.vmap(owners)(idx_GSK)


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """`a[g, idx[g, i]]` for `a` `[G, n, D]` and `idx` `[G, m]` (any row counts n, m), with one
  appended zero row at index n (the "nowhere" index): `[G, m, D]`."""
  G, _, D = a.shape
  a_pad = jnp.concatenate([a, jnp.zeros((G, 1, D), a.dtype)], axis=1)
  return jnp.take_along_axis(a_pad, idx[..., None], axis=1)


@jax.custom_vjp
def _gather_dispatch(x_GSD, token_of_slot_GY, idx_GSK):
  return take_rows(x_GSD, token_of_slot_GY)


def _gather_dispatch_fwd(x_GSD, token_of_slot_GY, idx_GSK):
  return _gather_dispatch(x_GSD, token_of_slot_GY, idx_GSK), (token_of_slot_GY, idx_GSK)


def _gather_dispatch_bwd(res, dbuf_GYD):
  token_of_slot_GY, idx_GSK = res
  G, S, K = idx_GSK.shape
  dx_GSKD = take_rows(dbuf_GYD, idx_GSK.reshape(G, S * K)).reshape(G, S, K, -1)
  return jnp.sum(dx_GSKD, axis=2), None, None


_gather_dispatch.defvjp(_gather_dispatch_fwd, _gather_dispatch_bwd)


@jax.custom_vjp
def _gather_combine(y_GYD, gate_GSK, idx_GSK, token_of_slot_GY, choice_of_slot_GY):
  G, S, K = idx_GSK.shape
  y_GSKD = take_rows(y_GYD, idx_GSK.reshape(G, S * K)).reshape(G, S, K, -1)
  return jnp.einsum("GSKD,GSK->GSD", y_GSKD, gate_GSK)


def _gather_combine_fwd(y_GYD, gate_GSK, idx_GSK, token_of_slot_GY, choice_of_slot_GY):
  out = _gather_combine(y_GYD, gate_GSK, idx_GSK, token_of_slot_GY, choice_of_slot_GY)
  return out, (y_GYD, gate_GSK, idx_GSK, token_of_slot_GY, choice_of_slot_GY)


def _gather_combine_bwd(res, dout_GSD):
  y_GYD, gate_GSK, idx_GSK, token_of_slot_GY, choice_of_slot_GY = res
  G, S, K = idx_GSK.shape
  # d y[slot] = gate(owner, choice) * dout[owner]; empty slots point at the zero row.
  dout_GYD = take_rows(dout_GSD, token_of_slot_GY)
  gate_pad_GSK = jnp.concatenate([gate_GSK, jnp.zeros((G, 1, K), gate_GSK.dtype)], axis=1)
  gate_GY = jnp.take_along_axis(
      jnp.take_along_axis(gate_pad_GSK, token_of_slot_GY[..., None], axis=1),
      choice_of_slot_GY[..., None], axis=2)[..., 0]
  dy_GYD = dout_GYD * gate_GY[..., None]
  # d gate[s, k] = <dout[s], y[slot(s, k)]>.
  y_GSKD = take_rows(y_GYD, idx_GSK.reshape(G, S * K)).reshape(G, S, K, -1)
  dgate_GSK = jnp.einsum("GSKD,GSD->GSK", y_GSKD, dout_GSD)
  return dy_GYD, dgate_GSK, None, None, None


_gather_combine.defvjp(_gather_combine_fwd, _gather_combine_bwd)


def _one_hot_slots(idx_GSK: jax.Array, num_experts: int, capacity: int,
                   dtype=jnp.float32) -> jax.Array:
  """`[G, S, K, E, C]` one-hot of each choice's slot (all zeros for unkept choices)."""
  G, S, K = idx_GSK.shape
  oh_GSKY = jax.nn.one_hot(idx_GSK, num_experts * capacity + 1, dtype=dtype)[..., :-1]
  return oh_GSKY.reshape(G, S, K, num_experts, capacity)


# ----------------------------------------------------------------------------------------------
# Dropless: (token, choice) pairs sorted by expert
# ----------------------------------------------------------------------------------------------


class SortedPairs(NamedTuple):
  """Where each (token, choice) pair sits among the A = U*K rows sorted by expert."""
  row_UK: jax.Array  # int32: the pair's row, A where the choice is not kept
  token_A: jax.Array  # int32: the token in each row, U for the rows past the kept pairs
  choice_A: jax.Array  # int32: which of the token's K choices the row is
  group_sizes_E: jax.Array  # int32: rows per expert (kept pairs); they sum to at most A


def expert_sort(expert_UK: jax.Array, kept_UK: jax.Array, num_experts: int) -> SortedPairs:
  """Sorts the kept pairs by expert, ties in (token, choice) order (a stable sort); pairs that
  are not kept (padding, a second-expert policy's skip) sort last and take no row."""
  U, K = expert_UK.shape
  A = U * K
  key_A = jnp.where(kept_UK, expert_UK, num_experts).reshape(A).astype(jnp.int32)
  order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)  # row -> pair
  kept_row_A = key_A[order_A] < num_experts
  row_of_pair_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  row_UK = jnp.where(kept_UK, row_of_pair_A.reshape(U, K), A)
  return SortedPairs(row_UK, jnp.where(kept_row_A, order_A // K, U), order_A % K,
                     jnp.bincount(key_A, length=num_experts + 1)[:num_experts].astype(jnp.int32))


def dispatch_sorted(x_UD: jax.Array, pairs: SortedPairs) -> jax.Array:
  """Token rows into expert-sorted pair rows `x_AD` (each token once per kept choice)."""
  return _gather_dispatch(x_UD[None], pairs.token_A[None], pairs.row_UK[None])[0]


def combine_sorted(y_AD: jax.Array, gate_UK: jax.Array, pairs: SortedPairs) -> jax.Array:
  """Gate-weighted sum of each token's rows: `y_UD`. Unkept choices add zero."""
  return _gather_combine(y_AD[None], gate_UK[None].astype(y_AD.dtype), pairs.row_UK[None],
                         pairs.token_A[None], pairs.choice_A[None])[0]
