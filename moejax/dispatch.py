"""Moving tokens into expert capacity buffers and back, given a `routing.Routing`.

Two implementations with identical results (tests check outputs and gradients agree):

- `sort` (default; MaxText / Megatron style): every kept choice has a flat buffer index
  `expert * C + slot`; the buffer is filled by one gather of token rows and the output is read
  back by one gather per choice. Cost O(G*E*C*D + T*K*D) = O(T*K*CF*D): independent of E.
- `onehot` (GShard / Mesh TF / flaxformer "mask" routers): build `dispatch_GSEC` and
  `combine_GSEC`, then `einsum('GSEC,GSD->GECD')` and back. Cost O(T*E*C*D) = O(T*S*K*CF*D): it
  grows with the group size. The paper-shaped reference.

Both produce the buffer `x_GECD` (empty slots are zero) and consume `y_GECD`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import Routing

DISPATCHES = ("sort", "onehot")


def buffer_index(r: Routing, num_experts: int, capacity: int) -> jax.Array:
  """`idx_GSK = expert * C + slot` for kept choices, `E * C` (a zero row) otherwise."""
  return jnp.where(r.kept_SK, r.expert_SK * capacity + r.slot_SK, num_experts * capacity)


def dispatch(x_GSD: jax.Array, r: Routing, num_experts: int, capacity: int,
             method: str = "sort") -> jax.Array:
  """Token rows into the capacity buffer `x_GECD`; empty slots hold zeros."""
  G, S, D = x_GSD.shape
  E, C = num_experts, capacity
  idx_GSK = buffer_index(r, E, C)
  if method == "onehot":
    dispatch_GSEC = _one_hot_slots(idx_GSK, E, C).sum(axis=2)
    return jnp.einsum("GSEC,GSD->GECD", dispatch_GSEC.astype(x_GSD.dtype), x_GSD)
  K = idx_GSK.shape[-1]
  # Which token sits in each slot (S = "none", pointing at an appended zero row).
  token_of_slot_GX = jnp.full((G, E * C + 1), S, jnp.int32)
  token_S = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], (S, K))
  token_of_slot_GX = jax.vmap(lambda t, i: t.at[i.reshape(-1)].set(token_S.reshape(-1)))(
      token_of_slot_GX, idx_GSK)[:, :E * C]
  x_pad_GSD = jnp.concatenate([x_GSD, jnp.zeros((G, 1, D), x_GSD.dtype)], axis=1)
  x_GXD = jnp.take_along_axis(x_pad_GSD, token_of_slot_GX[..., None], axis=1)
  return x_GXD.reshape(G, E, C, D)


def combine(y_GECD: jax.Array, r: Routing, method: str = "sort") -> jax.Array:
  """Gate-weighted sum of each token's expert outputs: `y_GSD`. Dropped choices add zero."""
  G, E, C, D = y_GECD.shape
  idx_GSK = buffer_index(r, E, C)
  gate_GSK = r.gate_SK.astype(y_GECD.dtype)
  if method == "onehot":
    combine_GSEC = jnp.einsum("GSKEC,GSK->GSEC", _one_hot_slots(idx_GSK, E, C, y_GECD.dtype),
                              gate_GSK)
    return jnp.einsum("GECD,GSEC->GSD", y_GECD, combine_GSEC)
  S, K = idx_GSK.shape[1:]
  y_pad_GXD = jnp.concatenate([y_GECD.reshape(G, E * C, D), jnp.zeros((G, 1, D), y_GECD.dtype)],
                              axis=1)
  y_GNdD = jnp.take_along_axis(y_pad_GXD, idx_GSK.reshape(G, S * K, 1), axis=1)
  return jnp.einsum("GSKD,GSK->GSD", y_GNdD.reshape(G, S, K, D), gate_GSK)


def _one_hot_slots(idx_GSK: jax.Array, num_experts: int, capacity: int,
                   dtype=jnp.float32) -> jax.Array:
  """`[G, S, K, E, C]` one-hot of each choice's slot (all zeros for unkept choices)."""
  G, S, K = idx_GSK.shape
  oh_GSKX = jax.nn.one_hot(idx_GSK, num_experts * capacity + 1, dtype=dtype)[..., :-1]
  return oh_GSKX.reshape(G, S, K, num_experts, capacity)
