"""Expert parallelism on 8 fake CPU devices: sharded == single-device, and the wire is minimal."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import processes
from moejax import audit, routing, sharding
from moejax.moe import MoEConfig, MoELayer

B, L, D = 8, 12, 7
# (data, expert) meshes, and tensor parallelism of the experts' hidden width (D = 7 is odd, so
# fsdp, which splits d_model, is covered by tests/test_scale_out.py instead).
MESHES = [{"data": 1, "expert": 8}, {"data": 2, "expert": 4}, {"data": 4, "expert": 2},
          {"data": 8, "expert": 1}, {"data": 2, "expert": 2, "model": 2}]
CASES = {
    # k, plus the routing features whose global semantics sharding must not change.
    "top1": dict(top_k=1, capacity_factor=0.5, router_jitter=0.1),
    "top2_bpr": dict(top_k=2, gate="gshard", capacity_factor=0.75, priority="probability",
                     second_expert_policy="random", z_loss_weight=1e-3,
                     balance_loss_scope="batch", gshard_loss_weight=0.1),
    # DeepSeek-style: sigmoid scores, gates normalised and scaled, shared experts, any-K loss.
    "top3_sigmoid_shared": dict(top_k=3, score="sigmoid", gate="gshard", capacity_factor=0.75,
                                routed_scaling_factor=2.5, num_shared_experts=2, shared_d_ff=3,
                                balance_loss_choices="any", priority="token"),
    "expert_choice": dict(top_k=2, choice="expert", capacity_factor=0.5,
                          eval_capacity_factor=0.5, router_jitter=0.1),
    # DeepSeek-V3 selection: group-limited top-2 with an (aux-loss-free) selection bias.
    "groups_bias": dict(top_k=2, gate="gshard", score="sigmoid", capacity_factor=0.75,
                        num_expert_groups=4, topk_groups=2, bias_update_rate=1e-3),
}


def _layer(kw):
  layer = MoELayer(MoEConfig(num_experts=8, d_ff=6, **kw), D, rngs=nnx.Rngs(0))
  if hasattr(layer, "expert_bias"):  # A trained-looking bias, so selection depends on it.
    layer.expert_bias[...] = jnp.linspace(-0.2, 0.2, 8)
  return layer


def data():
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  mask = jnp.ones((B, L), bool).at[5, 7:].set(False).at[2, :3].set(False)
  return x, mask


def loss_fn(layer, x, mask):
  y, aux = layer(x, mask)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.metrics)


STEP = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def _sharded_step(mesh_shape, kw):
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    layer = _layer(kw)
    x, mask = data()
    return STEP(layer, jax.device_put(x, sharding.batch_sharding(mesh, 3)), mask)


def _assert_same_step(got, want):
  (loss, (y, metrics)), (g, gx) = got
  (ref_loss, (ref_y, ref_metrics)), (ref_g, ref_gx) = want
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               metrics, ref_metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(nnx.state(g, nnx.Param)),
               nnx.to_pure_dict(nnx.state(ref_g, nnx.Param)))
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-6)


# The first case on every mesh, the second on two (CI time).
DROPLESS_PLAN = [("top2_swiglu", m) for m in MESHES] + [
    ("top3_sigmoid_shared_groups", m) for m in (MESHES[1], MESHES[4])]


@pytest.fixture(scope="module")
def references():
  out = {}
  for name, kw in CASES.items():
    out[name] = STEP(_layer(kw), *data())
  return out


@pytest.mark.parametrize("mesh_shape", MESHES,
                         ids=["x".join(f"{k}{v}" for k, v in m.items()) for m in MESHES])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_layer_equals_single_device(references, mesh_shape, case):
  ref_metrics = references[case][0][1][1]
  assert float(jnp.sum(ref_metrics["dropped_fraction"])) > 0  # drops are happening
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    assert _layer(CASES[case]).w_up_EDF[...].sharding.spec[0] == "expert"
  _assert_same_step(_sharded_step(mesh_shape, CASES[case]), references[case])


def replay_loss_fn(layer, x, mask, routes, gates):
  y, aux = layer(x, mask, routes_BLK=routes, gates_BLK=gates)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.metrics)


REPLAY_STEP = nnx.jit(nnx.value_and_grad(replay_loss_fn, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("mesh_shape", [MESHES[1], MESHES[4]],
                         ids=["x".join(f"{k}{v}" for k, v in m.items()) for m in
                              (MESHES[1], MESHES[4])])
@pytest.mark.parametrize("with_gates", [False, True], ids=["routes", "routes_gates"])
def test_replay_on_the_mesh_equals_single_device(mesh_shape, with_gates):
  """Routing replay (recorded experts, and gates) is a routing option like the others: the
  sharded step equals one device's, with probability priority and random second experts."""
  kw = CASES["top2_bpr"]
  x, mask = data()
  recorder = _layer(kw)
  recorder.router_DE[...] = recorder.router_DE[...] + jax.random.normal(
      jax.random.key(4), recorder.router_DE[...].shape)  # routes of another router
  _, aux = recorder(x, mask)
  routes, gates = aux.routes, (aux.gates if with_gates else None)
  want = REPLAY_STEP(_layer(kw), x, mask, routes, gates)
  # Choices are lost: dropped at capacity, or (replayed gates) skipped as the recording lost them.
  lost = "skipped_fraction" if with_gates else "dropped_fraction"
  assert float(jnp.sum(want[0][1][1][lost])) > 0
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    got = REPLAY_STEP(_layer(kw), jax.device_put(x, sharding.batch_sharding(mesh, 3)), mask,
                      routes, gates)
  _assert_same_step(got, want)


