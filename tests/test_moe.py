"""The NNX MoE layer: exactness properties, dispatch equivalence, gradients, errors."""

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import moe
from moejax.moe import MoEConfig, MoELayer

D = 7  # odd sizes so that shape mix-ups cannot hide


def make(cfg, d_model=D, seed=0, **kw):
  return MoELayer(cfg, d_model, rngs=nnx.Rngs(params=seed, routing=seed + 1, dropout=seed + 2),
                  **kw)


def inputs(B=2, L=11, d_model=D, seed=3):
  return jax.random.normal(jax.random.key(seed), (B, L, d_model))


def naive_ffn(layer, x_D, e):
  w = layer.weights()
  h = x_D @ w["wi"][e]
  if layer.cfg.activation == "swiglu":
    h = jax.nn.silu(x_D @ w["wi_gate"][e]) * h
  elif layer.cfg.activation == "geglu":
    h = jax.nn.gelu(x_D @ w["wi_gate"][e]) * h
  elif layer.cfg.activation == "relu":
    h = jax.nn.relu(h)
  else:
    h = jax.nn.gelu(h)
  return h @ w["wo"][e]


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu"])
def test_no_drop_all_experts_equals_dense_mixture(activation):
  E = 5
  cfg = MoEConfig(num_experts=E, top_k=E, d_ff=6, activation=activation,
                  capacity_factor=moe.NO_DROP, eval_capacity_factor=moe.NO_DROP)
  layer = make(cfg)
  x = inputs()
  y, aux = layer(x)
  probs = jax.nn.softmax(jnp.einsum("BLD,DE->BLE", x, layer.router_DE[...]), axis=-1)
  expected = np.zeros(x.shape, np.float32)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for e in range(E):
        expected[b, t] += np.asarray(probs[b, t, e] * naive_ffn(layer, x[b, t], e))
  np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-6)
  assert float(jnp.sum(aux.metrics["dropped_fraction"])) == 0.0


def test_expert_choice_without_capacity_limit_is_the_dense_mixture():
  """C = S (no-drop factor): every expert takes every token, so the output is the probability-
  weighted sum of all experts, as token choice with top_k=E and raw softmax gates."""
  kw = dict(num_experts=5, d_ff=6, capacity_factor=moe.NO_DROP, eval_capacity_factor=moe.NO_DROP)
  ec = make(MoEConfig(choice="expert", top_k=1, **kw))
  tc = make(MoEConfig(top_k=5, **kw))
  x = inputs()
  np.testing.assert_allclose(ec(x)[0], tc(x)[0], rtol=2e-5, atol=2e-6)


