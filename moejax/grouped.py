"""Grouped matmuls: the dropless expert FFN over rows sorted by expert.

    y_AD = grouped_ffn(x_AD, weights, group_sizes_E, activation="swiglu", impl="auto")

`x_AD` holds A rows ((token, choice) pairs) sorted by expert: the first `group_sizes_E[0]` rows
belong to expert 0, the next `group_sizes_E[1]` to expert 1, and so on; rows past
`sum(group_sizes_E)` are padding and come out as zeros. Expert e multiplies its rows by its own
weights (`wi [E, D, F]`, `wo [E, F, D]`, `wi_gate` for gated activations), so every row is computed:
nothing is dropped and nothing is padded to a capacity. This is the expert engine of MegaBlocks,
MaxText, Megatron-core and torchtitan; `moejax.moe` uses it for `MoEConfig(dispatch="dropless")`.

Implementations (`impl`), all computing the same function (tests check values and gradients):

- `ragged_dot`: `jax.lax.ragged_dot`, which XLA lowers to a grouped matmul on TPU and GPU. XLA:CPU
  lowers it to a dense product of every row with every expert, E times the FLOPs (measured on 2
  CPU cores, fwd+bwd of one FFN, 2048 rows, D=128, F=512: 154 ms at E=8, 542 ms at E=32, vs 29 / 32
  ms for the CF-1.25 capacity einsum).
- `blocked` (the CPU formulation): every expert's rows start at a block boundary of b rows (rows
  gathered into `[Z, b, D]` blocks, Z = ceil(A / b) + E, a static bound: each expert leaves less
  than one block partly empty), each block takes its expert's weights, and two batched matmuls
  do the work: `(A + E*b)` rows of FLOPs instead of `E*A`. Rows move by gathers in both
  directions (custom VJPs, no scatter-add); the per-block weights are a gather too, whose
  gradient sums each expert's blocks (a scatter-add over Z blocks).
- `megablox`: the Pallas TPU kernel that ships with JAX
  (`jax.experimental.pallas.ops.tpu.megablox.gmm`); TPU only (`interpret=True` on CPU, for tests).
- `auto` (default): `blocked` when lowered for CPU, `ragged_dot` for every other platform, chosen
  at lowering time with `jax.lax.platform_dependent`, so a program exported for TPU or CUDA from a
  CPU machine holds the ragged dots (`moejax.audit`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax import dispatch as dispatch_lib

IMPLS = ("auto", "ragged_dot", "blocked", "megablox")

# name -> (nonlinearity, gated); the same table as moejax.moe.ACTIVATIONS (which imports it).
ACTIVATIONS = {"relu": (jax.nn.relu, False), "gelu": (jax.nn.gelu, False),
               "swiglu": (jax.nn.silu, True), "geglu": (jax.nn.gelu, True)}


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes_E: jax.Array, *,
                   impl: str = "ragged_dot") -> jax.Array:
  """`x [A, n] x w [E, n, m] -> [A, m]` (any widths n, m): rows of group e times `w[e]`; rows
  past the groups: 0.

  One matmul (`ragged_dot` or `megablox`); `blocked` lays out the whole FFN once, see
  `grouped_ffn`.
  """
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  w = w.astype(x.dtype)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(x, w, group_sizes_E)
  if impl == "megablox":
    return _megablox(x, w, group_sizes_E)
  raise ValueError(f"grouped_matmul impl={impl!r}; allowed: 'ragged_dot' | 'megablox'.")


def _megablox(x, w, group_sizes_E):
  from jax.experimental.pallas.ops.tpu.megablox import ops  # pylint: disable=import-outside-toplevel
  A, n = x.shape
  m = w.shape[-1]
  tiling = (128, min(128, n), min(128, m))
  padded = -(-A // tiling[0]) * tiling[0]  # the kernel wants whole row tiles
  interpret = jax.default_backend() == "cpu"
  # The kernel leaves the rows past the groups unwritten, forward and backward (NaN in interpret
  # mode): the selects zero them in the output and in the input's gradient.
  in_group = (jnp.arange(padded) < jnp.sum(group_sizes_E))[:, None]  # [padded, 1]
  x_padded = jnp.pad(x, ((0, padded - A), (0, 0)))
  out_padded = ops.gmm(jnp.where(in_group, x_padded, 0), w, group_sizes_E,
                       preferred_element_type=x.dtype, tiling=tiling, interpret=interpret)
  return jnp.where(in_group, out_padded, 0)[:A]


def _ffn_rows(x_AD, weights, group_sizes_E, activation, matmul):
  act, gated = ACTIVATIONS[activation]
  h_AF = matmul(x_AD, weights["wi"], group_sizes_E)
  if gated:
    h_AF = act(matmul(x_AD, weights["wi_gate"], group_sizes_E)) * h_AF
  else:
    h_AF = act(h_AF)
  return matmul(h_AF, weights["wo"], group_sizes_E)


def grouped_ffn(x_AD: jax.Array, weights: dict[str, jax.Array], group_sizes_E: jax.Array, *,
                activation: str, impl: str = "auto", block_rows: int | None = None) -> jax.Array:
  """Each row through its expert's FFN: `[A, D] -> [A, D]`, rows sorted by expert (see module
  docstring). `weights`: `wi`, `wo` and, for gated activations, `wi_gate`, stacked over E.
  `block_rows`: b of the `blocked` layout (default `default_block_rows`). No expert dropout
  (dropless refuses it)."""
  if impl not in IMPLS:
    raise ValueError(f"grouped_ffn impl={impl!r}; allowed: {' | '.join(map(repr, IMPLS))}.")
  dtype = x_AD.dtype
  weights = {name: w.astype(dtype) for name, w in weights.items()}
  group_sizes_E = group_sizes_E.astype(jnp.int32)

  def with_matmul(kind):
    return _ffn_rows(x_AD, weights, group_sizes_E, activation,
                     functools.partial(grouped_matmul, impl=kind))

  def blocked():
    return _blocked_ffn(x_AD, weights, group_sizes_E, activation, block_rows)

  if impl == "auto":
    return jax.lax.platform_dependent(cpu=blocked, default=lambda: with_matmul("ragged_dot"))
  if impl == "blocked":
    return blocked()
  return with_matmul(impl)


def default_block_rows(rows: int, num_experts: int) -> int:
  """Block size b of the `blocked` layout: about half of an expert's mean share of the rows, a
  power of two in [32, 256] (measured on 2 CPU cores, 2048 rows, D=128, F=512: large blocks waste up
  to E*b rows, blocks under 32 rows run matmuls too small to be efficient)."""
  b = max(rows // (2 * num_experts), 1)
  return int(min(256, max(32, 2 ** int(math.log2(b)))))


def blocked_layout(group_sizes_E: jax.Array, rows: int, block_rows: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each sorted row goes when every expert starts at a block boundary.

  Returns `(dest_A, source, expert_Z)`: the padded position of each of the A rows (`Z * b` for
  the padding rows past the groups), the row in each of the `Z * b` padded positions (`A` for an
  empty one), and each block's expert (blocks past the last expert's take expert E-1 and hold only
  empty rows). Z = ceil(A / b) + E blocks always suffice.
  """
  E = group_sizes_E.shape[0]
  b = block_rows
  Z = -(-rows // b) + E
  padded = Z * b
  sizes_E = group_sizes_E.astype(jnp.int32)
  end_E = jnp.cumsum(sizes_E)
  start_E = end_E - sizes_E
  blocks_E = (sizes_E + b - 1) // b
  block_end_E = jnp.cumsum(blocks_E)
  block_start_E = block_end_E - blocks_E
  row_A = jnp.arange(rows, dtype=jnp.int32)
  expert_A = jnp.searchsorted(end_E, row_A, side="right").astype(jnp.int32)
  in_group_A = expert_A < E
  expert_A = jnp.minimum(expert_A, E - 1)
  dest_A = jnp.where(in_group_A, block_start_E[expert_A] * b + row_A - start_E[expert_A], padded)
  source = jnp.full((padded + 1,), rows, jnp.int32).at[dest_A].set(row_A)[:padded]  # [Z * b]
  expert_Z = jnp.minimum(jnp.searchsorted(block_end_E, jnp.arange(Z), side="right"), E - 1)
  return dest_A.astype(jnp.int32), source, expert_Z.astype(jnp.int32)


def _blocked_ffn(x_AD, weights, group_sizes_E, activation, block_rows):
  A, D = x_AD.shape
  E = group_sizes_E.shape[0]
  b = block_rows or default_block_rows(A, E)
  dest_A, source, expert_Z = blocked_layout(group_sizes_E, A, b)
  Z = expert_Z.shape[0]
  x_ZbD = permute_rows(x_AD, source, dest_A).reshape(Z, b, D)
  # Each block's weights, gathered (measured faster than a one-hot contraction for E >= 32 and
  # within noise at E = 8); the weight gradient sums the blocks of each expert.
  w = {name: jnp.take(w_E, expert_Z, axis=0) for name, w_E in weights.items()}
  act, gated = ACTIVATIONS[activation]
  h_ZbF = jnp.einsum("ZbD,ZDF->ZbF", x_ZbD, w["wi"])
  if gated:
    h_ZbF = act(jnp.einsum("ZbD,ZDF->ZbF", x_ZbD, w["wi_gate"])) * h_ZbF
  else:
    h_ZbF = act(h_ZbF)
  y_ZbD = jnp.einsum("ZbF,ZFD->ZbD", h_ZbF, w["wo"])
  return permute_rows(y_ZbD.reshape(Z * b, D), dest_A, source)


@jax.custom_vjp
def permute_rows(a: jax.Array, take: jax.Array, inverse: jax.Array) -> jax.Array:
  """`out[i] = a[take[i]]` for `a` `[n, D]` and `take` `[m]` (zero where `take[i] == n`): `[m, D]`,
  for a partial bijection: `inverse[j]` is the i with `take[i] == j` (or m when none). Its
  transpose is the gather by `inverse`, so the backward pass needs no scatter-add."""
  return dispatch_lib.take_rows(a[None], take[None])[0]


def _permute_rows_fwd(a, take, inverse):
  return permute_rows(a, take, inverse), (take, inverse)


def _permute_rows_bwd(res, dout):
  take, inverse = res
  return dispatch_lib.take_rows(dout[None], inverse[None])[0], None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)