def test_forward_moves_only_the_capacity_buffer():
  E, C_expected = 8, 6  # C = ceil(2 * 1.0 * 24 / 8)
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  d_model = 16
  with jax.set_mesh(mesh):
    layer = MoELayer(MoEConfig(num_experts=E, top_k=2, d_ff=8, capacity_factor=1.0), d_model,
                     rngs=nnx.Rngs(0))
    x = jax.device_put(jnp.ones((8, 24, d_model)), sharding.batch_sharding(mesh, 3))
    graphdef, state = nnx.split(layer)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
  found = audit.collectives(compiled)
  summary = audit.summarize(found)
  # One group per device (8 sequences over 8 devices): the buffer is E * C * D floats.
  buffer_bytes = E * C_expected * d_model * 4
  assert summary["all-to-all"] == {"count": 2, "bytes": 2 * buffer_bytes}, summary
  assert [c.bytes for c in found if c.kind == "all-to-all"] == [buffer_bytes, buffer_bytes]
  assert "all-gather" not in summary
  # The only all-reduce carries the routing sums (O(E + K) floats), never token activations: at
  # most one copy of `routing.routing_sums`' output, and far below one sequence's activations.
  def sums_of(logits_GSE):
    valid_GS = jnp.ones(logits_GSE.shape[:2], bool)
    r = routing.route(logits_GSE, valid_GS, top_k=2, capacity=C_expected)
    return routing.routing_sums(r, valid_GS)
  sums = jax.eval_shape(sums_of, jax.ShapeDtypeStruct((1, 24, E), jnp.float32))
  sums_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(sums))
  assert sums_bytes < 24 * d_model * 4
  assert summary.get("all-reduce", {"bytes": 0})["bytes"] <= sums_bytes


def test_audit_parses_hlo_shapes():
  text = """
  %all-to-all.3 = (f32[2,4,24]{2,1,0}, f32[2,4,24]{2,1,0}) all-to-all(%a, %b), channel_id=1
  %ar = bf16[128]{0} all-reduce-start(%c), to_apply=%add
  %ard = bf16[128]{0} all-reduce-done(%ar)
  %fusion = f32[8]{0} fusion(%d), kind=kLoop
  %noop = f32[4,32]{1,0} all-reduce(%e), replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %noop2 = f32[4,32]{1,0} all-reduce(%e), replica_groups=[4,1]<=[4], to_apply=%add
  %real = f32[4]{0} all-reduce(%e), replica_groups=[2,2]<=[4], to_apply=%add
  """
  found = audit.collectives(text)
  assert [(c.kind, c.bytes) for c in found] == [("all-to-all", 2 * 2 * 4 * 24 * 4),
                                                ("all-reduce", 256), ("all-reduce", 16)]


def test_experts_not_divisible_by_expert_axis_is_a_clear_error():
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  layer = MoELayer(MoEConfig(num_experts=6, d_ff=6), D, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the mesh's expert "
                                         r"axis size 4"):
      layer(*data())


def test_groups_not_divisible_by_devices_is_a_clear_error():
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh):
    layer = MoELayer(MoEConfig(num_experts=8, d_ff=6), D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"G=4 routing groups, not divisible by the 8 devices"):
      layer(jnp.ones((4, L, D)))


