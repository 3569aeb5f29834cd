"""Decoder-only MoE language model (Flax NNX).

    tokens_BL -> Embed -> [Block] x num_layers -> RMSNorm -> LM head -> logits_BLV
    Block(x) = x + Attn(RMSNorm(x));  x + FFN(RMSNorm(x))        (pre-norm, no biases)

- Attention: causal, RoPE on q/k, multi-head or grouped-query (`num_kv_heads < num_heads`; query
  heads are grouped as `[N, R]` with `H = N * R`). With packed data the mask is *document-causal*:
  a token attends to earlier tokens of the same `segment_ids` document only, and RoPE uses the
  per-document `positions`.
- FFN: a dense MLP or a `moejax.moe.MoELayer`. Which layers are MoE is `moe_layers` (an explicit
  list) or else `moe_every` (0 = none, 1 = all, 2 = every other: layers 1, 3, 5, ... as in Switch /
  GShard, which replace every second FFN of the dense model).
- Precision: params in `param_dtype` (float32), activations in `dtype` (e.g. bfloat16); norms,
  softmax, RoPE and logits are computed in float32. The MoE router's float32 is the MoE layer's job.
- Decoding: `init_cache` + `decode` run T new tokens of every row against a `KVCache` (keys and
  values of earlier columns); with no-drop MoE routing it gives the logits `__call__` gives on the
  whole row. Sampling on top of it: `moejax.generate`.
- Sharding: every parameter names its logical axes (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
  `expert`, ...); `moejax.sharding.LOGICAL_AXIS_RULES` maps them to the mesh (`fsdp` shards
  `embed`, `model` shards heads, MLP width and vocabulary). The compiler propagates the layout to
  activations; only the batch layout is constrained explicitly.

Shape letters: see `moejax/__init__.py` (attention: N kv heads, R = H / N query heads per kv
head, M key positions).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from moejax import routing
from moejax.moe import ACTIVATIONS, PARAM_OF_KEY, MoEConfig, MoELayer, is_int
from moejax.moe_config import FieldError
from moejax.sharding import constrain, num_batch_shards, param

DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("einsum", "dot_product")
# Rematerialisation policy per block (`jax.checkpoint` policies): what the backward pass keeps
# from the forward pass; everything else is recomputed. "none" keeps every activation.
REMATS = {"none": None,
          "full": jax.checkpoint_policies.nothing_saveable,  # only each block's input
          "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs; recompute the rest
          "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# The residual stream between blocks: batch split over the batch axes, d_model whole (the
# compiler would otherwise be free to split it over `fsdp` like the weights that produced it).
ACTIVATION = ("batch", None, None)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model hyper-parameters; `TransformerConfig(**config.model.to_dict())` validates them."""
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0          # 0 = num_heads (multi-head); fewer = grouped-query attention.
  head_dim: int = 0              # 0 = d_model // num_heads.
  d_ff: int = 256                # Width of the dense MLP (the MoE experts' width is in `moe`).
  activation: str = "swiglu"
  tie_embeddings: bool = True
  moe_every: int = 0             # 0 = dense model, 1 = every layer, n = layers n-1, 2n-1, ...
  moe_layers: tuple[int, ...] = ()  # Explicit MoE layer indices; overrides `moe_every`.
  moe: dict[str, Any] | None = None  # kwargs of `moejax.moe.MoEConfig`.
  dtype: str = "float32"         # Activations.
  param_dtype: str = "float32"
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  attention: str = "einsum"      # Or "dot_product": jax.nn.dot_product_attention (see _attend).
  remat: str = "none"            # Rematerialisation of each block in the backward pass: REMATS.
  scan_layers: bool = False      # Stack the layers' weights and run them with jax.lax.scan.

  def __post_init__(self):
    def fail(field, value, allowed):
      raise ValueError(f"config.model.{field}={value!r}: allowed values are {allowed}.")
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
      if not is_int(getattr(self, field)) or getattr(self, field) < 1:
        fail(field, getattr(self, field), "positive integers")
    for field in ("num_kv_heads", "head_dim", "moe_every"):
      if not is_int(getattr(self, field)) or getattr(self, field) < 0:
        fail(field, getattr(self, field), "integers >= 0")
    if self.num_heads % self.kv_heads:
      fail("num_kv_heads", self.num_kv_heads,
           f"divisors of num_heads={self.num_heads} (each kv head serves H / num_kv_heads query heads)")
    if not self.head_dim and self.d_model % self.num_heads:
      fail("head_dim", self.head_dim,
           f"a positive integer, or 0 only if num_heads={self.num_heads} divides "
           f"d_model={self.d_model}")
    if self.dh % 2:
      fail("head_dim", self.head_dim,
           f"an even number (RoPE rotates pairs); d_model / num_heads = {self.dh} is odd")
    if self.activation not in ACTIVATIONS:
      fail("activation", self.activation, tuple(ACTIVATIONS))
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in DTYPES:
        fail(field, getattr(self, field), DTYPES)
    if self.attention not in ATTENTIONS:
      fail("attention", self.attention, ATTENTIONS)
    if self.remat not in REMATS:
      fail("remat", self.remat, tuple(REMATS))
    if self.scan_layers not in (True, False):
      fail("scan_layers", self.scan_layers, "True or False")
    object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
    # Stored as sorted (key, value) pairs: the config is a static (hashed) attribute of the model.
    moe = dict(self.moe or {})
    object.__setattr__(self, "moe", tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in moe.items())) or None)
    bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
    if bad:
      fail("moe_layers", self.moe_layers, f"layer indices in [0, {self.num_layers})")
    if self.moe_layer_indices and not self.moe:
      fail("moe", self.moe, "a dict of MoEConfig fields when any layer is MoE")
    if self.scan_layers and (not self.scan_period or self.num_layers % self.scan_period):
      fail("scan_layers", self.scan_layers,
           "False unless the layers repeat: a dense model, or moe_every dividing num_layers="
           f"{self.num_layers} (explicit moe_layers are not scanned)")
    if self.moe_layer_indices:
      try:
        self.moe_config()  # MoEConfig validates its own fields (ValueError).
      except FieldError as e:  # Name the field as the user writes it on the command line.
        raise e.under("config.model.moe") from None

  @property
  def scan_period(self) -> int:
    """Blocks per scanned unit: 1 for a dense model or MoE in every layer, `moe_every` for
    every-n-th-layer MoE (each unit = n-1 dense blocks + 1 MoE block)."""
    if not self.moe_layer_indices:
      return 1
    return 0 if self.moe_layers else self.moe_every  # 0: explicit moe_layers, not scannable

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def moe_layer_indices(self) -> tuple[int, ...]:
    if self.moe_layers:
      return tuple(sorted(set(self.moe_layers)))
    if self.moe_every:
      return tuple(i for i in range(self.num_layers) if i % self.moe_every == self.moe_every - 1)
    return ()

  def moe_config(self, **overrides):
    return MoEConfig(**{**dict(self.moe or {}), **overrides})