def test_expert_choice_gives_each_expert_exactly_c_tokens():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, choice="expert", capacity_factor=1.0,
                  eval_capacity_factor=1.0)
  layer = make(cfg)
  x = inputs(B=2, L=12)
  _, sown = nnx.capture(lambda m: m(x, record_routing=True), nnx.Intermediate)(layer)
  (topk,), (kept,) = sown["router_topk"].get_value(), sown["router_kept"].get_value()
  C = cfg.capacity(12, deterministic=False)
  assert C == 6  # ceil(2 * 1.0 * 12 / 4)
  for b in range(2):  # One group per sequence: each expert picks C of its 12 tokens.
    counts = np.bincount(np.asarray(topk[b])[np.asarray(kept[b])], minlength=4)
    np.testing.assert_array_equal(counts, [C] * 4)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_shared_experts_add_the_sum_of_their_ffns_to_every_token(activation):
  """num_shared_experts=2 of width 3: y = routed output + FFN_1(x) + FFN_2(x), where FFN_i uses
  hidden units [3i, 3i+3) of the one wide shared FFN; padding gets nothing from them."""
  cfg = MoEConfig(num_experts=4, top_k=1, d_ff=6, activation=activation, capacity_factor=1.0)
  shared_cfg = dataclasses.replace(cfg, num_shared_experts=2, shared_d_ff=3)
  layer, shared_layer = make(cfg), make(shared_cfg)
  for name in ("router_DE", "w_up_EDF", "w_gate_EDF", "w_down_EFD"):  # Same routed part.
    if hasattr(layer, name):
      getattr(shared_layer, name)[...] = getattr(layer, name)[...]
  x = inputs()
  mask = jnp.ones(x.shape[:2], bool).at[1, 8:].set(False)
  y, _ = layer(x, mask)
  y_shared, _ = shared_layer(x, mask)
  w = {k: v[0] for k, v in shared_layer.shared_weights().items()}
  assert w["wi"].shape == (D, 6)
  expected = np.asarray(y)
  for i in range(2):
    cols = slice(3 * i, 3 * i + 3)
    h = x @ w["wi"][:, cols]
    h = jax.nn.silu(x @ w["wi_gate"][:, cols]) * h if activation == "swiglu" else jax.nn.relu(h)
    expected = expected + np.asarray(h @ w["wo"][cols]) * np.asarray(mask)[..., None]
  np.testing.assert_allclose(y_shared, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dispatch", ["sort", "onehot"])
def test_dropped_tokens_get_exactly_zero_and_kept_tokens_their_experts(dispatch):
  cfg = MoEConfig(num_experts=3, top_k=1, d_ff=5, capacity_factor=0.5, dispatch=dispatch)
  layer = make(cfg)
  x = inputs(B=1, L=13)
  y, aux = layer(x)
  logits = jnp.einsum("GSD,DE->GSE", x, layer.router_DE[...])
  r = moe.routing.route(logits, jnp.ones((1, 13), bool), top_k=1, capacity=3)
  assert float(aux.metrics["dropped_fraction"][0]) > 0
  for t in range(13):
    if r.kept[0, t, 0]:
      want = r.gate[0, t, 0] * naive_ffn(layer, x[0, t], int(r.expert[0, t, 0]))
      np.testing.assert_allclose(y[0, t], want, rtol=2e-5, atol=1e-6)
    else:
      assert np.all(np.asarray(y[0, t]) == 0.0)


CONFIGS = [
    dict(top_k=1),
    dict(top_k=2, gate="gshard"),
    dict(top_k=2, gate="gshard", renormalize="after_drop", priority="probability"),
    dict(top_k=3, gate="mixtral", overflow="reroute", activation="swiglu"),
    dict(top_k=2, second_expert_policy="threshold", second_expert_threshold=0.4),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_sort_and_onehot_dispatch_agree_on_outputs_and_grads(kw):
  cfg = MoEConfig(num_experts=5, d_ff=6, capacity_factor=0.8, group_size=11, **kw)
  sort_layer = make(cfg)
  onehot_layer = make(dataclasses.replace(cfg, dispatch="onehot"))
  x = inputs(B=2, L=11)
  mask = jnp.ones((2, 11), bool).at[1, 7:].set(False)

  def loss(layer, x):
    y, aux = layer(x, mask)
    return jnp.sum(jnp.sin(y)) + aux.loss, aux.metrics

  (l1, m1), g1 = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(sort_layer, x)
  (l2, m2), g2 = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(onehot_layer, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), m1, m2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(nnx.state(g1[0], nnx.Param)),
               nnx.to_pure_dict(nnx.state(g2[0], nnx.Param)))
  np.testing.assert_allclose(g1[1], g2[1], rtol=1e-4, atol=1e-6)


def test_gradients_reach_router_and_every_used_expert():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", balance_loss_weight=0.0)
  layer = make(cfg)
  x = inputs(B=4, L=11)
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  assert float(jnp.linalg.norm(grads.router_DE[...])) > 0
  per_expert = jnp.sqrt(jnp.sum(grads.w_up_EDF[...] ** 2, axis=(1, 2)))
  assert bool(jnp.all(per_expert > 0)), per_expert
  # The balance loss alone and the z-loss alone each train the router.
  for weights in (dict(balance_loss_weight=1e-2), dict(balance_loss_weight=0.0, z_loss_weight=1e-3)):
    aux_layer = make(MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", **weights))
    g_aux = nnx.grad(lambda m: m(x)[1].loss)(aux_layer)
    assert float(jnp.linalg.norm(g_aux.router_DE[...])) > 0, weights
    assert float(jnp.linalg.norm(g_aux.w_up_EDF[...])) == 0.0  # aux losses never touch the experts


@pytest.mark.parametrize("dispatch", ["sort", "onehot"])
def test_padding_changes_nothing_for_other_tokens(dispatch):
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, capacity_factor=0.75, gate="gshard",
                  z_loss_weight=1e-3, dispatch=dispatch)
  layer = make(cfg)
  x = inputs(B=2, L=11)
  mask = jnp.ones((2, 11), bool).at[0, 3].set(False).at[1, 8:].set(False)

  def run(layer, x):
    y, aux = layer(x, mask)
    return jnp.sum(jnp.where(mask[..., None], jnp.sin(y), 0.0)) + aux.loss, (y, aux.metrics)

  grad = nnx.value_and_grad(run, argnums=(0, 1), has_aux=True)
  (l1, (y1, m1)), (g1, gx1) = grad(layer, x)
  # Different content at the padded positions -- even NaN, as a fully masked attention row can
  # produce: the real tokens' outputs, losses, statistics and all gradients must not move.
  for junk in (100.0 * jax.random.normal(jax.random.key(9), x.shape), jnp.full(x.shape, jnp.nan)):
    x2 = jnp.where(mask[..., None], x, junk)
    (l2, (y2, m2)), (g2, gx2) = grad(layer, x2)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    np.testing.assert_allclose(y1[mask], y2[mask], rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, m1, m2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 nnx.to_pure_dict(nnx.state(g1, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(g2, nnx.Param)))
    np.testing.assert_allclose(gx1, gx2, rtol=1e-6)
  assert np.all(np.asarray(y1[~mask]) == 0.0)
  assert float(m1["tokens"]) == float(jnp.sum(mask))


def test_fully_padded_batch_gives_zero_output_and_finite_losses():
  layer = make(MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", z_loss_weight=1e-3))
  x = inputs(B=2, L=5)
  mask = jnp.zeros((2, 5), bool)
  y, aux = layer(x, mask)
  assert np.all(np.asarray(y) == 0.0)
  assert float(aux.loss) == 0.0 and float(aux.metrics["tokens"]) == 0.0
  grads = nnx.grad(lambda m: m(x, mask)[1].loss + jnp.sum(m(x, mask)[0]))(layer)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_eval_is_deterministic_and_training_randomness_is_used():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, router_jitter=0.3, expert_dropout=0.3,
                  second_expert_policy="random", gate="gshard")
  layer = make(cfg)
  x = inputs()
  e1, _ = layer(x, deterministic=True)
  e2, _ = layer(x, deterministic=True)
  np.testing.assert_array_equal(e1, e2)
  t1, _ = layer(x)
  t2, _ = layer(x)
  assert not np.allclose(t1, t2)
  layer.deterministic = True
  np.testing.assert_array_equal(layer(x)[0], e1)
  # The NNX train/eval switch reaches the layer inside a bigger model.
  model = nnx.List([make(cfg)])
  model.eval()
  assert model[0].deterministic
  model.train()
  assert not model[0].deterministic


def test_jit_matches_eager():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6, gate="gshard", capacity_factor=0.6)
  layer = make(cfg)
  x = inputs()
  y_eager, aux_eager = layer(x)
  y_jit, aux_jit = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(y_eager, y_jit, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_eager.loss, aux_jit.loss, rtol=1e-5)


def test_capacity_uses_train_eval_and_override_factors():
  cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0)
  assert cfg.capacity(16, deterministic=False) == 8  # ceil(2 * 1.0 * 16 / 4)
  assert cfg.capacity(16, deterministic=True) == 16
  assert cfg.capacity(16, deterministic=False, capacity_factor=math.inf) == 16
  assert MoEConfig(expert_capacity=3).capacity(16, deterministic=False) == 3
  layer = make(MoEConfig(num_experts=4, top_k=1, d_ff=6, capacity_factor=0.25))
  x = inputs(B=1, L=16)
  assert float(layer(x)[1].metrics["dropped_fraction"][0]) > 0
  assert float(layer(x, capacity_factor=math.inf)[1].metrics["dropped_fraction"][0]) == 0.0


