"""The Mixture-of-Experts feed-forward layer (Flax NNX), a thin module around `routing`.

    y_BLD, aux = MoELayer(MoEConfig(num_experts=8, top_k=2, d_ff=512), d_model=256,
                          rngs=nnx.Rngs(0))(x_BLD, mask_BL)

Forward pass: tokens `[B, L, D]` are cut into G groups of S tokens (`group_size`, or
`num_groups`, default one group per sequence); the float32 router picks experts per group
(`routing.route`); tokens are copied into a capacity buffer `[G, E, C, D]` (`dispatch`); each
expert `i` runs its FFN on its `[G*C, D]` slots with stacked weights `w_up_EDF`,
`w_down_EFD` (the pure functions take them as `wi`, `wo`); outputs are gate-weighted back into `[B, L, D]` (`combine`). A dropped choice
contributes exactly zero: the token continues through the residual connection of the block.

Dropless (`dispatch="dropless"`, `_dropless_experts`): no capacity buffer. The kept (token,
choice) pairs of the device's groups are sorted by expert into `[A, D]` rows (A = U*K, U the
device's tokens) and each expert's FFN runs on its rows as grouped matmuls (`moejax.grouped`);
under expert parallelism the rows travel to their experts' devices by a buffered or ragged
all-to-all (`_exchange`).

Expert parallelism: when a mesh with an `expert` axis is set (`jax.set_mesh`), groups are sharded
over (`data`, `expert`) and expert weights over `expert`. Inside `jax.shard_map` every device
routes its own groups, builds its `[E, g*C, D]` buffer, `all_to_all` over `expert` sends each
expert's slots to the device that holds it (`[E/ep, ep*g*C, D]`), the local experts run, and a
second `all_to_all` brings the results back. Routing sums are `psum`-ed over the mesh so the
losses and statistics equal the single-device ones.

The layer returns `(y, MoEAux)`: `aux.loss` is the weighted sum of this layer's auxiliary losses
(add it to the task loss), `aux.metrics` the unweighted losses and routing statistics. Nothing is
hidden in a global collection.

Train vs eval: `deterministic=True` at call time switches to the eval capacity factor and turns
off jitter, random second-expert routing and expert dropout (its default is the module's
`deterministic`, which `model.eval()` / `model.train()` set: the NNX idiom). The call argument
`capacity_factor=` (e.g. `math.inf` for a no-drop eval) beats both factors, and
`record_routing=True` sows the routing. The library's own eval paths pass all of them
explicitly, so one graph definition serves every variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from moejax import dispatch as dispatch_lib
from moejax import grouped
from moejax import routing
from moejax import sharding
# The config lives in its own module; re-exported here, where users have always imported it.
from moejax.moe_config import (ACTIVATIONS, DISPATCHES, DROPLESS_IGNORES,  # noqa: F401
                               EP_TRANSPORTS, NO_DROP, ROUTERS, MoEConfig, is_int, is_real)


# The pure functions' short weight keys -> the layer's parameter names.
PARAM_OF_KEY = {"router": "router_DE", "wi": "w_up_EDF", "wi_gate": "w_gate_EDF",
                "wo": "w_down_EFD"}


@struct.dataclass
class MoEAux:
  """What one MoE layer reports: `loss` (weighted aux losses, add to the task loss), `metrics`,
  and `balance_counts` (the raw counts `routing.StepBalance` is built from: summed over a step's
  micro-batches they give the step's f for the `batch`-scope losses)."""
  loss: jax.Array
  metrics: dict[str, jax.Array]
  balance_counts: dict[str, jax.Array]
  # int32 [B, L, K]: each token's experts as selected (the router's top-K, or the forced or
  # replayed ones), before the second-expert policy and capacity. Pass it back as `routes_BLK`
  # to replay this routing in a later forward (routing replay; exact when neither pass drops and
  # the second-expert policy is "all"). Under expert choice: each token's ranking of all E.
  routes: jax.Array | None = None
  # [B, L, K], column j of each: the combine weight choice j got (router dtype; 0 where it was
  # not kept: dropped by capacity or by the second-expert policy, or padding), and whether it got
  # a slot. Column j belongs to `routes[..., j]` except under `overflow="reroute"`, where a
  # rerouted choice used another expert. Pass `gates` back as `gates_BLK` to replay them too.
  gates: jax.Array | None = None
  kept: jax.Array | None = None


def expert_ffn(x_EXD: jax.Array, weights: dict[str, jax.Array], *, activation: str,
               dropout_rate: float = 0.0, keep_EXF: jax.Array | None = None) -> jax.Array:
  """Each expert's FFN on its own rows: `[E, X, D] -> [E, X, D]` with weights `[E, D, F]`.

  `keep_EXF` (bool, from `expert_dropout_mask`) drops hidden units at `dropout_rate` (inverted
  dropout: kept units are scaled by 1 / (1 - rate)).
  """
  dtype = x_EXD.dtype
  act, gated = ACTIVATIONS[activation]
  h_EXF = jnp.einsum("EXD,EDF->EXF", x_EXD, weights["wi"].astype(dtype))
  if gated:
    h_EXF = act(jnp.einsum("EXD,EDF->EXF", x_EXD, weights["wi_gate"].astype(dtype))) * h_EXF
  else:
    h_EXF = act(h_EXF)
  if keep_EXF is not None and dropout_rate > 0:
    h_EXF = jnp.where(keep_EXF, h_EXF / (1.0 - dropout_rate), 0.0).astype(dtype)
  return jnp.einsum("EXF,EFD->EXD", h_EXF, weights["wo"].astype(dtype))


def expert_dropout_mask(key: jax.Array, rate: float, expert_ids_E: jax.Array,
                        group_ids_G: jax.Array, C: int, F: int) -> jax.Array:
  """Keep-mask `[E, G*C, F]` of the expert hidden units for the slots of (expert, group).

  The bits of slot (e, g) come from `fold_in(fold_in(key, g), e)` with *global* group and expert
  ids, so a slot gets the same mask whichever device computes it: a sharded run drops exactly the
  units a single-device run drops.
  """
  def slot_bits(e, g):
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, g), e), 1.0 - rate,
                                (C, F))
  keep_EGCF = jax.vmap(lambda e: jax.vmap(lambda g: slot_bits(e, g))(group_ids_G))(expert_ids_E)
  return keep_EGCF.reshape(len(expert_ids_E), len(group_ids_G) * C, F)


