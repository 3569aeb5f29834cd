"""Routing replay (`MoELayer(..., routes_BLK=)`, `Transformer(..., moe_routes=)`): a forward can
return every token's experts (`aux.routes`) and a later forward can use them instead of the
router's top-k."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.model import Transformer, TransformerConfig
from moejax.moe import MoEConfig, MoELayer

B, L, D = 8, 12, 7
CASES = {
    "top2_capacity_drops": dict(top_k=2, gate="gshard", capacity_factor=0.75, router_jitter=0.1),
    "top2_dropless": dict(top_k=2, gate="gshard", dispatch="dropless", activation="swiglu"),
    "top1_switch": dict(top_k=1, capacity_factor=1.0),
}


def data():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  return x, jnp.ones((B, L), bool).at[5, 7:].set(False)


def loss_fn(layer, x, mask, routes):
  y, aux = layer(x, mask, routes_BLK=routes)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)


STEP = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def step(mesh_shape, kw, routes, perturb=0.0):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh):
    layer = MoELayer(MoEConfig(num_experts=8, d_ff=6, **kw), D, rngs=nnx.Rngs(0))
    if perturb:
      layer.router_DE[...] = layer.router_DE[...] + perturb * jax.random.normal(
          jax.random.key(9), layer.router_DE[...].shape)
    x, mask = data()
    x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    return STEP(layer, x, mask, routes)


@pytest.mark.parametrize("mesh_shape", [{"data": 1}, {"data": 2, "expert": 4}],
                         ids=["1dev", "data2xexpert4"])
@pytest.mark.parametrize("case", list(CASES))
def test_replaying_a_pass_own_routes_changes_nothing(case, mesh_shape):
  """Outputs, losses, metrics and gradients of a replayed pass equal the recording pass (the
  same RNG draws: jitter noise is drawn either way)."""
  (loss, (y, aux)), (g, gx) = step(mesh_shape, CASES[case], None)
  assert aux.routes.shape == (B, L, CASES[case]["top_k"]) and aux.routes.dtype == jnp.int32
  (loss_r, (y_r, aux_r)), (g_r, gx_r) = step(mesh_shape, CASES[case], aux.routes)
  np.testing.assert_array_equal(aux_r.routes, aux.routes)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  np.testing.assert_allclose(y_r, y, rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               aux_r.metrics, aux.metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               nnx.to_pure_dict(nnx.state(g_r, nnx.Param)),
               nnx.to_pure_dict(nnx.state(g, nnx.Param)))
  np.testing.assert_allclose(gx_r, gx, rtol=1e-5, atol=1e-7)


def test_a_perturbed_router_still_uses_the_recorded_experts():
  kw = CASES["top2_dropless"]
  (_, (_, aux)), _ = step({"data": 1}, kw, None)
  (_, (_, moved)), _ = step({"data": 1}, kw, None, perturb=1.0)
  assert (moved.routes != aux.routes).any()  # without replay the perturbed router chooses anew
  (_, (y, replayed)), (g, _) = step({"data": 1}, kw, aux.routes, perturb=1.0)
  np.testing.assert_array_equal(replayed.routes, aux.routes)
  assert float(jnp.max(jnp.abs(g.router_DE[...]))) > 0  # gates come from the current router


def test_model_replay_equals_the_recording_pass():
  cfg = TransformerConfig(vocab_size=37, d_model=16, num_layers=3, num_heads=2, d_ff=24,
                          moe_every=1, moe=dict(num_experts=4, top_k=2, d_ff=8, gate="gshard"))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = (jnp.arange(2 * 9).reshape(2, 9) * 5) % 37
  logits, moe_aux = model(tokens)
  routes = {i: aux.routes for i, aux in moe_aux.items()}
  assert sorted(routes) == [0, 1, 2]
  replayed, replayed_aux = model(tokens, moe_routes=routes)
  np.testing.assert_allclose(replayed, logits, rtol=1e-6, atol=1e-6)
  for i in routes:
    np.testing.assert_array_equal(replayed_aux[i].routes, routes[i])
  with pytest.raises(ValueError, match=r"moe_routes for layers \[0, 1\]; allowed: one entry per "
                                       r"MoE layer, \[0, 1, 2\]"):
    model(tokens, moe_routes={0: routes[0], 1: routes[1]})


@pytest.mark.parametrize("routes, match", [
    (jnp.zeros((B, L, 3), jnp.int32), r"shape \(8, 12, 3\); allowed: .* \(8, 12, 2\)"),
    (jnp.full((B, L, 2), 8, jnp.int32), r"expert ids in \[8, 8\]; allowed: \[0, num_experts - 1 = 7\]"),
    (jnp.full((B, L, 2), -1, jnp.int32), r"expert ids in \[-1, -1\]"),
    (jnp.zeros((B, L, 2), jnp.float32), "dtype float32; allowed: integer"),
])
def test_bad_routes_are_named_before_compiling(routes, match):
  layer = MoELayer(MoEConfig(num_experts=8, top_k=2, d_ff=6, gate="gshard"), D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    layer(data()[0], routes_BLK=routes)


def test_rl_check_sampling_routes_replayed_in_the_training_forward():
  """Sample with `generate` while recording, then score the same columns with the training
  forward: with the recorded routes, the logits equal those each token was sampled from. After a
  (simulated) update of the routers, scoring without replay picks other experts for some tokens
  while replay keeps the sampling-time ones."""
  from moejax import generate as gen  # pylint: disable=import-outside-toplevel
  # Dropless experts: nothing is dropped at sampling or at scoring time, whatever the grouping.
  cfg = TransformerConfig(vocab_size=41, d_model=16, num_layers=2, num_heads=2, d_ff=24,
                          moe_every=1, moe=dict(num_experts=8, top_k=2, d_ff=8, gate="gshard",
                                                dispatch="dropless"))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  prompts = [np.array([5, 7, 9, 11, 3], np.int32), np.array([2, 4, 6], np.int32)]
  steps = 6
  out = gen.generate(model, prompts, max_new_tokens=steps, key=jax.random.key(3),
                     temperature=1.0, return_logits=True, record_routes=True)
  cols = out.columns
  P = cols["tokens"].shape[1] - (steps - 1)
  assert sorted(out.routes) == [0, 1] and out.routes[0].shape == (2, P + steps - 1, 2)

  def score(model, routes):
    logits, aux = model(jnp.asarray(cols["tokens"]), jnp.asarray(cols["positions"]),
                        jnp.asarray(cols["segment_ids"]), jnp.asarray(cols["segment_ids"] > 0),
                        moe_routes=routes)
    return np.asarray(logits[:, P - 1:]), aux

  replayed, _ = score(model, {i: jnp.asarray(r) for i, r in out.routes.items()})
  np.testing.assert_allclose(replayed, out.logits, rtol=1e-4, atol=1e-4)
  for layer in model.moe_layers():  # a small policy update of the routers
    layer.router_DE[...] = layer.router_DE[...] + 0.5 * jax.random.normal(
        jax.random.key(11), layer.router_DE[...].shape)
  _, fresh = score(model, None)
  _, kept = score(model, {i: jnp.asarray(r) for i, r in out.routes.items()})
  real = cols["segment_ids"] > 0
  changed = np.mean([(np.asarray(fresh[i].routes) != out.routes[i]).any(-1)[real].mean()
                     for i in out.routes])
  assert changed > 0.05, changed  # without replay, other experts for some tokens
  for i in out.routes:
    np.testing.assert_array_equal(np.asarray(kept[i].routes)[real], out.routes[i][real])


def test_routing_traces_are_written_and_read(tmp_path):
  """`routing_trace_every=N`: every N steps each MoE layer's experts of the first eval batch
  (uint8, [B, L, K]) and its mask; `analysis.routing_stability` reads them back."""
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from moejax import analysis, train  # pylint: disable=import-outside-toplevel
  config = tiny.get_config("runlocal")
  config.num_train_steps, config.routing_trace_every = 6, 3
  train.train_and_evaluate(config, str(tmp_path))
  traces = analysis.read_routing_traces(str(tmp_path / "routing"))
  assert list(traces) == [3, 6]
  layer = traces[6]["layer1"]
  assert layer.dtype == np.uint8 and layer.shape == (config.batch_size, config.seq_len, 2)
  assert traces[6]["mask"].shape == (config.batch_size, config.seq_len)
  stability = analysis.routing_stability(traces)["layer1"]
  mask = traces[6]["mask"]
  moved = (np.sort(traces[3]["layer1"], -1) != np.sort(layer, -1)).any(-1)[mask].mean()
  assert stability["steps"] == [6] and stability["changed"] == [pytest.approx(moved)]
  assert stability["final_agreement"][-1] == 1.0
  config.routing_trace_every = -1
  with pytest.raises(ValueError, match="config.routing_trace_every=-1"):
    train.validate_config(config)