def test_groups_split_tokens_as_configured():
  x = inputs(B=2, L=12)
  by_size = make(MoEConfig(num_experts=4, d_ff=6, capacity_factor=0.5, group_size=6))
  by_count = make(MoEConfig(num_experts=4, d_ff=6, capacity_factor=0.5, num_groups=4))
  per_sequence = make(MoEConfig(num_experts=4, d_ff=6, capacity_factor=0.5))
  y_size, _ = by_size(x)
  np.testing.assert_allclose(y_size, by_count(x)[0], rtol=1e-6)
  # One group of 12 (2 slots per expert) fills differently from two groups of 6 (1 slot each).
  assert not np.allclose(y_size, per_sequence(x)[0])


def test_bfloat16_activations_keep_a_float32_router():
  cfg = MoEConfig(num_experts=4, top_k=2, d_ff=6)
  layer = make(cfg, dtype=jnp.bfloat16)
  y, aux = layer(inputs())
  assert y.dtype == jnp.bfloat16
  assert aux.loss.dtype == jnp.float32
  low = make(MoEConfig(num_experts=4, top_k=2, d_ff=6, router_dtype=None), dtype=jnp.bfloat16)
  captured = {}
  orig = moe.routing.router_logits

  def spy(*a, **k):
    captured["logits"] = orig(*a, **k)
    return captured["logits"]

  moe.routing.router_logits = spy
  try:
    layer(inputs())
    assert captured["logits"].dtype == jnp.float32
    low(inputs())
    assert captured["logits"].dtype == jnp.bfloat16
  finally:
    moe.routing.router_logits = orig


