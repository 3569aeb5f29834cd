"""Dropless experts (`MoEConfig(dispatch="dropless")`, `moejax.grouped`): equal to the capacity
path at no drop, batch invariant, and the grouped-matmul implementations agree."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import grouped, routing
from moejax.moe import MoEConfig, MoELayer

B, L, D, E, F = 4, 12, 7, 8, 6

# Every token-choice option whose dropless result must equal the no-drop capacity result.
CASES = {
    "top1_switch": dict(top_k=1, router_jitter=0.1),
    "top2_gshard_swiglu": dict(top_k=2, gate="gshard", activation="swiglu", z_loss_weight=1e-3,
                               gshard_loss_weight=0.1),
    "top2_after_drop_geglu": dict(top_k=2, gate="mixtral", renormalize="after_drop",
                                  activation="geglu", balance_loss_scope="batch"),
    "top2_random_policy": dict(top_k=2, gate="gshard", second_expert_policy="random"),
    "top3_threshold_gelu": dict(top_k=3, gate="gshard", second_expert_policy="threshold",
                                second_expert_threshold=0.3, activation="gelu"),
    "top3_sigmoid_shared": dict(top_k=3, score="sigmoid", gate="gshard", routed_scaling_factor=2.5,
                                num_shared_experts=2, shared_d_ff=3, balance_loss_choices="any"),
    "top4_groups_bias": dict(top_k=4, gate="gshard", score="sigmoid", num_expert_groups=4,
                             topk_groups=2, bias_update_rate=1e-3, balance_loss_choices="all"),
    "top2_balanced_router": dict(top_k=2, gate="gshard", router="balanced"),
}


def make_layer(kw, **extra):
  layer = MoELayer(MoEConfig(num_experts=E, d_ff=F, **kw, **extra), D, rngs=nnx.Rngs(0))
  if hasattr(layer, "expert_bias"):  # A trained-looking bias, so selection depends on it.
    layer.expert_bias[...] = jnp.linspace(-0.2, 0.2, E)
  return layer


def data(batch=B):
  x = jax.random.normal(jax.random.key(1), (batch, L, D))
  mask = jnp.ones((batch, L), bool).at[1, 7:].set(False).at[2, :3].set(False)
  return x, mask


def loss_fn(layer, x, mask):
  y, aux = layer(x, mask)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.metrics)


STEP = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def params(grads):
  return nnx.to_pure_dict(nnx.state(grads, nnx.Param))


# Every case with the CPU default (blocked); three with ragged_dot (what TPU/GPU run).
@pytest.mark.parametrize("case, impl", [(c, "auto") for c in CASES] + [
    (c, "ragged_dot") for c in ("top1_switch", "top2_gshard_swiglu", "top3_sigmoid_shared")])
def test_dropless_equals_capacity_at_no_drop(case, impl):
  """Outputs, aux loss, every metric and every gradient; float32 tolerances: 1e-5 relative on
  values, 1e-4 on gradients (the two paths sum the same products in another order)."""
  kw = CASES[case]
  (ref_loss, (ref_y, ref_m)), (ref_g, ref_gx) = STEP(
      make_layer(kw, capacity_factor=math.inf), *data())
  (loss, (y, m)), (g, gx) = STEP(make_layer(kw, dispatch="dropless", grouped_matmul=impl),
                                 *data())
  assert float(m.pop("ep_overflow_fraction")) == 0.0
  assert set(m) == set(ref_m)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), m, ref_m)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params(g), params(ref_g))
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-6)
  assert float(jnp.sum(m["dropped_fraction"])) == 0.0


def test_a_capacity_run_at_the_same_routing_does_drop():
  """The comparison above is not vacuous: at CF 1 the same layer drops, dropless does not."""
  _, (_, m) = STEP(make_layer(CASES["top2_gshard_swiglu"], capacity_factor=1.0), *data())[0]
  assert float(jnp.sum(m["dropped_fraction"])) > 0


def test_a_sequence_does_not_depend_on_its_batch_companions():
  """Batch invariance: a sequence alone and among random companions gets the same output (to
  1e-6 relative), in a layer whose capacity path would couple them (one routing group for the
  whole batch)."""
  kw = dict(top_k=2, gate="gshard", activation="swiglu", num_groups=1)
  layer = make_layer(kw, dispatch="dropless")
  forward = nnx.jit(lambda layer, x: layer(x, deterministic=True)[0])
  seq = jax.random.normal(jax.random.key(7), (1, L, D))
  alone = forward(layer, seq)
  for seed in range(3):
    others = jax.random.normal(jax.random.key(100 + seed), (5, L, D)) * (1 + seed)
    batch = jnp.concatenate([others[:2], seq, others[2:]])
    np.testing.assert_allclose(forward(layer, batch)[2], alone[0], rtol=1e-6, atol=1e-7)
  capacity = make_layer(kw, eval_capacity_factor=1.0)  # the capacity path is not invariant
  cap_forward = nnx.jit(lambda layer, x: layer(x, deterministic=True)[0])
  batch = jnp.concatenate([jax.random.normal(jax.random.key(9), (5, L, D)) * 3, seq])
  assert not np.allclose(cap_forward(capacity, batch)[5], cap_forward(capacity, seq)[0])


def reference_ffn(x_AD, weights, sizes, activation):
  """Row by row, each through its expert's FFN (numpy loop over groups)."""
  act, gated = grouped.ACTIVATIONS[activation]
  out, start = [], 0
  for e, n in enumerate(sizes):
    rows = x_AD[start:start + n]
    h = rows @ weights["wi"][e]
    h = act(rows @ weights["wi_gate"][e]) * h if gated else act(h)
    out.append(h @ weights["wo"][e])
    start += n
  out.append(jnp.zeros((x_AD.shape[0] - start, x_AD.shape[1])))
  return jnp.concatenate(out)