@pytest.mark.parametrize("shape, match", [
    ({"data": 3, "expert": 4}, r"multiply to 12, but 8 devices"),
    ({"data": -1, "expert": 3}, r"does not divide the 8 available devices"),
    ({"data": -1, "expert": -1}, r"at most one axis may be -1"),
    ({"data": 8, "tensor": 1}, r"unknown axis name\(s\) \['tensor'\]"),
    ({"data": 0, "expert": 8}, r"mesh.data=0"),
])
def test_mesh_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape)


def test_mesh_fills_in_the_rest():
  mesh = sharding.make_mesh({"data": -1, "expert": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "model": 1}
  with pytest.raises(ValueError,
                     match=r"batch_size=12 must be divisible by data x fsdp x expert = 8"):
    sharding.check_batch_divisible(12, mesh)


def test_two_processes_match_single_device(tmp_path):
  worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
  port = processes.free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  processes.wait_all(
      [subprocess.Popen([sys.executable, worker, str(port), str(i), str(tmp_path / f"{i}.json")],
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
       for i in range(2)], timeout=240)
  for i in range(2):
    result = json.loads((tmp_path / f"{i}.json").read_text())
    assert result["devices"] == 8 and result["process_index"] == i
    assert result["dropped_fraction"] > 0
    for key in ("loss", "y", "wi_grad", "router_grad", "metrics"):
      assert result[key] < 1e-4, (key, result)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
def test_expert_dropout_alone_is_identical_on_every_mesh(mesh_shape):
  """Expert dropout (the only random mechanism here) drops the same units sharded as on one
  device: training outputs and gradients match, and differ from the eval (no-dropout) output."""
  cfg = MoEConfig(num_experts=8, top_k=2, d_ff=6, expert_dropout=0.5, gate="gshard",
                  capacity_factor=2.0)
  x, mask = data()
  train_fwd = lambda m, x, mask: m(x, mask, deterministic=False)[0]  # noqa: E731
  ref_layer = MoELayer(cfg, D, rngs=nnx.Rngs(0))
  ref_train = nnx.jit(train_fwd)(ref_layer, x, mask)
  ref_eval, _ = ref_layer(x, mask, deterministic=True)
  (_, (ref_y, _)), (ref_g, _) = STEP(MoELayer(cfg, D, rngs=nnx.Rngs(0)), x, mask)
  mesh = sharding.make_mesh({"data": mesh_shape[0], "expert": mesh_shape[1]})
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    train_y = nnx.jit(train_fwd)(MoELayer(cfg, D, rngs=nnx.Rngs(0)), xs, mask)
    (_, (y, _)), (g, _) = STEP(MoELayer(cfg, D, rngs=nnx.Rngs(0)), xs, mask)
  assert not np.allclose(ref_train, ref_eval)  # dropout is on
  np.testing.assert_allclose(train_y, ref_train, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.to_pure_dict(nnx.state(g, nnx.Param)),
               nnx.to_pure_dict(nnx.state(ref_g, nnx.Param)))


def test_expert_dropout_drops_its_rate_of_units():
  from moejax.moe import expert_dropout_mask  # pylint: disable=import-outside-toplevel
  keep = expert_dropout_mask(jax.random.key(0), 0.3, jnp.arange(8), jnp.arange(16), 5, 32)
  assert keep.shape == (8, 16 * 5, 32)
  # 20,480 Bernoulli(0.7) draws: std of the mean is 0.0032; 5 sigma.
  assert abs(float(keep.mean()) - 0.7) < 0.016
  # Slot (e, g) bits depend only on (e, g): a sub-range of ids reproduces its rows.
  part = expert_dropout_mask(jax.random.key(0), 0.3, jnp.arange(2, 4), jnp.arange(3, 5), 5, 32)
  np.testing.assert_array_equal(part.reshape(2, 2, 5, 32),
                                keep.reshape(8, 16, 5, 32)[2:4, 3:5])


# ------------------------------------------------------------------------------------------------
# Dropless experts under expert parallelism (moejax.moe._exchange)
# ------------------------------------------------------------------------------------------------

DROPLESS_CASES = {
    "top2_swiglu": dict(top_k=2, gate="gshard", activation="swiglu", router_jitter=0.1,
                        second_expert_policy="random", balance_loss_scope="batch"),
    "top3_sigmoid_shared_groups": dict(top_k=3, score="sigmoid", gate="gshard",
                                       num_expert_groups=4, topk_groups=2, bias_update_rate=1e-3,
                                       num_shared_experts=1, routed_scaling_factor=2.5),
}


@pytest.fixture(scope="module")
def dropless_references():
  return {name: STEP(_layer(dict(kw, dispatch="dropless")), *data())
          for name, kw in DROPLESS_CASES.items()}


@pytest.mark.parametrize("case, mesh_shape", DROPLESS_PLAN,
                         ids=[f"{c}-" + "x".join(f"{k}{v}" for k, v in m.items())
                              for c, m in DROPLESS_PLAN])
def test_dropless_buffered_transport_equals_single_device(dropless_references, mesh_shape, case):
  """Exact receive buffers (the default factor): outputs, losses, metrics and gradients equal
  the one-device dropless layer, which equals the no-drop capacity layer (test_dropless.py)."""
  kw = dict(DROPLESS_CASES[case], dispatch="dropless", ep_transport="buffered")
  got = _sharded_step(mesh_shape, kw)
  assert float(got[0][1][1]["ep_overflow_fraction"]) == 0.0
  _assert_same_step(got, dropless_references[case])


def _fake_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                            recv_sizes, *, axis_name, axis_index_groups=None):
  """`jax.lax.ragged_all_to_all`'s documented semantics from all_gather and a scatter, for CPU
  (XLA:CPU has no ragged all-to-all): source s's rows [in_off[s][me], + size[s][me]) land at
  out_off[s][me] of this device's output."""
  del recv_sizes, axis_index_groups
  me = jax.lax.axis_index(axis_name)
  rows_J = jax.lax.all_gather(operand, axis_name)
  in_off_J, sizes_J, out_off_J = (jax.lax.all_gather(a, axis_name)[:, me]
                                  for a in (input_offsets, send_sizes, output_offsets))
  p = jnp.arange(operand.shape[0])
  sent_JA = (p[None] >= in_off_J[:, None]) & (p[None] < (in_off_J + sizes_J)[:, None])
  dest_JA = jnp.where(sent_JA, out_off_J[:, None] + p[None] - in_off_J[:, None], output.shape[0])
  return output.at[dest_JA.reshape(-1)].set(rows_J.reshape(-1, operand.shape[-1]), mode="drop")


@pytest.mark.parametrize("mesh_shape, factor", [({"data": 2, "expert": 4}, None),
                                                ({"data": 2, "expert": 4}, 1.0),
                                                ({"data": 1, "expert": 8}, None)])
def test_dropless_ragged_transport_equals_buffered(monkeypatch, mesh_shape, factor):
  """The ragged transport's offsets and sizes, checked on CPU with an emulated
  `ragged_all_to_all`: it equals the buffered transport, exact and overflowing alike."""
  kw = dict(DROPLESS_CASES["top2_swiglu"], dispatch="dropless", receive_buffer_factor=factor)
  want = _sharded_step(mesh_shape, dict(kw, ep_transport="buffered"))
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _fake_ragged_all_to_all)
  got = _sharded_step(mesh_shape, dict(kw, ep_transport="ragged"))
  _assert_same_step(got, want)
  assert (float(got[0][1][1]["ep_overflow_fraction"]) > 0) == (factor is not None)