def test_bfloat16_router_computes_softmax_and_gates_in_bfloat16():
  logits_SE = jax.random.normal(jax.random.key(0), (64, 8)) * 3
  valid_S = jnp.ones(64, bool)
  kw = dict(top_k=2, capacity=64, gate="gshard")
  r32 = moe.routing.route_group(logits_SE, valid_S, **kw)
  r16 = moe.routing.route_group(logits_SE.astype(jnp.bfloat16), valid_S, **kw)
  assert r32.probs.dtype == r32.gate.dtype == jnp.float32
  assert r16.probs.dtype == r16.gate.dtype == jnp.bfloat16
  # The bfloat16 softmax is the float32 one rounded at bfloat16 precision (8 bits of mantissa),
  # not float32 arithmetic on bfloat16 logits.
  p32_of_bf16 = jax.nn.softmax(logits_SE.astype(jnp.bfloat16).astype(jnp.float32), axis=-1)
  np.testing.assert_allclose(r16.probs.astype(jnp.float32), p32_of_bf16, rtol=2e-2, atol=1e-3)
  assert not np.array_equal(np.asarray(r16.probs.astype(jnp.float32)),
                            np.asarray(p32_of_bf16))
  # Losses and statistics are still float32 sums.
  sums = moe.routing.routing_sums(jax.tree.map(lambda a: a[None], r16), valid_S[None])
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(sums))


def test_switch_init_scale():
  layer = make(MoEConfig(num_experts=4, d_ff=512, router_init_scale=0.1, expert_init_scale=0.1),
               d_model=256)
  std = float(jnp.std(layer.w_up_EDF[...]))
  np.testing.assert_allclose(std, math.sqrt(0.1 / 256), rtol=0.05)
  np.testing.assert_allclose(float(jnp.std(layer.router_DE[...])), math.sqrt(0.1 / 256), rtol=0.1)
  assert float(jnp.max(jnp.abs(layer.w_up_EDF[...]))) <= 2.0 * math.sqrt(0.1 / 256) / 0.87962566 + 1e-6


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    (dict(num_experts=4, top_k=5), r"top_k=5.*\[1, num_experts=4\]"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0.*> 0"),
    (dict(eval_capacity_factor=-1.0), r"eval_capacity_factor=-1.0"),
    (dict(gate="switch"), r"gate='switch'.*'softmax' \| 'gshard' \| 'mixtral'"),
    (dict(priority="random"), r"priority='random'"),
    (dict(overflow="spill"), r"overflow='spill'"),
    (dict(second_expert_policy="sampling"), r"second_expert_policy='sampling'"),
    (dict(activation="tanh"), r"activation='tanh'"),
    (dict(dispatch="ragged"), r"dispatch='ragged'"),
    (dict(group_size=4, num_groups=2), r"group_size=4 and num_groups=2"),
    (dict(renormalize="never"), r"renormalize='never'"),
    (dict(capacity_convention="t5"), r"capacity_convention='t5'"),
    (dict(expert_dropout=1.0), r"expert_dropout=1.0"),
    (dict(top_k=1, gate="gshard"), r"gate='gshard' with top_k=1.*gate='softmax'"),
    (dict(top_k=2, renormalize="after_drop"), r"renormalize='after_drop' has no effect"),
    (dict(num_experts=True), r"num_experts=True"),
    (dict(router_jitter="0.1"), r"router_jitter='0.1'.*\[0, 1\)"),
    (dict(score="relu"), r"score='relu'; allowed: 'softmax' \| 'sigmoid'"),
    (dict(choice="both"), r"choice='both'; allowed: 'token' \| 'expert'"),
    (dict(choice="expert", top_k=2, capacity_factor=1.0),
     r"eval_capacity_factor=2.0 with choice='expert'.*== capacity_factor=1.0"),
    (dict(num_experts=6, num_expert_groups=4), r"num_expert_groups=4; allowed: a divisor of "
                                               r"num_experts=6"),
    (dict(num_experts=8, num_expert_groups=4, topk_groups=5), r"topk_groups=5; allowed"),
    (dict(num_experts=8, top_k=3, gate="gshard", num_expert_groups=4, topk_groups=1),
     r"top_k=3; allowed: at most topk_groups x experts per group = 2"),
    (dict(bias_update_rate=-1e-3), r"bias_update_rate=-0.001; allowed: a finite number >= 0"),
    (dict(choice="expert", eval_capacity_factor=1.25, bias_update_rate=1e-3),
     r"choice='expert' with num_expert_groups"),
    (dict(choice="expert", top_k=2, eval_capacity_factor=1.25, priority="token"),
     r"priority='token' with choice='expert'.*only priority='position' is allowed"),
    (dict(choice="expert", top_k=2, eval_capacity_factor=1.25, gate="gshard"),
     r"gate='gshard' with choice='expert'"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0; allowed: a finite number > 0"),
    (dict(num_shared_experts=-1), r"num_shared_experts=-1; allowed: an integer >= 0"),
    (dict(shared_d_ff=0), r"shared_d_ff=0; allowed: None \(= d_ff\) or an integer >= 1"),
    (dict(balance_loss_choices="some"), r"balance_loss_choices='some'.*'any'"),
])
def test_config_errors_name_field_value_and_allowed(kw, match):
  with pytest.raises(ValueError, match=match):
    MoEConfig(**kw)