def _dense_init(fan_in_axes: tuple[int, ...]):
  """Truncated-normal fan-in init (std 1/sqrt(fan_in)), fan-in over `fan_in_axes`."""
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                           in_axis=fan_in_axes, out_axis=-1)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32 (bfloat16 mean-of-squares loses too many bits)."""

  def __init__(self, d: int, eps: float, dtype, param_dtype):
    self.scale = param(jnp.ones((d,), param_dtype), ("norm",))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x_BLNd: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) at integer `positions_BL`, in float32."""
  d = x_BLNd.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
  # [B, L, 1, d/2]: one angle per position and frequency, broadcast over the heads.
  angle = (positions_BL.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x = x_BLNd.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BLNd.dtype)


class Attention(nnx.Module):
  """Causal (document-causal) self-attention with RoPE; grouped-query when N < H."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    D, H, N, d = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dh
    pd = jnp.dtype(cfg.param_dtype)
    self.wq_DHd = param(_dense_init((0,))(rngs.params(), (D, H, d), pd),
                        ("embed", "heads", "head_dim"))
    self.wk_DNd = param(_dense_init((0,))(rngs.params(), (D, N, d), pd),
                        ("embed", "kv_heads", "head_dim"))
    self.wv_DNd = param(_dense_init((0,))(rngs.params(), (D, N, d), pd),
                        ("embed", "kv_heads", "head_dim"))
    self.wo_HdD = param(_dense_init((0, 1))(rngs.params(), (H, d, D), pd),
                        ("heads", "head_dim", "embed"))
    self.cfg = cfg

  def _project(self, x_BLD, positions_BL):
    """Queries `[B, L, H, d]`, keys and values `[B, L, N, d]`, RoPE applied to q and k."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q_BLHd = jnp.einsum("BLD,DHd->BLHd", x_BLD, self.wq_DHd[...].astype(dt))
    k_BLNd = jnp.einsum("BLD,DNd->BLNd", x_BLD, self.wk_DNd[...].astype(dt))
    v_BLNd = jnp.einsum("BLD,DNd->BLNd", x_BLD, self.wv_DNd[...].astype(dt))
    return (rope(q_BLHd, positions_BL, cfg.rope_theta), rope(k_BLNd, positions_BL, cfg.rope_theta),
            v_BLNd)

  def _attend(self, q_BLHd, k_BMNd, v_BMNd, visible_BLM):
    """Softmax attention of L queries over M keys where `visible_BLM`; returns `[B, L, D]`."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    B, L = q_BLHd.shape[:2]
    N, R, d = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.dh
    if cfg.attention == "dot_product":  # XLA or cuDNN; GQA and the mask as below.
      out_BLHd = jax.nn.dot_product_attention(q_BLHd, k_BMNd, v_BMNd,
                                              mask=visible_BLM[:, None, :, :])
      return jnp.einsum("BLHd,HdD->BLD", out_BLHd.astype(dt), self.wo_HdD[...].astype(dt))
    if R == 1:  # Multi-head: 4-D einsums. The same math as the grouped form below, and 16%
      # faster fwd+bwd on XLA:CPU (whose layouts for the 5-D form cost transposes; measured
      # on B=16, L=128, H=4, d=32: 24.4 vs 29.0 ms, docs/training.md).
      logits_BHLM = jnp.einsum("BLHd,BMHd->BHLM", q_BLHd, k_BMNd,
                               preferred_element_type=jnp.float32) / math.sqrt(d)
      logits_BHLM = jnp.where(visible_BLM[:, None], logits_BHLM, -1e30)
      probs_BHLM = jax.nn.softmax(logits_BHLM, axis=-1).astype(dt)
      out_BLHd = jnp.einsum("BHLM,BMHd->BLHd", probs_BHLM, v_BMNd)
      return jnp.einsum("BLHd,HdD->BLD", out_BLHd, self.wo_HdD[...].astype(dt))
    q_BLNRd = q_BLHd.reshape(B, L, N, R, d)
    logits_BNRLM = jnp.einsum("BLNRd,BMNd->BNRLM", q_BLNRd, k_BMNd,
                              preferred_element_type=jnp.float32) / math.sqrt(d)
    logits_BNRLM = jnp.where(visible_BLM[:, None, None], logits_BNRLM, -1e30)
    probs_BNRLM = jax.nn.softmax(logits_BNRLM, axis=-1).astype(dt)
    out_BLNRd = jnp.einsum("BNRLM,BMNd->BLNRd", probs_BNRLM, v_BMNd)
    return jnp.einsum("BLHd,HdD->BLD", out_BLNRd.reshape(B, L, N * R, d),
                      self.wo_HdD[...].astype(dt))

  def __call__(self, x_BLD, positions_BL, segment_ids_BL):
    L = x_BLD.shape[1]
    q_BLHd, k_BLNd, v_BLNd = self._project(x_BLD, positions_BL)
    # Document-causal: key m is visible from query l iff m <= l and both are in the same document.
    # (Causal order within a packed row is only right if `positions` restart per document, which
    # is what RoPE gets; the mask itself uses only the row index and `segment_ids`.)
    visible_LM = jnp.tril(jnp.ones((L, L), bool))
    visible_BLM = visible_LM[None] & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
    return self._attend(q_BLHd, k_BLNd, v_BLNd, visible_BLM)

  def decode(self, x_BTD, positions_BT, segment_ids_BT, cache_segment_ids_BM, k_BMNd, v_BMNd,
             index):
    """T new tokens written at cache columns `[index, index + T)`; they attend to the cached
    columns before them and to each other, causally and within their document (the same mask as
    `__call__` on the whole row). `cache_segment_ids_BM` already holds the new tokens' ids.
    Returns `(out_BTD, k_BMNd, v_BMNd)` with the new keys and values written in."""
    T, M = x_BTD.shape[1], k_BMNd.shape[1]
    q_BTHd, k_BTNd, v_BTNd = self._project(x_BTD, positions_BT)
    k_BMNd = jax.lax.dynamic_update_slice_in_dim(k_BMNd, k_BTNd.astype(k_BMNd.dtype), index, 1)
    v_BMNd = jax.lax.dynamic_update_slice_in_dim(v_BMNd, v_BTNd.astype(v_BMNd.dtype), index, 1)
    visible_TM = jnp.arange(M)[None, :] <= index + jnp.arange(T)[:, None]
    same_doc_BTM = segment_ids_BT[:, :, None] == cache_segment_ids_BM[:, None, :]
    visible_BTM = visible_TM[None] & same_doc_BTM
    return self._attend(q_BTHd, k_BMNd, v_BMNd, visible_BTM), k_BMNd, v_BMNd


class MLP(nnx.Module):
  """Dense feed-forward; gated (SwiGLU/GeGLU) or plain (GELU/ReLU). Returns (y, None)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    D, F, pd = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
    self.act, self.gated = ACTIVATIONS[cfg.activation]
    self.w_up_DF = param(_dense_init((0,))(rngs.params(), (D, F), pd), ("embed", "mlp"))
    if self.gated:
      self.w_gate_DF = param(_dense_init((0,))(rngs.params(), (D, F), pd), ("embed", "mlp"))
    self.w_down_FD = param(_dense_init((0,))(rngs.params(), (F, D), pd), ("mlp", "embed"))
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_BLD, mask_BL=None):
    dt = self.dtype
    h_BLF = x_BLD @ self.w_up_DF[...].astype(dt)
    if self.gated:
      h_BLF = self.act(x_BLD @ self.w_gate_DF[...].astype(dt)) * h_BLF
    else:
      h_BLF = self.act(h_BLF)
    return h_BLF @ self.w_down_FD[...].astype(dt), None


