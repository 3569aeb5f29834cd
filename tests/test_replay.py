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
# Keep decisions that read the current router: probability priority, threshold policy.
ROUTER_DEPENDENT_DROPS = dict(top_k=2, gate="gshard", capacity_factor=0.75, priority="probability",
                              second_expert_policy="threshold", second_expert_threshold=0.3)


def data():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  return x, jnp.ones((B, L), bool).at[5, 7:].set(False)


def loss_fn(layer, x, mask, routes, gates=None):
  y, aux = layer(x, mask, routes_BLK=routes, gates_BLK=gates)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux)


STEP = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def step(mesh_shape, kw, routes, perturb=0.0, gates=None):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh):
    layer = MoELayer(MoEConfig(num_experts=8, d_ff=6, **kw), D, rngs=nnx.Rngs(0))
    if perturb:
      layer.router_DE[...] = layer.router_DE[...] + perturb * jax.random.normal(
          jax.random.key(9), layer.router_DE[...].shape)
    x, mask = data()
    x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    return STEP(layer, x, mask, routes, gates)


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


@pytest.mark.parametrize("mesh_shape", [{"data": 1}, {"data": 2, "expert": 4}],
                         ids=["1dev", "data2xexpert4"])
@pytest.mark.parametrize("case", ["top2_capacity_drops", "top2_dropless", "router_dependent_drops"])
def test_replayed_gates_make_a_moved_router_irrelevant_to_the_output(case, mesh_shape):
  """With the recorded experts *and* gates, a perturbed router changes neither the output nor
  the experts' gradients (capacity drops included: kept flags follow the replayed experts and
  positions); the router then learns only from the auxiliary losses. Without the gates the
  output moves (gates follow the current router)."""
  kw = CASES.get(case, ROUTER_DEPENDENT_DROPS)
  (_, (y, aux)), (g, _) = step(mesh_shape, kw, None)
  assert aux.gates.shape == aux.routes.shape == aux.kept.shape
  assert bool(jnp.all(jnp.where(aux.kept, True, aux.gates == 0)))  # 0 where not kept
  if case != "top2_dropless":
    assert not bool(jnp.all(aux.kept[data()[1]]))  # the case does drop choices
  (_, (y_g, aux_g)), (g_g, _) = step(mesh_shape, kw, aux.routes, perturb=1.0, gates=aux.gates)
  np.testing.assert_allclose(y_g, y, rtol=1e-6, atol=1e-7)
  for name in ("w_up_EDF", "w_gate_EDF", "w_down_EFD"):  # same inputs and gates: same grads
    if not hasattr(g, name):
      continue
    np.testing.assert_allclose(getattr(g_g, name)[...], getattr(g, name)[...], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(aux_g.kept, aux.kept)
  np.testing.assert_allclose(aux_g.gates, aux.gates, rtol=1e-6)
  (_, (y_r, _)), _ = step(mesh_shape, kw, aux.routes, perturb=1.0)
  assert float(jnp.max(jnp.abs(y_r - y))) > 1e-3  # routes alone: the gates moved


def test_scanned_model_replays_routes_and_gates():
  """Replay works in the scanned layout (`scan_layers=True`): the recorded routes and gates
  enter the scan stacked like the weights; the same numbers as the unrolled model's replay, and
  with moved routers the replayed gates keep the recorded logits (routes alone do not)."""
  kw = dict(vocab_size=37, d_model=16, num_layers=4, num_heads=2, d_ff=24, moe_every=2,
            moe=dict(num_experts=4, top_k=2, d_ff=8, gate="gshard", capacity_factor=1.0))
  tokens = (jnp.arange(2 * 9).reshape(2, 9) * 5) % 37
  unrolled = Transformer(TransformerConfig(**kw), rngs=nnx.Rngs(0))
  scanned = Transformer(TransformerConfig(**kw, scan_layers=True), rngs=nnx.Rngs(0))
  logits, moe_aux = scanned(tokens, deterministic=True)
  routes = {i: a.routes for i, a in moe_aux.items()}
  gates = {i: a.gates for i, a in moe_aux.items()}
  assert sorted(routes) == [1, 3]
  for model in (scanned, unrolled):
    replayed, replayed_aux = model(tokens, moe_routes=routes, moe_gates=gates, deterministic=True)
    np.testing.assert_allclose(replayed, logits, rtol=1e-5, atol=1e-5)
    for i in routes:
      np.testing.assert_array_equal(replayed_aux[i].routes, routes[i])
  # Each layer gets its own routes: swapping the two layers' routes changes the result.
  swapped, swapped_aux = scanned(tokens, moe_routes={1: routes[3], 3: routes[1]},
                                 deterministic=True)
  np.testing.assert_array_equal(swapped_aux[1].routes, routes[3])
  np.testing.assert_array_equal(swapped_aux[3].routes, routes[1])
  assert float(jnp.max(jnp.abs(swapped - logits))) > 1e-4
  for model in (scanned, unrolled):  # the routers move: only the replayed gates hold the logits
    for layer in model.moe_layers():
      layer.router_DE[...] = layer.router_DE[...] + jax.random.normal(
          jax.random.key(5), layer.router_DE[...].shape)
    both, _ = model(tokens, moe_routes=routes, moe_gates=gates, deterministic=True)
    np.testing.assert_allclose(both, logits, rtol=1e-5, atol=1e-5)
    routes_only, _ = model(tokens, moe_routes=routes, deterministic=True)
    assert float(jnp.max(jnp.abs(routes_only - logits))) > 1e-4


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


@pytest.mark.parametrize("routes, gates, match", [
    (None, jnp.zeros((B, L, 2)), "gates without routes"),
    (jnp.zeros((B, L, 2), jnp.int32), jnp.zeros((B, L, 1)),
     r"gates of shape \(8, 12, 1\); allowed: .* \(8, 12, 2\)"),
    (jnp.zeros((B, L, 2), jnp.int32), jnp.zeros((B, L, 2), jnp.int32),
     "gates of dtype int32; allowed: floating point"),
])
def test_bad_gates_are_named_before_compiling(routes, gates, match):
  layer = MoELayer(MoEConfig(num_experts=8, top_k=2, d_ff=6, gate="gshard"), D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    layer(data()[0], routes_BLK=routes, gates_BLK=gates)


def test_model_gates_need_routes_for_every_layer():
  cfg = TransformerConfig(vocab_size=37, d_model=16, num_layers=2, num_heads=2, d_ff=24,
                          moe_every=1, moe=dict(num_experts=4, top_k=1, d_ff=8))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 5), jnp.int32)
  _, aux = model(tokens)
  routes, gates = ({i: getattr(a, f) for i, a in aux.items()} for f in ("routes", "gates"))
  with pytest.raises(ValueError, match="moe_gates without moe_routes"):
    model(tokens, moe_gates=gates)
  with pytest.raises(ValueError, match=r"moe_gates for layers \[0\]; allowed: one entry per MoE "
                                       r"layer, \[0, 1\]"):
    model(tokens, moe_routes=routes, moe_gates={0: gates[0]})


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

  def score(model, routes, gates=None):
    logits, aux = model(jnp.asarray(cols["tokens"]), jnp.asarray(cols["positions"]),
                        jnp.asarray(cols["segment_ids"]), jnp.asarray(cols["segment_ids"] > 0),
                        moe_routes=routes, moe_gates=gates)
    return np.asarray(logits[:, P - 1:]), aux

  replayed, _ = score(model, {i: jnp.asarray(r) for i, r in out.routes.items()})
  np.testing.assert_allclose(replayed, out.logits, rtol=1e-4, atol=1e-4)
  for layer in model.moe_layers():  # a small policy update of the routers
    layer.router_DE[...] = layer.router_DE[...] + 0.5 * jax.random.normal(
        jax.random.key(11), layer.router_DE[...].shape)
  fresh_logits, fresh = score(model, None)
  kept_logits, kept = score(model, {i: jnp.asarray(r) for i, r in out.routes.items()})
  real = cols["segment_ids"] > 0
  changed = np.mean([(np.asarray(fresh[i].routes) != out.routes[i]).any(-1)[real].mean()
                     for i in out.routes])
  assert changed > 0.05, changed  # without replay, other experts for some tokens
  for i in out.routes:
    np.testing.assert_array_equal(np.asarray(kept[i].routes)[real], out.routes[i][real])
  # Routes and gates replayed: only the routers moved, so every log-prob is the sampling one.
  assert sorted(out.gates) == [0, 1] and out.gates[0].shape == out.routes[0].shape
  both, _ = score(model, {i: jnp.asarray(r) for i, r in out.routes.items()},
                  {i: jnp.asarray(g) for i, g in out.gates.items()})
  np.testing.assert_allclose(both, out.logits, rtol=1e-4, atol=1e-4)
  # Mean |log p at scoring - at sampling| of the sampled tokens (docs/routing.md's table).
  sampled_BT = np.stack(out.tokens)

  def logp_gap(logits):
    logp = jax.nn.log_softmax(jnp.asarray(logits))
    at = lambda l: np.take_along_axis(np.asarray(l), sampled_BT[..., None], -1)[..., 0]
    return float(np.mean(np.abs(at(logp) - at(jax.nn.log_softmax(jnp.asarray(out.logits))))))

  gaps = [logp_gap(fresh_logits), logp_gap(kept_logits), logp_gap(both)]
  assert gaps[0] > gaps[1] > 0.01 > 1e-5 > gaps[2], gaps


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
  # Logged at each trace after the first: the same `changed` per layer (`routing` split); and
  # the routing health of every MoE layer at each log step (`train` split).
  import json  # pylint: disable=import-outside-toplevel
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  logged = [r for r in records if r["split"] == "routing"]
  assert [r["step"] for r in logged] == [6]
  assert logged[0]["layer1/changed_fraction"] == pytest.approx(moved)
  train_logs = [r for r in records if r["split"] == "train"]
  E = config.model.moe.num_experts
  layers = [int(k[5:]) for k in traces[6] if k.startswith("layer")]
  assert layers
  for i in layers:
    health = {k: train_logs[-1][f"moe/layer{i}/{k}"]
              for k in ("router_confidence", "load_cv", "expert_load", "dropped_fraction")}
    assert 1 / E <= health["router_confidence"] <= 1 and health["load_cv"] >= 0
    assert len(health["expert_load"]) == E and sum(health["expert_load"]) == pytest.approx(1)
  # A resumed run compares its first trace with the last one on disk.
  config.num_train_steps = 9
  train.train_and_evaluate(config, str(tmp_path))
  traces = analysis.read_routing_traces(str(tmp_path / "routing"))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  resumed = [r for r in records if r["split"] == "routing" and r["step"] == 9]
  assert len(resumed) == 1 and resumed[0]["layer1/changed_fraction"] == pytest.approx(
      analysis.routes_changed(traces[6]["layer1"], traces[9]["layer1"], traces[9]["mask"]))
  config.routing_trace_every = -1
  with pytest.raises(ValueError, match="config.routing_trace_every=-1"):
    train.validate_config(config)