def test_shape_errors_are_raised_before_compiling():
  layer = make(MoEConfig(num_experts=4, d_ff=6, group_size=5))
  with pytest.raises(ValueError, match=r"group_size=5 does not divide the 22 tokens"):
    layer(inputs(B=2, L=11))
  with pytest.raises(ValueError, match=r"rank 3"):
    layer(jnp.ones((22, D)))
  with pytest.raises(ValueError, match=r"d_model=7"):
    layer(jnp.ones((2, 5, 8)))
  with pytest.raises(ValueError, match=r"mask shape"):
    layer(jnp.ones((2, 5, D)), jnp.ones((2, 4), bool))


def test_jitter_alone_scales_only_the_router_input_and_only_in_training():
  cfg = MoEConfig(num_experts=4, top_k=1, d_ff=6, router_jitter=0.2,
                  capacity_factor=moe.NO_DROP)
  layer = make(cfg)
  x = inputs()
  captured = []
  orig = moe.routing.router_logits

  def spy(x_GSD, w_DE, *, dtype, jitter_GSD=None):
    captured.append(jitter_GSD)
    return orig(x_GSD, w_DE, dtype=dtype, jitter_GSD=jitter_GSD)

  moe.routing.router_logits = spy
  try:
    y_train, _ = layer(x)
    y_eval, _ = layer(x, deterministic=True)
  finally:
    moe.routing.router_logits = orig
  jitter, no_jitter = captured
  assert no_jitter is None  # Eval: no noise at all.
  assert float(jitter.min()) >= 0.8 and float(jitter.max()) <= 1.2 and float(jitter.std()) > 0.05
  # The experts see the unjittered input: recompute the training output by hand from the
  # jittered router's choice and gate, with the clean x through the expert.
  x_GSD = x.reshape(-1, 11, D)
  logits = jnp.einsum("GSD,DE->GSE", x_GSD * jitter, layer.router_DE[...])
  probs = jax.nn.softmax(logits, -1)
  e_GS = jnp.argmax(probs, -1)
  expected = np.zeros(x_GSD.shape, np.float32)
  for g in range(x_GSD.shape[0]):
    for t in range(11):
      e = int(e_GS[g, t])
      expected[g, t] = np.asarray(probs[g, t, e] * naive_ffn(layer, x_GSD[g, t], e))
  np.testing.assert_allclose(y_train.reshape(x_GSD.shape), expected, rtol=2e-5, atol=2e-6)
  assert not np.allclose(y_train, y_eval)


def test_random_second_expert_is_kept_with_probability_min_1_2g2():
  # GShard Algorithm 1: keep the second choice iff 2 * g2 > U(0, 1), g2 normalised over the top 2.
  S, trials = 64, 400
  logits_SE = jax.random.normal(jax.random.key(0), (S, 4)) * 1.5
  p = jax.nn.softmax(logits_SE, -1)
  top2 = jnp.sort(p, -1)[:, ::-1][:, :2]
  keep_prob_S = np.minimum(1.0, 2 * np.asarray(top2[:, 1] / top2.sum(-1)))

  def kept(key):
    u = jax.random.uniform(key, (S, 2))
    r = moe.routing.route_group(logits_SE, jnp.ones(S, bool), top_k=2, capacity=S, gate="gshard",
                                second_expert_policy="random", uniform_SK=u)
    return r.kept[:, 1]

  freq_S = np.asarray(jax.vmap(kept)(jax.random.split(jax.random.key(1), trials)).mean(0))
  # Binomial standard error per token, at most 0.025 with 400 trials: 5 sigma everywhere.
  se_S = np.sqrt(keep_prob_S * (1 - keep_prob_S) / trials)
  assert np.all(np.abs(freq_S - keep_prob_S) <= 5 * se_S + 1e-9), (freq_S, keep_prob_S)
  assert keep_prob_S.min() < 0.9  # The test covers probabilities well below 1.