class Block(nnx.Module):
  """Pre-norm transformer block; `ffn` is an `MLP` or a `moejax.moe.MoELayer`."""

  def __init__(self, cfg: TransformerConfig, is_moe: bool, *, rngs: nnx.Rngs):
    dt, pd = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt, pd)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt, pd)
    self.is_moe = is_moe
    if is_moe:  # The seam to the MoE layer (contract: y_BLD, aux = layer(x_BLD, mask_BL)).
      self.ffn = MoELayer(cfg.moe_config(), cfg.d_model, dtype=dt, param_dtype=pd, rngs=rngs)
    else:
      self.ffn = MLP(cfg, rngs=rngs)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL, mask_BL, step_balance=None,
               routes_BLK=None, gates_BLK=None, **moe_kwargs):
    """`moe_kwargs`: the MoE FFN's call variants (`deterministic`, `capacity_factor`,
    `record_routing`); a dense FFN has none."""
    x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL)
    if self.is_moe:
      y_BLD, aux = self.ffn(self.ffn_norm(x_BLD), mask_BL, step_balance=step_balance,
                            routes_BLK=routes_BLK, gates_BLK=gates_BLK, **moe_kwargs)
    else:
      y_BLD, aux = self.ffn(self.ffn_norm(x_BLD), mask_BL)
    return x_BLD + y_BLD, aux

  def decode(self, x_BTD, positions_BT, segment_ids_BT, cache_segment_ids_BM, k_BMNd, v_BMNd,
             index, group_size, capacity_factor=None):
    """`__call__` for T new tokens against the KV cache, in eval mode (decoding is inference); an
    MoE FFN routes them in groups of `group_size` tokens at `capacity_factor` (None: the eval
    factor). Returns `(x_BTD, k_BMNd, v_BMNd, aux)`: the MoE layer's `MoEAux` (its `routes`,
    `gates`, `kept` per token), None for a dense block."""
    out_BTD, k_BMNd, v_BMNd = self.attn.decode(self.attn_norm(x_BTD), positions_BT,
                                               segment_ids_BT, cache_segment_ids_BM, k_BMNd,
                                               v_BMNd, index)
    x_BTD = x_BTD + out_BTD
    mask_BT = segment_ids_BT != 0
    if self.is_moe:
      y_BTD, aux = self.ffn(self.ffn_norm(x_BTD), mask_BT, group_size=group_size,
                            capacity_factor=capacity_factor, deterministic=True)
    else:
      y_BTD, aux = self.ffn(self.ffn_norm(x_BTD), mask_BT)
    return x_BTD + y_BTD, k_BMNd, v_BMNd, aux