def test_dropless_overflow_is_counted():
  """A receive buffer of R = ceil(factor * M / ep) rows per source: pairs past it are dropped
  and counted; the count equals one computed from the routing by hand."""
  mesh_shape, factor = {"data": 2, "expert": 4}, 1.0
  kw = dict(top_k=2, gate="gshard", dispatch="dropless", receive_buffer_factor=factor)
  (_, (_, metrics)), _ = _sharded_step(mesh_shape, dict(kw, ep_transport="buffered"))
  layer = _layer(kw)
  x, mask = data()
  _, captured = nnx.capture(lambda l: l(x, mask, record_routing=True), nnx.Intermediate)(layer)
  experts = np.asarray(captured["router_topk"][0])  # [B, L, K]
  kept = np.asarray(captured["router_kept"][0])
  devices, ep = 8, 4
  per_device = B // devices  # sequences per device, in mesh order (data-major)
  M = per_device * L * 2
  R = math.ceil(factor * M / ep)
  dropped = 0
  for d in range(devices):
    e = experts[d * per_device:(d + 1) * per_device][kept[d * per_device:(d + 1) * per_device]]
    per_dest = np.bincount(e // (8 // ep), minlength=ep)
    dropped += int(np.maximum(per_dest - R, 0).sum())
  assert dropped > 0
  np.testing.assert_allclose(metrics["ep_overflow_fraction"], dropped / kept.sum(), rtol=1e-6)