def moe_groups(x_GSD: jax.Array, valid_GS: jax.Array, weights: dict[str, jax.Array],
               jitter_GSD: jax.Array | None, uniform_GSK: jax.Array | None,
               dropout_key: jax.Array | None, selection_bias_E: jax.Array | None = None,
               forced_expert_GSK: jax.Array | None = None,
               forced_gate_GSK: jax.Array | None = None, *,
               cfg: MoEConfig, capacity: int,
               second_expert_policy: str, expert_axis: str | None = None,
               reduce_axes: tuple[str, ...] = (), model_axis: str | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """The MoE computation on G groups: `(y_GSD, routing sums, record)`, where `record` holds the
  router's top-k experts before policy and capacity (`router_topk`, int32 [G, S, K]), whether
  each choice got a slot (`kept`) and whether it asked for one (`wanted`: a real token, kept by
  the second-expert policy; bool [G, S, K]) and the combine weight it got (`gate`, 0 where not
  kept). `forced_expert_GSK` / `forced_gate_GSK`: routing replay (`routing.route_group`). Pure;
  also the shard_map body.

  With `expert_axis` set it runs per device inside `jax.shard_map`: `weights['wi']` etc. hold the
  local E/ep experts, and two `all_to_all`s over `expert_axis` move the capacity buffer to the
  experts and back. `reduce_axes` are psum-ed over for the routing sums. With `model_axis` set
  (tensor parallelism) the expert weights hold a slice of the hidden width F: each device computes
  a partial expert output, psum-ed over `model_axis` (Megatron's all-reduce after the row-parallel
  matmul) before the return `all_to_all`, so routing and combine stay invariant over `model`.
  """
  G, S, D = x_GSD.shape
  C = capacity
  router_dtype = jnp.dtype(cfg.router_dtype) if cfg.router_dtype else x_GSD.dtype
  logits_GSE = routing.router_logits(x_GSD, weights["router"], dtype=router_dtype,
                                     jitter_GSD=jitter_GSD)
  r = routing.route(logits_GSE, valid_GS, uniform_GSK=uniform_GSK, top_k=cfg.top_k, capacity=C,
                    gate=cfg.gate, renormalize=cfg.renormalize,
                    second_expert_policy=second_expert_policy,
                    second_expert_threshold=cfg.second_expert_threshold, priority=cfg.priority,
                    overflow=cfg.overflow, score=cfg.score,
                    routed_scaling_factor=cfg.routed_scaling_factor, choice=cfg.choice,
                    num_expert_groups=cfg.num_expert_groups, topk_groups=cfg.topk_groups,
                    selection_bias_E=selection_bias_E, forced_expert_GSK=forced_expert_GSK,
                    forced_gate_GSK=forced_gate_GSK)
  if cfg.dispatch == "dropless":
    y_GSD, transport_sums = _dropless_experts(x_GSD, r, weights, cfg=cfg,
                                              expert_axis=expert_axis, model_axis=model_axis)
  else:
    y_GSD = _capacity_experts(x_GSD, r, weights, dropout_key, cfg=cfg, capacity=C,
                              expert_axis=expert_axis, reduce_axes=reduce_axes,
                              model_axis=model_axis)
    transport_sums = {}
  sums = routing.routing_sums(r, valid_GS, balance_loss_choices=cfg.balance_loss_choices,
                              score=cfg.score)
  sums.update(transport_sums)
  if reduce_axes:
    sums = jax.lax.psum(sums, reduce_axes)
  return y_GSD, sums, {"router_topk": r.router_expert, "kept": r.kept,
                       "wanted": r.wanted, "gate": r.gate}


def _capacity_experts(x_GSD, r, weights, dropout_key, *, cfg, capacity, expert_axis,
                      reduce_axes, model_axis):
  """Capacity buffers `[G, E, C, D]`: dispatch, (all_to_all,) expert FFN, (all_to_all,) combine."""
  G, S, D = x_GSD.shape
  E, C = cfg.num_experts, capacity
  x_GECD = dispatch_lib.dispatch(x_GSD, r, E, C, cfg.dispatch)
  x_EXD = x_GECD.transpose(1, 0, 2, 3).reshape(E, G * C, D)
  expert_ids_E, group_ids_G = jnp.arange(E), jnp.arange(G)
  if expert_axis is not None:
    # Send each expert's slots to the device holding it: [E, gC, D] -> [E/ep, ep*gC, D].
    x_EXD = jax.lax.all_to_all(x_EXD, expert_axis, split_axis=0, concat_axis=1, tiled=True)
    # Global ids of what this device now holds: its E/ep experts, and the groups of the ep
    # devices along `expert_axis` (same other coordinates), in all_to_all's concat order.
    ep = jax.lax.axis_size(expert_axis)
    me = jax.lax.axis_index(expert_axis)
    expert_ids_E = me * (E // ep) + jnp.arange(E // ep)
    stride = math.prod(jax.lax.axis_size(a)
                       for a in reduce_axes[reduce_axes.index(expert_axis) + 1:])
    first_block = jax.lax.axis_index(reduce_axes) - me * stride  # the block at expert index 0
    blocks_ep = first_block + jnp.arange(ep) * stride
    group_ids_G = (blocks_ep[:, None] * G + jnp.arange(G)).reshape(-1)
  keep_EXF = None
  if dropout_key is not None and cfg.expert_dropout > 0:
    F = weights["wi"].shape[-1]  # The local slice of the hidden width under tensor parallelism.
    tp = 1 if model_axis is None else jax.lax.axis_size(model_axis)
    keep_EXF = expert_dropout_mask(dropout_key, cfg.expert_dropout, expert_ids_E, group_ids_G,
                                   C, F * tp)
    if model_axis is not None:  # The global mask's columns of this device's hidden units.
      keep_EXF = jax.lax.dynamic_slice_in_dim(keep_EXF, jax.lax.axis_index(model_axis) * F, F, -1)
  y_EXD = expert_ffn(x_EXD, weights, activation=cfg.activation, dropout_rate=cfg.expert_dropout,
                     keep_EXF=keep_EXF)
  if model_axis is not None:  # Partial sums over this device's hidden units -> the full output.
    y_EXD = jax.lax.psum(y_EXD, model_axis)
  if expert_axis is not None:
    # ... and the results back to the devices holding the tokens: [E/ep, ep*gC, D] -> [E, gC, D].
    y_EXD = jax.lax.all_to_all(y_EXD, expert_axis, split_axis=1, concat_axis=0, tiled=True)
  y_GECD = y_EXD.reshape(E, G, C, D).transpose(1, 0, 2, 3)
  return dispatch_lib.combine(y_GECD, r, cfg.dispatch)


def _dropless_experts(x_GSD, r, weights, *, cfg, expert_axis, model_axis):
  """Every kept (token, choice) pair of this device's groups through its expert: the pairs sorted
  by expert (`dispatch.expert_sort`), moved to their experts' devices under expert parallelism
  (`_exchange`), grouped matmuls (`grouped.grouped_ffn`), and back. Returns `(y_GSD, sums)`:
  `ep_overflow` (pairs a full receive buffer dropped) and `assignments` (kept pairs)."""
  G, S, D = x_GSD.shape
  E = cfg.num_experts
  K = r.expert.shape[-1]
  kept_UK = r.kept.reshape(G * S, K)
  pairs = dispatch_lib.expert_sort(r.expert.reshape(G * S, K), kept_UK, E)
  x_AD = dispatch_lib.dispatch_sorted(x_GSD.reshape(G * S, D), pairs)

  def ffn(x_AD, group_sizes_E):  # rows sorted by (local) expert: E is the local experts
    y_AD = grouped.grouped_ffn(x_AD, {n: w for n, w in weights.items() if n != "router"},
                               group_sizes_E, activation=cfg.activation, impl=cfg.grouped_matmul)
    if model_axis is not None:  # Partial sums over this device's hidden units -> full output.
      y_AD = jax.lax.psum(y_AD, model_axis)
    return y_AD

  if expert_axis is None:
    y_AD, overflow = ffn(x_AD, pairs.group_sizes_E), jnp.zeros((), jnp.float32)
  else:
    y_AD, overflow = _exchange(x_AD, pairs.group_sizes_E, ffn, cfg=cfg, expert_axis=expert_axis)
  y_GSD = dispatch_lib.combine_sorted(y_AD, r.gate.reshape(G * S, K), pairs).reshape(G, S, D)
  return y_GSD, {"ep_overflow": overflow,
                 "assignments": jnp.sum(kept_UK.astype(jnp.float32))}


def receive_rows(pairs: int, ep: int, factor: float | None) -> int:
  """Rows each device receives from each source under dropless expert parallelism: `factor`
  times the fair share `pairs / ep` (rounded up), at most `pairs` (which holds everything)."""
  if factor is None:
    return pairs
  return max(1, min(pairs, math.ceil(factor * pairs / ep)))


def _exchange(x_AD, group_sizes_E, ffn, *, cfg, expert_axis):
  """Dropless expert parallelism inside `shard_map`: this device's expert-sorted rows go to the
  devices holding their experts (E/ep consecutive experts per device), each device runs its
  local grouped FFN on what it received, and the results come back.

  Every source sends at most W rows to each destination (`receive_rows`); the receive side is a
  `[J, W, D]` buffer (J = ep devices), chunk j from source j. Rows past W are dropped (their
  output is zero, as a capacity drop) and counted. Per-expert counts travel first (one small
  all_to_all), so the receiver knows each row's expert. `buffered` moves the whole buffer with a
  dense all_to_all; `ragged` moves only the rows with `jax.lax.ragged_all_to_all`, into the same
  layout. Returns `(y_AD, dropped pairs)`.
  """
  A, D = x_AD.shape
  E = group_sizes_E.shape[0]
  ep = jax.lax.axis_size(expert_axis)
  if ep == 1:  # Every expert is local: nothing to move, nothing to drop.
    return ffn(x_AD, group_sizes_E), jnp.zeros((), jnp.float32)
  me = jax.lax.axis_index(expert_axis)
  El = E // ep
  W = receive_rows(A, ep, cfg.receive_buffer_factor)
  count_E = group_sizes_E
  start_E = jnp.cumsum(count_E) - count_E
  count_J = count_E.reshape(ep, El).sum(axis=1)  # rows for each destination device
  start_J = jnp.cumsum(count_J) - count_J
  sent_J = jnp.minimum(count_J, W)
  # Rows of expert e that fit: the destination's first W rows, in expert order.
  offset_E = start_E - jnp.repeat(start_J, El)
  sent_E = jnp.clip(W - offset_E, 0, count_E).astype(jnp.int32)
  dropped = jnp.sum(count_J - sent_J).astype(jnp.float32)
  # [J, E]: the rows each source sends for each of this device's E / ep experts.
  recv_count_JE = jax.lax.all_to_all(sent_E.reshape(ep, El), expert_axis, 0, 0, tiled=True)

  # Buffer position of each sorted row (ep*W: dropped or past the kept rows), and the inverse.
  row_A = jnp.arange(A, dtype=jnp.int32)
  dest_A = jnp.searchsorted(jnp.cumsum(count_J), row_A, side="right").astype(jnp.int32)
  in_range_A = dest_A < ep
  dest_A = jnp.minimum(dest_A, ep - 1)
  r_A = row_A - start_J[dest_A]
  slot_A = jnp.where(in_range_A & (r_A < W), dest_A * W + r_A, ep * W)
  r_W = jnp.arange(W, dtype=jnp.int32)
  source_JW = jnp.where(r_W[None, :] < sent_J[:, None], start_J[:, None] + r_W[None, :], A)

  def buffered_there(x_AD):
    send_JWD = grouped.permute_rows(x_AD, source_JW.reshape(-1), slot_A).reshape(ep, W, D)
    return jax.lax.all_to_all(send_JWD, expert_axis, 0, 0, tiled=True).reshape(ep * W, D)

  def buffered_back(y_AD):
    y_JWD = jax.lax.all_to_all(y_AD.reshape(ep, W, D), expert_axis, 0, 0, tiled=True)
    return grouped.permute_rows(y_JWD.reshape(ep * W, D), slot_A, source_JW.reshape(-1))

  start_J, sent_J = start_J.astype(jnp.int32), sent_J.astype(jnp.int32)
  recv_J = jax.lax.all_to_all(sent_J, expert_axis, 0, 0, tiled=True)  # rows from each source

  def as_varying_like(a, like):  # shard_map's types: ragged_all_to_all's result (and the
    # buffer it writes into) must vary over the token axes as the rows do, or the backward
    # pass's cotangents would not match
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  def zeros_like_tokens(shape, like):
    return as_varying_like(jnp.zeros(shape, like.dtype), like)

  def ragged_there(x_AD):  # Source chunk s lands at rows [s*W, s*W + its size) of the receiver.
    return jax.lax.ragged_all_to_all(
        x_AD, zeros_like_tokens((ep * W, D), x_AD), start_J, sent_J,
        jnp.full((ep,), me * W, jnp.int32), recv_J, axis_name=expert_axis)

  def ragged_back(y_AD):  # ... and back to where each source's rows started.
    source_start_J = jax.lax.all_to_all(start_J, expert_axis, 0, 0, tiled=True)
    return jax.lax.ragged_all_to_all(
        y_AD, zeros_like_tokens((A, D), y_AD), (jnp.arange(ep) * W).astype(jnp.int32), recv_J,
        source_start_J, sent_J, axis_name=expert_axis)

  def run(there, back):
    recv_AD = there(x_AD)  # [J * W, D]: the pairs this device's experts received
    # On the receiver: each row's local expert from the counts, rows sorted by it.
    end_JE = jnp.cumsum(recv_count_JE, axis=1)
    local_JW = jax.vmap(lambda e: jnp.searchsorted(e, r_W, side="right"))(end_JE)
    key_A = local_JW.reshape(-1).astype(jnp.int32)  # El: an empty row
    order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)
    kept_A = key_A[order_A] < El
    take_A = jnp.where(kept_A, order_A, ep * W)
    inverse_A = jnp.full((ep * W + 1,), ep * W, jnp.int32).at[
        jnp.where(kept_A, order_A, ep * W)].set(jnp.arange(ep * W, dtype=jnp.int32))[:ep * W]
    xs_AD = grouped.permute_rows(recv_AD, take_A, inverse_A)
    ys_AD = ffn(xs_AD, jnp.sum(recv_count_JE, axis=0))
    return as_varying_like(back(grouped.permute_rows(ys_AD, inverse_A, take_A)), x_AD)

  if cfg.ep_transport == "ragged":
    return run(ragged_there, ragged_back), dropped
  if cfg.ep_transport == "buffered":
    return run(buffered_there, buffered_back), dropped
  # auto: chosen when lowered, per platform (XLA:CPU has no ragged all-to-all).
  return jax.lax.platform_dependent(cpu=lambda: run(buffered_there, buffered_back),
                                    default=lambda: run(ragged_there, ragged_back)), dropped


def _varying_axes(a: jax.Array) -> frozenset[str]:
  """The shard_map axes `a` varies over (its type's `vma`; `manual_axis_type.varying` in JAX
  0.10). Raises rather than guess: a wrong answer would only fail in the backward pass of the
  ragged transport, on an accelerator."""
  aval = jax.typeof(a)
  if hasattr(aval, "vma"):
    return frozenset(aval.vma)
  if hasattr(aval, "manual_axis_type"):
    return frozenset(aval.manual_axis_type.varying)
  raise NotImplementedError(f"cannot read the varying mesh axes of {aval} in jax "
                            f"{jax.__version__}; moejax's ragged transport needs them.")


class ExpertBias(nnx.Variable):
  """The per-expert selection bias of auxiliary-loss-free balancing: state, not a parameter (no
  gradient, no optimizer moment), updated by `MoELayer.update_selection_bias`, checkpointed."""


class MoELayer(nnx.Module):
  """Router + E experts with stacked weights. See the module docstring."""

  def __init__(self, cfg: MoEConfig, d_model: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, MoEConfig):
      raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}.")
    if not is_int(d_model) or d_model < 1:
      raise ValueError(f"MoELayer d_model={d_model!r}; allowed: an integer >= 1.")
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    E, D, F = cfg.num_experts, d_model, cfg.d_ff
    router_init = jax.nn.initializers.variance_scaling(cfg.router_init_scale, "fan_in",
                                                       "truncated_normal")
    expert_init = jax.nn.initializers.variance_scaling(
        cfg.expert_init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=(0,))
    # Parameter names follow the dense MLP's (`moejax.model.MLP`: `w_up_DF`, `w_gate_DF`,
    # `w_down_FD`) with the expert axis E in front; the router is `router_DE`.
    # The router's expert axis is not sharded: every device routes its tokens over all experts.
    self.router_DE = sharding.param(router_init(rngs.params(), (D, E), param_dtype),
                                    ("embed", None))
    self.w_up_EDF = sharding.param(expert_init(rngs.params(), (E, D, F), param_dtype),
                                   ("expert", "embed", "mlp"))
    if ACTIVATIONS[cfg.activation][1]:  # gated
      self.w_gate_EDF = sharding.param(expert_init(rngs.params(), (E, D, F), param_dtype),
                                       ("expert", "embed", "mlp"))
    self.w_down_EFD = sharding.param(expert_init(rngs.params(), (E, F, D), param_dtype),
                                     ("expert", "mlp", "embed"))
    if cfg.num_shared_experts:  # One dense FFN as wide as all shared experts together (equal to
      # their sum: concatenating hidden units adds the outputs), stored as one expert (E = 1).
      Fs = cfg.num_shared_experts * (cfg.shared_d_ff or F)
      self.shared_w_up_EDF = sharding.param(expert_init(rngs.params(), (1, D, Fs), param_dtype),
                                            (None, "embed", "mlp"))
      if ACTIVATIONS[cfg.activation][1]:
        self.shared_w_gate_EDF = sharding.param(
            expert_init(rngs.params(), (1, D, Fs), param_dtype), (None, "embed", "mlp"))
      self.shared_w_down_EFD = sharding.param(expert_init(rngs.params(), (1, Fs, D), param_dtype),
                                              (None, "mlp", "embed"))
    if cfg.bias_update_rate > 0:
      self.expert_bias = ExpertBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,),
                                    eager_sharding=not jax.sharding.get_abstract_mesh().empty)
    self.rngs = rngs
    self.deterministic = False  # `model.eval()` / `model.train()`; a call's `deterministic=` wins.

  def update_selection_bias(self, selection_count_E: jax.Array) -> None:
    """DeepSeek-V3's update after an optimizer step: b_e += rate * sign(mean load - load_e), from
    the step's global selection counts (`aux.metrics["selection_count"]` summed over the step)."""
    if self.cfg.bias_update_rate > 0:
      count_E = selection_count_E.astype(jnp.float32)  # [E], or [layers, E] when scanned
      self.expert_bias[...] += self.cfg.bias_update_rate * jnp.sign(
          jnp.mean(count_E, axis=-1, keepdims=True) - count_E)

  def weights(self) -> dict[str, jax.Array]:
    """The routed experts' arrays under the short keys the pure functions take (`moe_groups`,
    `moejax.grouped`): router, wi, wi_gate (gated activations only), wo."""
    return {key: getattr(self, name)[...] for key, name in PARAM_OF_KEY.items()
            if hasattr(self, name)}

  def shared_weights(self) -> dict[str, jax.Array]:
    """The shared experts' arrays (`num_shared_experts > 0`) under the same short keys."""
    return {key: getattr(self, f"shared_{name}")[...] for key, name in PARAM_OF_KEY.items()
            if hasattr(self, f"shared_{name}")}

  def __call__(self, x_BLD: jax.Array, mask_BL: jax.Array | None = None, *,
               deterministic: bool | None = None, group_size: int | None = None,
               step_balance: routing.StepBalance | None = None,
               routes_BLK: jax.Array | None = None, gates_BLK: jax.Array | None = None,
               capacity_factor: float | None = None,
               record_routing: bool = False) -> tuple[jax.Array, MoEAux]:
    """`deterministic` (default: the module's, set by `model.eval()`): eval capacity factor, no
    jitter, random second-expert routing or expert dropout. `capacity_factor` overrides both
    configured factors for this call (`math.inf`: the no-drop eval; ignored by expert choice,
    whose capacity is part of the model). `record_routing`: sow, as `nnx.Intermediate`, the
    router's top-k experts ("router_topk" [B, L, K], before policy and capacity), whether each
    choice got a slot ("router_kept") and asked for one ("router_wanted"), and the router's
    input ("router_input" [B, L, D], padding zeroed), for routing analyses (`moejax.analysis`;
    collect them with `nnx.capture(f, nnx.Intermediate)`).
    `group_size` (tokens per routing group) overrides the config's grouping for this call;
    `Transformer.decode` uses it to route the new tokens of a decoding step together.
    `step_balance` (`balance_loss_scope="batch"` only): the whole optimizer step's f, so that a
    micro-batch's balance losses are its exact share of the step's (gradient accumulation).
    `routes_BLK` (int [B, L, K], e.g. an earlier call's `aux.routes`): routing replay. Each
    token uses these experts instead of the router's top-K; gates are recomputed from the
    current router's scores at them (so the router still learns), and the second-expert policy,
    capacity and dispatch work as usual on them. `gates_BLK` (float [B, L, K], an earlier call's
    `aux.gates`; needs `routes_BLK`): replay the gates too, so the combine weights are the
    recorded ones (a kept choice gets its recorded gate, a dropped one 0) and the router learns
    only from the auxiliary losses."""
    cfg = self.cfg
    if x_BLD.ndim != 3 or x_BLD.shape[-1] != self.d_model:
      raise ValueError(f"MoELayer input shape {tuple(x_BLD.shape)}; allowed: rank 3 "
                       f"[batch, length, d_model={self.d_model}].")
    B, L, D = x_BLD.shape
    if mask_BL is not None and tuple(mask_BL.shape) != (B, L):
      raise ValueError(f"MoELayer mask shape {tuple(mask_BL.shape)}; allowed: None or [{B}, {L}].")
    deterministic = self.deterministic if deterministic is None else deterministic
    if group_size is not None:
      cfg = dataclasses.replace(cfg, group_size=group_size, num_groups=None)
    S = cfg.group_size_for(B, L)
    G = B * L // S
    C = cfg.capacity(S, deterministic=deterministic, capacity_factor=capacity_factor)
    K = cfg.top_k  # Choices per token: the router's k (expert choice: E, see routing).

    valid_GS = (jnp.ones((B, L), bool) if mask_BL is None else mask_BL.astype(bool)).reshape(G, S)
    # Zero the padding rows: whatever they hold (even NaN from a fully masked attention row) must
    # not reach the router's softmax, whose backward pass would turn 0 * NaN into NaN.
    x_GSD = jnp.where(valid_GS[..., None], x_BLD.astype(self.dtype).reshape(G, S, D), 0)
    # Randomness is drawn here, for the global shapes, so a sharded run sees the same numbers.
    jitter_GSD = uniform_GSK = dropout_key = None
    policy = cfg.second_expert_policy
    if not deterministic and cfg.router_jitter > 0:
      jitter_GSD = jax.random.uniform(self.rngs.routing(), (G, S, D), jnp.float32,
                                      1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
    if policy == "random":
      if deterministic or K == 1:
        policy = "all"  # Eval is deterministic: every selected expert is used.
      else:
        uniform_GSK = jax.random.uniform(self.rngs.routing(), (G, S, K), jnp.float32)
    if not deterministic and cfg.expert_dropout > 0:
      dropout_key = self.rngs.dropout()
    forced_GSK = forced_gate_GSK = None
    if gates_BLK is not None:
      forced_gate_GSK = self._replayed_gates(gates_BLK, routes_BLK, B, L).reshape(G, S, K)
    if routes_BLK is not None:
      forced_GSK = self._replayed_routes(routes_BLK, B, L).reshape(G, S, K)
    elif cfg.router != "learned":  # Benchmarks: experts picked without the router.
      forced_GSK = routing.forced_choices(
          cfg.router, (G, S, K), cfg.num_experts,
          key=self.rngs.routing() if cfg.router == "random" else None)

    run = functools.partial(moe_groups, cfg=cfg, capacity=C, second_expert_policy=policy)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and sharding.EXPERT in mesh.axis_names:
      run = _sharded(run, mesh, G=G, num_experts=cfg.num_experts)
    bias_E = self.expert_bias[...] if hasattr(self, "expert_bias") else None
    y_GSD, sums, record = run(x_GSD, valid_GS, self.weights(), jitter_GSD, uniform_GSK,
                              dropout_key, bias_E, forced_GSK, forced_gate_GSK)
    if record_routing:  # Collect with nnx.capture(..., nnx.Intermediate).
      self.sow(nnx.Intermediate, "router_topk", record["router_topk"].reshape(B, L, -1))
      self.sow(nnx.Intermediate, "router_kept", record["kept"].reshape(B, L, -1))
      self.sow(nnx.Intermediate, "router_wanted", record["wanted"].reshape(B, L, -1))
      self.sow(nnx.Intermediate, "router_input", x_GSD.reshape(B, L, D))

    y_BLD = y_GSD.reshape(B, L, D).astype(self.dtype)
    if cfg.num_shared_experts:  # Every token, outside the all-to-all (DeepSeek-MoE).
      y_BLD = y_BLD + expert_ffn(x_GSD.reshape(1, B * L, D), self.shared_weights(),
                                 activation=cfg.activation).reshape(B, L, D).astype(self.dtype)
    metrics = routing.finalize_sums(sums, balance_loss_scope=cfg.balance_loss_scope,
                                    step_balance=step_balance)
    if cfg.dispatch == "dropless":  # Pairs a full receive buffer dropped (expert parallelism).
      metrics["ep_overflow_fraction"] = sums["ep_overflow"] / jnp.maximum(sums["assignments"], 1)
    loss = (cfg.balance_loss_weight * metrics["balance_loss"]
            + cfg.gshard_loss_weight * metrics["gshard_loss"]
            + cfg.z_loss_weight * metrics["z_loss"])
    counts = {name: jax.lax.stop_gradient(sums[name]) for name in routing.BALANCE_COUNTS}
    return y_BLD, MoEAux(loss=loss, metrics=metrics, balance_counts=counts,
                         routes=record["router_topk"].reshape(B, L, -1),
                         gates=record["gate"].reshape(B, L, -1),
                         kept=record["kept"].reshape(B, L, -1))

  def _replayed_routes(self, routes_BLK, B: int, L: int) -> jax.Array:
    """`routes_BLK` checked (ValueError naming what is wrong) before anything is traced further;
    expert ids are range-checked when the array is concrete (not inside jit)."""
    cfg = self.cfg
    for name, value, default in (("choice", cfg.choice, "token"), ("router", cfg.router, "learned"),
                                 ("overflow", cfg.overflow, "drop")):
      if value != default:
        raise ValueError(f"routing replay with MoEConfig.{name}={value!r}; allowed: "
                         f"{name}={default!r} (replay gives each token its experts).")
    shape = tuple(routes_BLK.shape)
    if shape != (B, L, cfg.top_k):
      raise ValueError(f"replayed routes of shape {shape}; allowed: [batch, length, top_k] = "
                       f"{(B, L, cfg.top_k)} (this layer's input and top_k).")
    if not jnp.issubdtype(routes_BLK.dtype, jnp.integer):
      raise ValueError(f"replayed routes of dtype {routes_BLK.dtype}; allowed: integer expert ids.")
    if not isinstance(routes_BLK, jax.core.Tracer):
      lo, hi = int(jnp.min(routes_BLK)), int(jnp.max(routes_BLK))
      if lo < 0 or hi >= cfg.num_experts:
        raise ValueError(f"replayed routes hold expert ids in [{lo}, {hi}]; allowed: [0, "
                         f"num_experts - 1 = {cfg.num_experts - 1}] (routes of another model?).")
    return routes_BLK.astype(jnp.int32)

  def _replayed_gates(self, gates_BLK, routes_BLK, B: int, L: int) -> jax.Array:
    """`gates_BLK` checked like the routes: it needs them, the same shape, a float dtype."""
    if routes_BLK is None:
      raise ValueError("replayed gates without routes; allowed: gates_BLK only together with "
                       "routes_BLK (the gates belong to those experts).")
    shape = tuple(gates_BLK.shape)
    if shape != (B, L, self.cfg.top_k):
      raise ValueError(f"replayed gates of shape {shape}; allowed: [batch, length, top_k] = "
                       f"{(B, L, self.cfg.top_k)} (the routes' shape).")
    if not jnp.issubdtype(gates_BLK.dtype, jnp.floating):
      raise ValueError(f"replayed gates of dtype {gates_BLK.dtype}; allowed: floating point.")
    return gates_BLK


def _sharded(run, mesh, *, G: int, num_experts: int):
  """Wraps `moe_groups` in `jax.shard_map`: groups over the batch axes (data, fsdp, expert),
  experts over `expert`, their hidden width over `model` (tensor parallelism). The weights enter
  gathered over `fsdp` (the compiler inserts the all-gather: ZeRO-3)."""
  token_axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  problem = sharding.moe_layout_problem(num_experts, G, dict(mesh.shape))
  if problem:
    raise ValueError(f"MoE layer: {problem[0]}; allowed: {problem[1]}.")
  groups = P(token_axes)  # leading G axis of x_GSD, valid_GS, jitter_GSD, uniform_GSK
  model_axis = (sharding.MODEL if sharding.MODEL in mesh.axis_names
                and mesh.shape[sharding.MODEL] > 1 else None)
  body = functools.partial(run, expert_axis=sharding.EXPERT, reduce_axes=token_axes,
                           model_axis=model_axis)
  # wi, wi_gate [E, D, F], wo [E, F, D]: experts over `expert`, F over `model`.
  weight_spec = {"router": P(), "wi": P(sharding.EXPERT, None, model_axis),
                 "wi_gate": P(sharding.EXPERT, None, model_axis),
                 "wo": P(sharding.EXPERT, model_axis, None)}

  def sharded_run(x_GSD, valid_GS, weights, jitter_GSD, uniform_GSK, dropout_key, bias_E,
                  forced_GSK, forced_gate_GSK):
    weight_specs = {name: weight_spec[name] for name in weights}
    def optional(arg, spec):  # optional inputs (training-only ones in eval) get no spec
      return None if arg is None else spec

    in_specs = (groups, groups, weight_specs, optional(jitter_GSD, groups),
                optional(uniform_GSK, groups), optional(dropout_key, P()), optional(bias_E, P()),
                optional(forced_GSK, groups), optional(forced_gate_GSK, groups))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(groups, P(), groups))(
        x_GSD, valid_GS, weights, jitter_GSD, uniform_GSK, dropout_key, bias_E, forced_GSK,
        forced_gate_GSK)

  return sharded_run