def _stack_units(blocks: list[Block], period: int) -> nnx.List:
  """`period` blocks whose every Variable holds the values of layers j, j+period, j+2*period,
  ... stacked on a new leading axis (sharding metadata gets a leading None). Each unit's RNG
  streams are folded with the unit index, so the layers draw distinct routing noise."""
  units = [nnx.List(blocks[u:u + period]) for u in range(0, len(blocks), period)]
  graphdef = nnx.graphdef(units[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(unit) for unit in units))
  out = nnx.merge(graphdef, stacked)
  mesh = jax.sharding.get_abstract_mesh()
  for _, node in nnx.iter_graph(out):
    if isinstance(node, nnx.RngKey):
      node.set_value(jax.vmap(jax.random.fold_in)(node.get_value(), jnp.arange(len(units))))
    elif isinstance(node, nnx.Variable) and node.get_metadata().get("out_sharding"):
      spec = (None, *node.get_metadata()["out_sharding"])
      node.set_metadata("out_sharding", spec)
      if "logical_axes" in node.get_metadata():
        node.set_metadata("logical_axes", ("layers", *node.get_metadata()["logical_axes"]))
      if not mesh.empty:
        node.set_value(jax.lax.with_sharding_constraint(node.get_value(), P(*spec)))
  return out