@pytest.mark.parametrize("kw, S, C", [
    (dict(capacity_convention="flaxformer", capacity_factor=1.0), 24, 4),  # max(round(24/8),4)
    (dict(capacity_convention="mesh_tf", capacity_factor=2.0), 24, 6),  # max(min(24,int(6)),4)
    (dict(min_capacity=5, capacity_factor=0.5), 24, 5),  # ceil(2*0.5*24/8) = 3, floor 5
    (dict(capacity_multiple=4, capacity_factor=1.0), 24, 8),  # ceil(6) = 6 -> 8
])
def test_capacity_options_reach_the_layer(kw, S, C):
  cfg = MoEConfig(num_experts=8, top_k=2, d_ff=6, gate="gshard", **kw)
  assert cfg.capacity(S, deterministic=False) == C
  # Through the layer: with every token sent to expert 0, exactly C choices per group are kept.
  layer = make(cfg)
  layer.router_DE[...] = jnp.zeros_like(layer.router_DE[...]).at[:, 0].set(1.0)
  x = jnp.abs(inputs(B=1, L=S)) + 1.0  # positive inputs: expert 0 wins every first choice
  _, aux = layer(x)
  kept_first = (1 - float(aux.metrics["dropped_fraction"][0])) * S
  assert kept_first == pytest.approx(C), (kept_first, C)


def test_layer_benchmark_builds_every_routing_option():
  """`experiments/bench_moe.py --options` times each of its OPTIONS: each must be a valid layer
  with finite gradients (expert choice once broke it: its capacity is part of the model)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
  import bench_moe  # pylint: disable=import-outside-toplevel
  for name, options in bench_moe.OPTIONS.items():
    grads = bench_moe.moe_step(8, 16, 32, 2, 4, 2, 1.25, "sort", **options)()
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), name


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_routing_health_metrics_match_their_definitions(score):
  """`router_confidence` = mean top-1 router probability over real tokens (sigmoid scores
  normalised over the experts); `load_cv` = std / mean of the top-k choices per expert; a
  router with zero weights is uniform (confidence 1/E) and a balanced forced router has CV 0."""
  E, D_ = 8, 16
  x = jax.random.normal(jax.random.key(0), (4, 32, D_))
  mask = jnp.ones((4, 32), bool).at[3, 20:].set(False)
  layer = MoELayer(MoEConfig(num_experts=E, top_k=2, d_ff=8, score=score, gate="gshard"), D_,
                   rngs=nnx.Rngs(0))
  _, aux = layer(x, mask, deterministic=True)
  logits = np.asarray(x.reshape(-1, D_) @ layer.router_DE[...])
  probs = (1 / (1 + np.exp(-logits)) if score == "sigmoid"
           else np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  real = np.asarray(mask).reshape(-1)
  np.testing.assert_allclose(aux.metrics["router_confidence"], probs.max(-1)[real].mean(),
                             rtol=1e-5)
  count = np.bincount(np.asarray(aux.routes).reshape(-1, 2)[real].reshape(-1), minlength=E)
  np.testing.assert_allclose(aux.metrics["load_cv"], count.std() / count.mean(), rtol=1e-5)
  assert float(aux.metrics["load_cv"]) > 0.05  # an untrained router is not balanced here
  layer.router_DE[...] = jnp.zeros_like(layer.router_DE[...])
  _, uniform = layer(x, mask, deterministic=True)
  np.testing.assert_allclose(uniform.metrics["router_confidence"], 1 / E, rtol=1e-6)
  balanced = MoELayer(MoEConfig(num_experts=E, top_k=2, d_ff=8, router="balanced"), D_,
                      rngs=nnx.Rngs(0))
  _, aux_b = balanced(x, deterministic=True)
  np.testing.assert_allclose(aux_b.metrics["load_cv"], 0.0, atol=1e-6)