def as_linen(cfg: MoEConfig, d_model: int, *, name: str | None = None, **kwargs):
  """The MoE layer as a Flax Linen module (via `flax.nnx.bridge.ToLinen`).

      y_BLD, aux = moe.as_linen(cfg, d_model, name="moe")(x_BLD, mask_BL)   # inside @nn.compact

  Initialise with `rngs={'params': ..., 'routing': ...}`. In training, pass fresh
  `rngs={'routing': ..., 'dropout': ...}` to every `apply` (e.g. `jax.random.fold_in(key, step)`);
  a training-mode call of a layer with jitter, random routing or expert dropout and without those
  RNGs raises ValueError (it would otherwise reuse one fixed key every step). For eval, call with
  `deterministic=True`.
  """
  from flax.core import FrozenDict  # pylint: disable=import-outside-toplevel
  from flax.nnx import bridge  # pylint: disable=import-outside-toplevel
  streams = (("routing",) if cfg.router_jitter > 0 or (cfg.second_expert_policy == "random"
                                                        and cfg.top_k > 1) else ())
  streams += ("dropout",) if cfg.expert_dropout > 0 else ()

  class _LinenMoE(bridge.ToLinen):
    """ToLinen that refuses a training call without the RNGs the layer draws from."""

    def __call__(self, x_BLD, mask_BL=None, *, deterministic: bool | None = None, **kw):
      if streams and not deterministic and not self.is_initializing():
        missing = [s for s in streams if not self.has_rng(s)]
        if missing:
          raise ValueError(
              f"MoE layer {self.name!r} in training mode needs rngs {missing} in `apply` (router "
              f"jitter / random routing / expert dropout would reuse one fixed key every step); "
              f"pass rngs={{{', '.join(repr(m) + ': key' for m in missing)}}}, or "
              "deterministic=True for eval.")
      return super().__call__(x_BLD, mask_BL, deterministic=deterministic, **kw)

  return _LinenMoE(MoELayer, args=(cfg, d_model), kwargs=FrozenDict(kwargs), name=name)