def _call_block(block: Block, x_BLD, positions_BL, segment_ids_BL, mask_BL, step_balance=None,
                routes_BLK=None, gates_BLK=None, **moe_kwargs):
  return block(x_BLD, positions_BL, segment_ids_BL, mask_BL, step_balance, routes_BLK, gates_BLK,
               **moe_kwargs)


@struct.dataclass
class KVCache:
  """Keys and values of every attention layer for incremental decoding (`Transformer.decode`).

  `k[i]`, `v[i]`: layer i's `[B, M, N, d]` (RoPE already applied to k); `segment_ids_BM`: the
  document id of each filled column (0 = padding or not yet written); `index`: columns
  `[0, index)` are filled.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segment_ids_BM: jax.Array
  index: jax.Array


class Transformer(nnx.Module):
  """The decoder-only LM. `__call__` returns `(logits_BLV float32, {layer_index: MoE aux})`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pd = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    # N(0, 1) embeddings: the first RMSNorm rescales them anyway; the tied head divides by
    # sqrt(D) so initial logits are O(1) (T5 convention).
    self.embed_VD = param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pd),
                          ("vocab", "embed"))
    moe_layers = set(cfg.moe_layer_indices)
    blocks = [Block(cfg, i in moe_layers, rngs=rngs) for i in range(cfg.num_layers)]
    if cfg.scan_layers:  # The same weights as unrolled, stacked: `units[j]` is layers j, j+p, ...
      self.units = _stack_units(blocks, cfg.scan_period)
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dt, pd)
    if not cfg.tie_embeddings:
      self.head_DV = param(_dense_init((0,))(rngs.params(), (cfg.d_model, cfg.vocab_size), pd),
                           ("embed", "vocab"))

  def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None, mask_BL: jax.Array | None = None, *,
               moe_step_balance: dict[int, routing.StepBalance] | None = None,
               moe_routes: dict[int, jax.Array] | None = None,
               moe_gates: dict[int, jax.Array] | None = None,
               deterministic: bool | None = None, moe_capacity_factor: float | None = None,
               moe_record_routing: bool = False):
    """`mask_BL` marks real tokens for the MoE layers (padding takes no capacity, no loss).
    Call variants, passed to every MoE layer (`MoELayer.__call__`): `deterministic` (default:
    `model.eval()` / `model.train()`), `moe_capacity_factor` (e.g. `math.inf`: no-drop eval),
    `moe_record_routing` (sow each layer's routing; not with scanned layers).
    `moe_step_balance` `{layer index: StepBalance}`: the optimizer step's f for each MoE layer's
    `batch`-scope balance losses (gradient accumulation; `moejax.train` counts it).
    `moe_routes` `{layer index: int [B, L, K]}`: routing replay, one entry per MoE layer (e.g.
    `{i: aux.routes for i, aux in moe_aux.items()}` of an earlier call); see `MoELayer`.
    `moe_gates` `{layer index: float [B, L, K]}` (needs `moe_routes`, the same layers): replay
    the recorded gates too (`aux.gates`). Both work with scanned layers."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    B, L = tokens_BL.shape
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((B, L), jnp.int32)
    x_BLD = constrain(jnp.take(self._embedding_table(), tokens_BL, axis=0).astype(dt), ACTIVATION)
    # The variants are static (they set shapes and which ops run): closed over, never traced.
    run = functools.partial(_call_block, deterministic=deterministic,
                            capacity_factor=moe_capacity_factor, record_routing=moe_record_routing)
    if self.cfg.remat != "none":  # Recompute the block in the backward pass, by the policy.
      run = nnx.remat(run, policy=REMATS[self.cfg.remat], prevent_cse=True)
    step_balance = moe_step_balance or {}
    layers = sorted(cfg.moe_layer_indices)
    for name, given in (("moe_routes", moe_routes), ("moe_gates", moe_gates)):
      if given is not None and sorted(given) != layers:
        raise ValueError(f"{name} for layers {sorted(given)}; allowed: one entry per MoE "
                         f"layer, {layers} (routes of another model?).")
    if moe_gates is not None and moe_routes is None:
      raise ValueError("moe_gates without moe_routes; allowed: recorded gates only together "
                       "with the recorded experts they belong to.")
    routes, gates = moe_routes or {}, moe_gates or {}
    if cfg.scan_layers:
      if moe_record_routing:
        raise ValueError("moe_record_routing needs model.scan_layers=False: a scanned model's "
                         "layers run inside jax.lax.scan, where sown values cannot be collected.")
      x_BLD, moe_aux = self._scan_units(run, x_BLD, positions_BL, segment_ids_BL, mask_BL,
                                        {"balance": step_balance, "routes": routes,
                                         "gates": gates})
      return self._logits(x_BLD), moe_aux
    moe_aux = {}
    for i, block in enumerate(self.blocks):
      x_BLD, aux = run(block, x_BLD, positions_BL, segment_ids_BL, mask_BL, step_balance.get(i),
                       routes.get(i), gates.get(i))
      x_BLD = constrain(x_BLD, ACTIVATION)
      if aux is not None:
        moe_aux[i] = aux
    return self._logits(x_BLD), moe_aux

  def _scan_units(self, run, x_BLD, positions_BL, segment_ids_BL, mask_BL, per_layer):
    """The layers as one `jax.lax.scan` over the stacked units (traced and compiled once, not
    once per layer); the units' updated state (routing RNG counters) is written back.
    `per_layer` `{"balance": {layer: StepBalance}, "routes": {layer: [B, L, K]}, "gates": ...}`
    enters the scan stacked like the weights."""
    graphdef, params, rest = nnx.split(self.units, nnx.Param, ...)
    p, n = len(self.units), self.cfg.num_layers // len(self.units)
    # {kind: {position j in the unit: the values of layers j, j+p, ... stacked}}.
    by_j = {kind: {j: jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *(values[u * p + j] for u in range(n)))
                   for j in range(p) if j in values}  # layer j is MoE iff j + p is
            for kind, values in per_layer.items()}

    def body(x_BLD, xs):
      unit_params, unit_rest, unit_by_j = xs
      unit = nnx.merge(graphdef, unit_params, unit_rest)
      auxes = {}
      for j, block in enumerate(unit):
        x_BLD, aux = run(block, x_BLD, positions_BL, segment_ids_BL, mask_BL,
                         unit_by_j["balance"].get(j), unit_by_j["routes"].get(j),
                         unit_by_j["gates"].get(j))
        x_BLD = constrain(x_BLD, ACTIVATION)
        if aux is not None:
          auxes[j] = aux
      return x_BLD, (nnx.state(unit, nnx.Not(nnx.Param)), auxes)

    x_BLD, (rest, auxes) = jax.lax.scan(body, x_BLD, (params, rest, by_j))
    nnx.update(self.units, rest)  # Parameters are read, never written.
    moe_aux = {u * p + j: jax.tree.map(lambda a, u=u: a[u], aux)
               for j, aux in auxes.items() for u in range(n)}
    return x_BLD, dict(sorted(moe_aux.items()))

  def layer_blocks(self) -> list[Block]:
    """One `Block` per layer, in order. For a scanned model these are read-only views of the
    stacked weights (what decoding uses; state they change is not written back)."""
    if not self.cfg.scan_layers:
      return list(self.blocks)
    graphdef, state = nnx.split(self.units)
    n = self.cfg.num_layers // len(self.units)
    return [block for u in range(n)
            for block in nnx.merge(graphdef, jax.tree.map(lambda a, u=u: a[u], state))]

  def update_selection_biases(self, selection_count: dict[int, jax.Array]) -> None:
    """Auxiliary-loss-free balancing after an optimizer step, from each MoE layer's step-wide
    selection counts `{layer index: [E]}` (see `MoELayer.update_selection_bias`)."""
    if not self.cfg.scan_layers:
      for i, block in enumerate(self.blocks):
        if block.is_moe:
          block.ffn.update_selection_bias(selection_count[i])
      return
    p, n = len(self.units), self.cfg.num_layers // len(self.units)
    for j, block in enumerate(self.units):
      if block.is_moe:  # The stacked layer's bias [n, E] from the counts of layers j, j+p, ...
        block.ffn.update_selection_bias(jnp.stack([selection_count[u * p + j]
                                                   for u in range(n)]))

  def _embedding_table(self) -> jax.Array:
    """`embed_VD` gathered over `fsdp` before the lookup (ZeRO-3), still split over `vocab`: a
    lookup straight from the fsdp-split table would give rows split over d_model."""
    return constrain(self.embed_VD[...], ("vocab", None))

  def _logits(self, x_BLD):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x_BLD = self.final_norm(x_BLD)
    if cfg.tie_embeddings:
      return jnp.einsum("BLD,VD->BLV", x_BLD, self.embed_VD[...].astype(dt),
                        preferred_element_type=jnp.float32) / math.sqrt(cfg.d_model)
    return jnp.einsum("BLD,DV->BLV", x_BLD, self.head_DV[...].astype(dt),
                      preferred_element_type=jnp.float32)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
    cfg = self.cfg
    zeros = lambda: jnp.zeros((batch, max_len, cfg.kv_heads, cfg.dh), jnp.dtype(cfg.dtype))
    layers = range(cfg.num_layers)
    return KVCache(k=tuple(zeros() for _ in layers), v=tuple(zeros() for _ in layers),
                   segment_ids_BM=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

  def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
             cache: KVCache, *, return_routes: bool = False,
             moe_capacity_factor: float | None = None):
    """The next T tokens of every row, attending to the cache: `(logits_BTV, cache)`.

    The same function as `__call__` on the whole row: `decode` of a prompt and then of one token
    at a time gives the logits `__call__` gives on the concatenation (`tests/test_generate.py`),
    as long as the MoE layers drop nothing. `segment_ids_BT == 0` marks padding (left padding of
    shorter prompts, finished rows): it takes no MoE capacity and only attends to other padding.
    MoE layers route the B * T new tokens, split evenly over the mesh's batch shards, as one group
    per shard (on one device: one group of the whole batch); `B` must divide over the shards.
    With `return_routes`, returns `(logits_BTV, cache, routes, gates)`: `{MoE layer: [B, T, K]}`
    of each token's experts and their gates (routing replay: `Transformer.__call__(...,
    moe_routes=routes, moe_gates=gates)`). Decoding is inference: the MoE layers run
    in eval mode (`deterministic=True`, whatever `model.train()` set), at
    `moe_capacity_factor` (None: the eval capacity factor; `math.inf`: no drop); it equals
    `__call__(..., deterministic=True, moe_capacity_factor=...)`.
    """
    B, T = tokens_BT.shape
    mesh = jax.sharding.get_abstract_mesh()
    shards = num_batch_shards(mesh)
    if B % shards:
      raise ValueError(f"decode batch of {B} rows: allowed a multiple of the {shards} batch "
                       f"shards of the mesh {dict(mesh.shape)} (pad with rows of segment id 0).")
    index = cache.index
    segment_ids_BM = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids_BM, segment_ids_BT,
                                                         index, 1)
    x_BTD = jnp.take(self._embedding_table(), tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))
    k_cache, v_cache, routes, gates = [], [], {}, {}
    for i, (block, k_BMNd, v_BMNd) in enumerate(zip(self.layer_blocks(), cache.k, cache.v)):
      x_BTD, k_BMNd, v_BMNd, aux = block.decode(
          x_BTD, positions_BT, segment_ids_BT, segment_ids_BM, k_BMNd, v_BMNd, index,
          B * T // shards, capacity_factor=moe_capacity_factor)
      k_cache.append(k_BMNd)
      v_cache.append(v_BMNd)
      if aux is not None:
        routes[i], gates[i] = aux.routes, aux.gates
    cache = KVCache(k=tuple(k_cache), v=tuple(v_cache), segment_ids_BM=segment_ids_BM,
                    index=index + T)
    if return_routes:
      return self._logits(x_BTD), cache, routes, gates
    return self._logits(x_BTD), cache

  def moe_layers(self) -> list[nnx.Module]:
    """The MoE FFN modules, in layer order."""
    blocks = self.units if self.cfg.scan_layers else self.blocks  # scanned: stacked layers
    return [b.ffn for b in blocks if b.is_moe]


# -------------------------------------------------------------------------------------------------
# Parameter and FLOP counting, without allocating anything (nnx.eval_shape).
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int            # Every parameter.
  active: int           # Used per token: non-expert + top_k / E of each MoE layer's experts.
  expert: int           # Expert parameters (the w_up / w_gate / w_down stacks of MoE layers).
  embedding: int        # Input embedding table (a lookup: no FLOPs).
  flops_per_token: int  # Training (fwd + bwd) FLOPs per token at `seq_len`, PaLM's formula.

  def summary(self) -> str:
    return (f"params: total {self.total / 1e6:,.2f}M, active/token {self.active / 1e6:,.2f}M "
            f"(experts {self.expert / 1e6:,.2f}M, embedding {self.embedding / 1e6:,.2f}M); "
            f"train FLOPs/token {self.flops_per_token / 1e6:,.2f}M")


def count_params(cfg: TransformerConfig, seq_len: int = 0) -> ParamCount:
  """Counts parameters of `Transformer(cfg)` from shapes only (works for 47B-param configs).

  FLOPs/token (training, PaLM appendix B): `6 * N + 12 * layers * H * d * seq_len`, where N is
  the active matmul parameters (active minus the embedding lookup and the norm scales; a tied
  head counts once as a matmul). Capacity padding and the router's softmax are not counted.
  `tests/test_model.py` checks it against the dot products of the traced forward pass.
  """
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  total = size(nnx.state(model, nnx.Param))
  expert = active_expert = 0
  for layer in model.moe_layers():
    moe = layer.cfg
    # Expert weights by name, not by shape: the router [D, E] must not count when D == E.
    n = sum(math.prod(getattr(layer, name).shape) for key, name in PARAM_OF_KEY.items()
            if key != "router" and hasattr(layer, name))
    expert += n
    active_expert += n * moe.top_k // moe.num_experts
  active = total - expert + active_expert
  embedding = cfg.vocab_size * cfg.d_model
  vectors = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
                if len(x.shape) < 2)  # Norm scales: parameters, but no matmul.
  matmul = active - embedding + (embedding if cfg.tie_embeddings else 0) - vectors
  flops = 6 * matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.dh * seq_len
  return ParamCount(total, active, expert, embedding, flops)


def masked_ce_sums(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum of the token cross-entropies, number of argmax-correct targets) over the positions where
  `mask_BL` is set: the one loss of the trainer and the evaluator (each divides by its count)."""
  mask_BL = mask_BL.astype(jnp.float32)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  correct = jnp.sum((jnp.argmax(logits_BLV, -1) == targets_BL) * mask_BL)
  return jnp.sum(ce_BL * mask_BL), correct
