"""Model: shapes, causality, document masking, GQA, MoE placement, parameter counting."""


import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.model import Transformer, TransformerConfig, count_params

# Prime / odd sizes so a transposed axis cannot hide.
SMALL = dict(vocab_size=37, d_model=29, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=6,
             d_ff=41, tie_embeddings=False)
MOE = dict(num_experts=8, top_k=2, d_ff=13, activation="swiglu", gate="gshard")


def _tokens(B=2, L=11, V=37):
  return (jnp.arange(B * L).reshape(B, L) * 7) % V


def test_dense_forward_shapes_and_causality():
  model = Transformer(TransformerConfig(**SMALL), rngs=nnx.Rngs(0))
  tokens = _tokens()
  logits, aux = model(tokens)
  assert logits.shape == (2, 11, 37) and logits.dtype == jnp.float32 and aux == {}
  changed, _ = model(tokens.at[:, 6:].set(5))
  np.testing.assert_array_equal(changed[:, :6], logits[:, :6])  # The future cannot leak back.
  assert not np.allclose(changed[:, 6:], logits[:, 6:])


def test_document_causal_mask_matches_separate_documents():
  model = Transformer(TransformerConfig(**SMALL), rngs=nnx.Rngs(1))
  tokens = _tokens()
  segment_ids = jnp.array([[1] * 5 + [2] * 6] * 2)
  positions = jnp.array([list(range(5)) + list(range(6))] * 2)
  packed, _ = model(tokens, positions, segment_ids)
  alone, _ = model(tokens[:, 5:])
  np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_bfloat16_activations_keep_float32_params_and_logits():
  cfg = TransformerConfig(**{**SMALL, "dtype": "bfloat16", "tie_embeddings": True})
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  logits, _ = model(_tokens())
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("kwargs, expected", [
    (dict(moe_every=2), (1,)), (dict(moe_every=1), (0, 1, 2)), (dict(moe_layers=(0, 2)), (0, 2)),
    (dict(moe_every=0), ())])
def test_moe_placement(kwargs, expected):
  assert TransformerConfig(**SMALL, moe=MOE, **kwargs).moe_layer_indices == expected


def test_moe_model_on_expert_mesh():
  """Forward on the (data=2, expert=4) mesh: expert weights sharded, aux per MoE layer."""
  cfg = TransformerConfig(**SMALL, moe_every=2, moe=MOE)
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0, routing=1, dropout=2)))()
    assert model.blocks[1].ffn.w_up_EDF[...].sharding.spec[0] == "expert"
    tokens = jax.device_put(_tokens(B=8, L=7), sharding.batch_sharding(mesh))
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert logits.shape == (8, 7, 37)
  assert list(aux) == [1] and aux[1].metrics["expert_load"].shape == (8,)
  assert np.isfinite(float(aux[1].loss))


def test_count_matches_allocated_params():
  cfg = TransformerConfig(**SMALL, moe_every=2, moe=MOE)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  allocated = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  counts = count_params(cfg)
  expert = 3 * 8 * 29 * 13  # wi, wi_gate, wo of one MoE layer.
  assert counts.total == allocated
  assert counts.expert == expert
  assert counts.active == allocated - expert + expert * 2 // 8


def test_shared_experts_count_as_active_not_expert_parameters():
  cfg = TransformerConfig(**SMALL, moe_every=2, moe={**MOE, "num_shared_experts": 2,
                                                      "shared_d_ff": 5})
  plain = count_params(TransformerConfig(**SMALL, moe_every=2, moe=MOE))
  counts = count_params(cfg)
  shared = 3 * 29 * 2 * 5  # wi, wi_gate, wo of width 2 x 5 in the one MoE layer.
  assert counts.expert == plain.expert
  assert (counts.total, counts.active) == (plain.total + shared, plain.active + shared)


def test_count_does_not_mistake_the_router_for_an_expert():
  # With d_model == num_experts the router [D, E] has E as its first dim too.
  cfg = TransformerConfig(**{**SMALL, "d_model": 8, "num_heads": 2, "num_kv_heads": 1},
                          moe_every=2, moe={**MOE, "activation": "relu"})
  assert count_params(cfg).expert == 2 * 8 * 8 * 13  # wi and wo only