@pytest.mark.parametrize("impl, block_rows", [("blocked", None), ("blocked", 8), ("ragged_dot", None),
                                              ("auto", None), ("megablox", None)])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_grouped_ffn_implementations_agree(impl, block_rows, activation):
  """Values and gradients against a per-group loop, with empty experts and padding rows."""
  M, Dm, Fm, Em = 128, 16, 32, 6
  sizes = [20, 0, 33, 1, 0, 50]  # 104 rows in groups, 24 padding rows
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (M, Dm))
  weights = {"wi": jax.random.normal(keys[1], (Em, Dm, Fm)) / 4,
             "wo": jax.random.normal(keys[2], (Em, Fm, Dm)) / 6}
  if activation == "swiglu":
    weights["wi_gate"] = jax.random.normal(keys[3], (Em, Dm, Fm)) / 4
  sizes_E = jnp.array(sizes, jnp.int32)

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
  ours = lambda x, w: grouped.grouped_ffn(x, w, sizes_E, activation=activation, impl=impl,
                                          block_rows=block_rows)
  ref = lambda x, w: reference_ffn(x, w, sizes, activation)
  np.testing.assert_allclose(ours(x, weights), ref(x, weights), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(ours(x, weights)[104:]))) == 0.0
  got, want = jax.grad(loss(ours), (0, 1))(x, weights), jax.grad(loss(ref), (0, 1))(x, weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_blocked_layout_puts_every_expert_at_a_block_boundary():
  sizes = jnp.array([5, 0, 9, 4], jnp.int32)
  dest_A, source, expert_Z = grouped.blocked_layout(sizes, 20, 4)
  assert expert_Z.shape == (5 + 4,)  # ceil(20 / 4) + E blocks
  dest = np.asarray(dest_A)
  # Expert 0: rows 0-4 at positions 0-4 (blocks 0, 1); expert 2 starts at block 2; expert 3 at 5.
  np.testing.assert_array_equal(dest[:18], [0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                            20, 21, 22, 23])
  assert (dest[18:] == expert_Z.shape[0] * 4).all()  # padding rows go nowhere
  np.testing.assert_array_equal(np.asarray(expert_Z)[:6], [0, 0, 2, 2, 2, 3])
  np.testing.assert_array_equal(np.asarray(source)[dest[:18]], np.arange(18))


def test_forced_routers():
  shape = (3, 16, 2)
  balanced = routing.forced_choices("balanced", shape, 8)
  for j in range(2):  # every choice rank is balanced
    assert (np.bincount(np.asarray(balanced[0, :, j]), minlength=8) == 16 // 8).all()
  assert (balanced[..., 0] != balanced[..., 1]).all()
  rand = routing.forced_choices("random", shape, 8, key=jax.random.key(0))
  assert (rand[..., 0] != rand[..., 1]).all()
  assert len(np.unique(np.asarray(rand))) == 8
  # In the layer: the forced experts are used, and the router still gets a gradient.
  layer = make_layer(dict(top_k=2, gate="gshard", router="balanced"), dispatch="dropless")
  x = jax.random.normal(jax.random.key(1), (B, 16, D))
  (_, (_, m)), (g, _) = STEP(layer, x, None)
  np.testing.assert_allclose(m["router_load"], np.full(E, 1 / E), rtol=1e-6)
  np.testing.assert_allclose(m["expert_load"], np.full(E, 1 / E), rtol=1e-6)
  assert float(jnp.max(jnp.abs(g.router_DE[...]))) > 0
  # Gates are the router's scores at the forced experts, normalised over them (gshard).
  logits_SE = jax.random.normal(jax.random.key(4), (16, E))
  forced_SK = routing.forced_choices("balanced", (1, 16, 2), E)[0]
  r = routing.route_group(logits_SE, jnp.ones(16, bool), top_k=2, capacity=16, gate="gshard",
                          forced_expert_SK=forced_SK)
  probs_SK = jnp.take_along_axis(jax.nn.softmax(logits_SE), forced_SK, axis=-1)
  np.testing.assert_allclose(r.gate, probs_SK / probs_SK.sum(-1, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(r.expert, forced_SK)


@pytest.mark.parametrize("kw, match", [
    (dict(dispatch="dropless", capacity_factor=2.0), r"capacity_factor=2\.0 with dispatch='dropless'"),
    (dict(dispatch="dropless", eval_capacity_factor=math.inf), "eval_capacity_factor"),
    (dict(dispatch="dropless", priority="probability"), "priority='probability'"),
    (dict(dispatch="dropless", overflow="reroute"), "overflow='reroute'"),
    (dict(dispatch="dropless", choice="expert"), "choice='expert'"),
    (dict(dispatch="dropless", expert_dropout=0.1), "expert_dropout"),
    (dict(grouped_matmul="blocked"), "grouped_matmul='blocked' is a dropless option"),
    (dict(receive_buffer_factor=2.0), "receive_buffer_factor=2.0 is a dropless option"),
    (dict(dispatch="dropless", receive_buffer_factor=0.0), "receive_buffer_factor"),
    (dict(dispatch="dropless", ep_transport="fast"), "ep_transport='fast'"),
    (dict(router="balanced", overflow="reroute"), "overflow='reroute' with router='balanced'"),
    (dict(router="uniform"), "router='uniform'"),
])
def test_dropless_config_errors_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    MoEConfig(num_experts=8, top_k=2, gate="gshard", **kw)