def test_mixtral_8x7b_param_count():
  """Mixtral 8x7B: ~46.7B total, ~12.9B active (REFERENCE.md), counted without allocating."""
  cfg = TransformerConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, d_ff=14336, activation="swiglu", tie_embeddings=False,
                          moe_every=1, moe=dict(num_experts=8, top_k=2, d_ff=14336,
                                                activation="swiglu", gate="mixtral"))
  counts = count_params(cfg, seq_len=4096)
  assert counts.total == pytest.approx(46.7e9, rel=0.005), counts
  assert counts.active == pytest.approx(12.9e9, rel=0.005), counts


def _dot_flops(jaxpr) -> int:
  """FLOPs of every dot_general in a jaxpr (recursing into sub-jaxprs): 2 * out size * contracted
  size. An independent count of what the forward pass multiplies."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in contract)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _dot_flops(sub)
  return total


@pytest.mark.parametrize("kwargs", [
    dict(tie_embeddings=True), dict(tie_embeddings=False),
    # MoE at CF 1 with S*k/E integral and sort dispatch: experts compute exactly k*T rows.
    dict(moe_every=2, moe={**MOE, "capacity_factor": 1.0, "dispatch": "sort"}),
    # Shared experts (DeepSeek-MoE): always active, counted as dense.
    dict(moe_every=2, moe={**MOE, "capacity_factor": 1.0, "dispatch": "sort",
                           "num_shared_experts": 2, "shared_d_ff": 5}),
])
def test_flops_per_token_equal_the_forward_pass_dot_products_times_three(kwargs):
  cfg = TransformerConfig(**{**SMALL, **kwargs})
  B, L = 2, 16
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = _tokens(B, L)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  ones = jnp.ones((B, L), jnp.int32)
  forward = lambda s: nnx.merge(graphdef, s)(tokens, positions, ones, ones.astype(bool))[0]
  traced = _dot_flops(jax.make_jaxpr(forward)(state).jaxpr) / (B * L)
  # The combine's gate-weighted sum over the k outputs is a (tiny) dot the formula leaves out.
  combine = sum(2 * cfg.d_model * cfg.moe_config().top_k for _ in cfg.moe_layer_indices)
  # Training = forward + backward (2x forward): 3x the forward's dot-product FLOPs.
  assert count_params(cfg, L).flops_per_token == pytest.approx(3 * (traced - combine), rel=1e-9)


@pytest.mark.parametrize("bad, field", [
    (dict(num_kv_heads=4), "num_kv_heads"), (dict(activation="swish"), "activation"),
    (dict(head_dim=5), "head_dim"), (dict(moe_layers=(3,)), "moe_layers"),
    (dict(dtype="float16"), "dtype")])
def test_config_errors_name_the_field(bad, field):
  with pytest.raises(ValueError, match=f"config.model.{field}="):
    TransformerConfig(**{**SMALL, **bad})


@pytest.mark.parametrize("shared", [0, 1])
def test_upcycled_model_computes_the_dense_function_at_step_0(shared):
  """Every expert a copy of the dense MLP, gates normalised over the selected experts, no drops:
  the MoE model's logits equal the dense model's (Komatsuzaki et al.: upcycling starts where the
  dense model is)."""
  from moejax import upcycle
  dense_cfg = TransformerConfig(**{**SMALL, "activation": "swiglu"})
  moe_cfg = TransformerConfig(**{**SMALL, "activation": "swiglu"}, moe_every=2,
                              moe={**MOE, "d_ff": SMALL["d_ff"], "capacity_factor": math.inf,
                                   "num_shared_experts": shared})  # shared: start silent
  dense = Transformer(dense_cfg, rngs=nnx.Rngs(0))
  moe = Transformer(moe_cfg, rngs=nnx.Rngs(1))
  tokens = _tokens()
  before, _ = moe(tokens)
  upcycle.upcycle(dense, moe)
  np.testing.assert_allclose(moe(tokens)[0], dense(tokens)[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(before, dense(tokens)[0])
  # With noise the experts differ from each other (and the function moves a little).
  noisy = Transformer(moe_cfg, rngs=nnx.Rngs(1))
  upcycle.upcycle(dense, noisy, noise=0.05, key=jax.random.key(0))
  wi = noisy.blocks[1].ffn.w_up_EDF[...]
  assert not np.allclose(wi[0], wi[1])
  # Another expert width: a clear error naming the parameter and both shapes.
  wide = Transformer(TransformerConfig(**{**SMALL, "activation": "swiglu"}, moe_every=2,
                                       moe={**MOE, "d_ff": 13}), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"'blocks/1/ffn/w_down_EFD' \(8, 13, 29\) has no dense "
                                       r"source of shape \(13, 29\): blocks/1/ffn/w_down_FD is "
                                       r"\(41, 29\)"):
    upcycle.upcycle(dense, wide)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_dot_product_attention_equals_the_einsum_attention(dtype, tol):
  """jax.nn.dot_product_attention with the document-causal mask (GQA: 6 query heads over 2 kv
  heads): the same logits as the explicit softmax, also in packed rows and in cached decoding."""
  cfgs = [TransformerConfig(**{**SMALL, "dtype": dtype, "attention": a})
          for a in ("einsum", "dot_product")]
  models = [Transformer(c, rngs=nnx.Rngs(0)) for c in cfgs]
  tokens = _tokens()
  segment_ids = jnp.array([[1] * 5 + [2] * 6] * 2)
  positions = jnp.array([list(range(5)) + list(range(6))] * 2)
  mask = jnp.ones_like(tokens, bool)
  out = [m(tokens, positions, segment_ids, mask)[0] for m in models]
  np.testing.assert_allclose(np.asarray(out[1], np.float32), np.asarray(out[0], np.float32),
                             rtol=tol, atol=tol)
  caches = [m.init_cache(2, 11) for m in models]
  steps = [m.decode(tokens, positions, segment_ids, c)[0] for m, c in zip(models, caches)]
  np.testing.assert_allclose(np.asarray(steps[1], np.float32), np.asarray(steps[0], np.float32),
                             rtol=tol, atol=tol)


def test_multi_head_attention_equals_the_grouped_query_form():
  """The multi-head fast path (4-D einsums, R = 1) against the grouped-query form (5-D): a model
  with 2 kv heads, each serving 2 query heads (R = 2), equals a 4-kv-head model whose kv weights
  repeat each head twice — logits and every gradient, in packed rows."""
  base = {**SMALL, "num_heads": 4, "head_dim": 8}
  grouped = Transformer(TransformerConfig(**{**base, "num_kv_heads": 2}), rngs=nnx.Rngs(0))
  multi = Transformer(TransformerConfig(**{**base, "num_kv_heads": 4}), rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(grouped, nnx.Param))
  multi_state = nnx.to_pure_dict(nnx.state(multi, nnx.Param))

  def copy(src, dst):
    for key, value in src.items():
      if isinstance(value, dict):
        copy(value, dst[key])
      elif key in ("wk_DNd", "wv_DNd"):
        dst[key] = jnp.repeat(value, 2, axis=1)  # query heads 2j, 2j+1 read kv head j
      else:
        dst[key] = value
  copy(state, multi_state)
  nnx.update(multi, multi_state)
  tokens = _tokens()
  segment_ids = jnp.array([[1] * 5 + [2] * 6] * 2)
  positions = jnp.array([list(range(5)) + list(range(6))] * 2)
  mask = jnp.ones_like(tokens, bool)

  def loss(model):
    return jnp.sum(jnp.sin(model(tokens, positions, segment_ids, mask)[0]))
  np.testing.assert_allclose(loss(multi), loss(grouped), rtol=1e-5)
  g_multi = nnx.to_pure_dict(nnx.grad(loss)(multi))
  g_grouped = nnx.to_pure_dict(nnx.grad(loss)(grouped))
  for layer, block in g_grouped["blocks"].items():
    for name in ("wq_DHd", "wo_HdD"):
      np.testing.assert_allclose(g_multi["blocks"][layer]["attn"][name],
                                 block["attn"][name], rtol=1e-4, atol=2e-5)
    for name in ("wk_DNd", "wv_DNd"):  # the repeated heads' gradients add up to the shared one
      summed = g_multi["blocks"][layer]["attn"][name].reshape(*block["attn"][name].shape[:1], 2,
                                                              2, -1).sum(2)
      np.testing.assert_allclose(summed, block["attn"][name], rtol=1e-4, atol=2e-5)
