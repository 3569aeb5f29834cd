"""FSDP and tensor parallelism on 8 fake CPU devices: every mesh axis gives the one-device
numbers, checkpoints move between meshes, and per-device parameter + optimizer bytes shrink as
`sharding.LOGICAL_AXIS_RULES` says."""

import dataclasses
import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from moejax import optim, sharding, train  # noqa: E402
from moejax import config as config_lib  # noqa: E402
from moejax.model import Transformer, TransformerConfig  # noqa: E402

# Every axis in use at least once; fsdp with and without data, model with and without expert.
MESHES = [{"data": 2, "fsdp": 2, "expert": 2}, {"fsdp": 2, "model": 2, "expert": 2},
          {"data": 1, "fsdp": 4, "model": 2}]
MESH_IDS = ["-".join(f"{k}{v}" for k, v in m.items()) for m in MESHES]

# Grouped-query attention, a dense and a MoE layer, shared experts, gated experts with dropout:
# every parameter kind the rules lay out.
CFG = TransformerConfig(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48, moe_every=2,
    moe=dict(num_experts=8, top_k=2, d_ff=16, capacity_factor=1.0, gate="gshard",
             num_shared_experts=1, shared_d_ff=8, expert_dropout=0.2, z_loss_weight=1e-3))


def _loss(model, tokens_BL):
  logits_BLV, aux = model(tokens_BL)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BLV[:, :-1], tokens_BL[:, 1:])
  return jnp.mean(ce) + sum(a.loss for a in aux.values()), {i: a.metrics for i, a in aux.items()}


STEP = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


def _new_model():
  return Transformer(CFG, rngs=nnx.Rngs(params=0, routing=1, dropout=2))


@pytest.fixture(scope="module")
def reference():
  tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, CFG.vocab_size)
  (loss, metrics), grads = STEP(_new_model(), tokens)
  return tokens, loss, metrics, nnx.to_flat_state(grads)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=MESH_IDS)
def test_every_mesh_axis_gives_the_one_device_loss_metrics_and_gradients(reference, mesh_shape):
  tokens, loss, metrics, grads = reference
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    model = nnx.jit(_new_model)()
    (loss_m, metrics_m), grads_m = STEP(model, jax.device_put(tokens,
                                                               sharding.batch_sharding(mesh)))
  # The layout is the rules' (not replicated by accident), on a mesh that uses fsdp and model.
  def split(path):  # mesh axes of size > 1 per dimension
    value = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[path].get_value()
    spec = tuple(value.sharding.spec) + (None,) * value.ndim
    return tuple(a if a and mesh.shape[a] > 1 else None for a in spec[:value.ndim])
  used = lambda axis: axis if mesh_shape.get(axis, 1) > 1 else None
  assert split(("blocks", 0, "attn", "wq_DHd")) == ("fsdp", used("model"), None)
  assert split(("blocks", 1, "ffn", "w_up_EDF")) == (used("expert"), "fsdp", used("model"))
  assert split(("embed_VD",)) == (used("model"), "fsdp")
  assert loss_m == pytest.approx(float(loss), rel=1e-5)
  for name, value in metrics[1].items():
    np.testing.assert_allclose(metrics_m[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  grads_m = dict(nnx.to_flat_state(grads_m))
  for path, g in grads:
    np.testing.assert_allclose(grads_m[path].get_value(), g.get_value(), rtol=1e-4, atol=1e-6,
                               err_msg="/".join(map(str, path)))


def _config(**overrides):
  c = tiny.get_config("runlocal")
  c.model.update(vocab_size=264, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)
  c.model.moe.update(num_experts=8, top_k=2, d_ff=16)
  c.seq_len, c.batch_size, c.num_train_steps = 16, 8, 4
  c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 1, 1000, 1, 2
  c.data.builtin.num_docs, c.data.builtin.num_eval_docs = 100, 10
  config_lib.apply_overrides(c, overrides)
  return c


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_a_checkpoint_moves_between_fsdp_model_and_data_meshes(tmp_path):
  tp_mesh = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.model": 2, "mesh.expert": 2}
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(_config(**tp_mesh), straight)
  # Resume step 2's checkpoint on a plain data-parallel mesh: the same steps 3 and 4.
  moved = str(tmp_path / "moved")
  shutil.copytree(os.path.join(straight, "checkpoints", "2"),
                  os.path.join(moved, "checkpoints", "2"))
  train.train_and_evaluate(_config(**{"mesh.data": 8}), moved)
  losses, resumed = _train_losses(straight), _train_losses(moved)
  assert sorted(resumed) == [3, 4]
  for s in (3, 4):
    assert resumed[s] == pytest.approx(losses[s], rel=1e-4), (s, resumed[s], losses[s])


def _state_bytes_per_device(mesh_shape: dict[str, int]):
  """(bytes of params + optimizer state on one device by the compiled step's arguments, total
  bytes, the bytes the rules predict on one device, the dense (non-expert) part of each)."""
  config = _config(**{f"mesh.{k}": v for k, v in mesh_shape.items()})
  config.model.update(d_model=64, d_ff=128, num_heads=4, num_kv_heads=4)
  config.model.moe.update(d_ff=64)
  model_cfg = train.validate_config(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.make_mesh(mesh_shape)
  graphdef, state = nnx.split(train.create_model_and_optimizer(model_cfg, tx, mesh, 0))
  leaves = jax.tree.leaves(state)
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                   sharding=sharding.batch_sharding(mesh))
           for k in train.BATCH_KEYS}
  with jax.set_mesh(mesh):
    compiled = jax.jit(train.make_train_step(graphdef, 1, schedule)).lower(state, batch).compile()
  batch_bytes = sum(math.prod(b.shape) * 4 for b in batch.values()) // sharding.num_batch_shards(mesh)
  args = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
  total = sum(x.nbytes for x in leaves)
  predicted = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return args, total, predicted


@pytest.mark.parametrize("mesh_shape, ways", [
    ({"data": 8}, 1), ({"fsdp": 8}, 8), ({"fsdp": 4, "model": 2}, 8), ({"fsdp": 2, "model": 4}, 8),
    ({"data": 2, "fsdp": 4}, 4)])
def test_parameter_and_optimizer_bytes_per_device_shrink_by_fsdp_times_model(mesh_shape, ways):
  args, total, predicted = _state_bytes_per_device(mesh_shape)
  # The compiled step takes the state exactly as laid out (nothing replicated behind our back)...
  assert args == predicted, (args, predicted)
  # ... and that is total / (fsdp x model), up to what the rules leave whole: the norm scales,
  # the router's expert axis, and scalars (step, RNG counters) -- under 2% of this model.
  assert total / ways <= args <= total / ways * 1.02 + 1024, (args, total / ways)


@pytest.mark.parametrize("field, value, mesh, match", [
    ("model.d_model", 30, {"mesh.fsdp": 4}, r"config.model.d_model=30: .*multiples of mesh.fsdp=4"),
    ("model.num_kv_heads", 1, {"mesh.model": 2}, r"config.model.num_kv_heads=1: .*mesh.model=2"),
    ("model.moe.d_ff", 15, {"mesh.model": 2}, r"config.model.moe.d_ff=15: .*mesh.model=2"),
    ("model.vocab_size", 263, {"mesh.model": 2}, r"config.model.vocab_size=263: .*mesh.model=2"),
])
def test_sizes_the_mesh_cannot_split_are_named_before_building(field, value, mesh, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(_config(**{field: value, "mesh.data": -1, **mesh}))


def test_a_library_user_gets_the_dimension_and_sizes():
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  cfg = TransformerConfig(vocab_size=64, d_model=32, num_heads=3, head_dim=8)
  with jax.set_mesh(mesh), pytest.raises(
      ValueError, match=r"dimension 1 \('heads', size 3\) is split over mesh axis model of size 2"):
    Transformer(cfg, rngs=nnx.Rngs(0))


def test_rules_drop_axes_a_users_mesh_does_not_have():
  assert sharding.logical_to_mesh_axes(("expert", "embed", "mlp"), ("data", "expert")) == (
      "expert", None, None)
  assert sharding.logical_to_mesh_axes(("batch", None)) == (("data", "fsdp", "expert"), None)


def test_bench_train_reports_and_fsdp_gathers_only_weights():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_train  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config_lib.apply_overrides(config, {"mesh.data": 1, "mesh.fsdp": 4, "mesh.model": 2,
                                 "model.vocab_size": 0})
  out = bench_train.benchmark(config, steps=2, warmup=1, peak_tflops_per_device=1.0, audit=True,
                              routing_trace=True)
  assert out["devices"] == 8 and out["step_s"] > 0 and out["compile_s"] > 0
  # The trace's .npz holds uint8 experts [B, L, K] per MoE layer: under the raw bytes.
  layers = len(train.validate_config(config).moe_layer_indices)
  raw = config.batch_size * config.seq_len * (config.model.moe.top_k * layers + 1)
  assert out["trace_s"] > 0 and 0 < out["trace_bytes"] < raw + 1024
  assert "routing trace: " in bench_train.format_report(config, out)
  assert out["tokens_per_s"] == pytest.approx(config.batch_size * config.seq_len / out["step_s"])
  assert out["mfu"] == pytest.approx(out["flops_per_token"] * out["tokens_per_s"] / 8e12)
  assert np.isfinite(out["loss"]) and out["argument_bytes"] > 0
  kinds = {(kind, cls) for kind, cls, _ in out["collectives"]}
  # ZeRO-3: weights are gathered; tensor parallelism all-reduces activations; no activation is
  # ever all-gathered.
  assert ("all-gather", "weights") in kinds and ("all-reduce", "activations") in kinds, kinds
  assert ("all-gather", "activations") not in kinds, out["audit_table"]
  assert "MFU: " in bench_train.format_report(config, out)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("TPU v5 lite", 197.0),
                                        ("TPU v5p", 459.0), ("TPU v4", 275.0), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_train  # pylint: disable=import-outside-toplevel
  assert bench_train.peak_tflops(kind) == peak


def test_remat_policies_recompute_what_they_say_and_change_no_number():
  from moejax.model import REMATS  # pylint: disable=import-outside-toplevel
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, CFG.vocab_size)
  results = {}
  for policy in REMATS:
    model = Transformer(dataclasses.replace(CFG, remat=policy),
                        rngs=nnx.Rngs(params=0, routing=1, dropout=2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params, rest, tokens_BL):
      return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest, copy=True),
                                                tokens_BL)[0])(params)

    compiled = jax.jit(grad_fn).lower(params, rest, tokens).compile()
    loss, grads = compiled(params, rest, tokens)
    results[policy] = (float(loss), jax.tree.leaves(grads), compiled.as_text().count(" dot("))
  loss, grads, dots = results["none"]
  for policy, (loss_p, grads_p, _) in results.items():
    assert loss_p == loss, policy  # Recomputation redraws nothing: jitter, dropout identical.
    for g, g_p in zip(grads, grads_p):
      np.testing.assert_allclose(g_p, g, rtol=1e-5, atol=1e-7, err_msg=policy)
  # Matmuls in the compiled backward pass: "dots" saves them all, "dots_no_batch" recomputes
  # the batched ones (attention scores and mixing), "full" recomputes every forward matmul.
  count = {policy: r[2] for policy, r in results.items()}
  assert count["dots"] == count["none"] < count["dots_no_batch"] < count["full"], count


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_bfloat16_parameters_train_with_float32_optimizer_state(optimizer):
  config = _config(**{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
                      "optim.name": optimizer, "optim.learning_rate": 1e-2, "mesh.data": 2,
                      "mesh.fsdp": 4})
  model_cfg = train.validate_config(config)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.make_mesh(dict(config.mesh))
  graphdef, state = nnx.split(train.create_model_and_optimizer(model_cfg, tx, mesh, 0))
  model, optimizer = nnx.merge(graphdef, state)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}
  floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree)
                         if jnp.issubdtype(x.dtype, jnp.floating)}
  assert floats(nnx.state(optimizer.opt_state)) == {jnp.dtype("float32")}
  tokens = np.random.default_rng(0).integers(0, 200, (8, 17), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)),
           "segment_ids": np.ones((8, 16), np.int32), "mask": np.ones((8, 16), np.int32)}
  batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    step = jax.jit(train.make_train_step(graphdef, 1, schedule))
    losses = []
    for _ in range(6):  # One batch, again and again: the loss must fall.
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
  model, optimizer = nnx.merge(graphdef, state)
  assert floats(nnx.state(model, nnx.Param)) == {jnp.dtype("bfloat16")}
  assert floats(nnx.state(optimizer.opt_state)) == {jnp.dtype("float32")}


def _scanned(cfg, **overrides):
  return dataclasses.replace(cfg, **overrides)


@pytest.mark.parametrize("mesh_shape", [None, {"fsdp": 2, "model": 2, "expert": 2}],
                         ids=["one-device", "fsdp2-model2-expert2"])
def test_scanned_layers_give_the_unrolled_loss_metrics_and_gradients(mesh_shape):
  # Deterministic routing (no jitter / dropout): scanned units draw their own noise streams.
  cfg = _scanned(CFG, num_layers=4, moe={**dict(CFG.moe), "expert_dropout": 0.0})
  tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, cfg.vocab_size)
  (loss, metrics), grads = STEP(Transformer(cfg, rngs=nnx.Rngs(0)), tokens)
  make = lambda: Transformer(_scanned(cfg, scan_layers=True, remat="full"), rngs=nnx.Rngs(0))
  if mesh_shape is None:
    model = make()
    (loss_s, metrics_s), grads_s = STEP(model, tokens)
  else:
    mesh = sharding.make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
      model = nnx.jit(make)()
      (loss_s, metrics_s), grads_s = STEP(model, jax.device_put(tokens,
                                                                 sharding.batch_sharding(mesh)))
    assert model.units[1].ffn.w_up_EDF[...].sharding.spec[:4] == (None, "expert", "fsdp", "model")
  assert sorted(metrics_s) == sorted(metrics) == [1, 3]
  assert loss_s == pytest.approx(float(loss), rel=1e-5)
  for layer in metrics:
    for name, value in metrics[layer].items():
      np.testing.assert_allclose(metrics_s[layer][name], value, rtol=1e-5, atol=1e-6)
  # units[j] holds layers j, j + 2: its gradient, unstacked, is theirs.
  for layer in range(4):
    unrolled = dict(nnx.to_flat_state(nnx.state(grads.blocks[layer], nnx.Param)))
    scanned = nnx.to_flat_state(nnx.state(grads_s.units[layer % 2], nnx.Param))
    for path, g in scanned:
      np.testing.assert_allclose(g.get_value()[layer // 2], unrolled[path].get_value(),
                                 rtol=1e-4, atol=1e-6, err_msg=f"layer {layer} {path}")


def test_a_scanned_model_compiles_one_unit_whatever_its_depth():
  def hlo_size(num_layers, scan):
    cfg = _scanned(CFG, num_layers=num_layers, scan_layers=scan)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    graphdef, state = nnx.split(model)
    return len(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, tokens).as_text())
  assert hlo_size(8, True) < 1.2 * hlo_size(2, True)  # The body is traced once.
  assert hlo_size(8, False) > 2 * hlo_size(2, False)  # Unrolled: one copy per layer.


def test_scanned_models_decode_like_unrolled_ones():
  cfg = _scanned(CFG, num_layers=4, moe={**dict(CFG.moe), "expert_dropout": 0.0})
  prompts = jax.random.randint(jax.random.key(1), (2, 5), 1, cfg.vocab_size)
  outs = []
  for scan in (False, True):
    model = Transformer(_scanned(cfg, scan_layers=scan), rngs=nnx.Rngs(0))
    model.eval()
    cache = model.init_cache(2, 9)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = model.decode(prompts, positions, jnp.ones((2, 5), jnp.int32), cache)
    step_logits, _ = model.decode(jnp.argmax(logits[:, -1:], -1), positions[:, -1:] + 1,
                                  jnp.ones((2, 1), jnp.int32), cache)
    outs.append((logits, step_logits))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)


def test_scanned_training_updates_the_stacked_selection_bias(tmp_path):
  config = _config(**{"model.scan_layers": True, "model.moe.bias_update_rate": 1e-2,
                      "model.moe_every": 1, "num_train_steps": 2, "checkpoint_every": 2})
  train.train_and_evaluate(config, str(tmp_path))
  model, _, _ = train.load_model(train.load_run_config(str(tmp_path)), str(tmp_path))
  bias = np.asarray(model.units[0].ffn.expert_bias[...])
  assert bias.shape == (2, 8)  # two layers, each its own bias, moved by its own counts
  assert np.any(bias[0] != 0) and np.any(bias[1] != 0) and not np.array_equal(bias[0], bias[1])
  with pytest.raises(ValueError, match=r"scanned layers .* the model.scan_layers the run"):
    train.load_model(_config(), str(tmp_path))


@pytest.mark.parametrize("overrides, match", [
    ({"moe_layers": (1, 2)}, r"scan_layers=True: .*explicit moe_layers are not scanned"),
    ({"moe_every": 3}, r"scan_layers=True: .*moe_every dividing num_layers=4"),
])
def test_layouts_that_do_not_repeat_cannot_be_scanned(overrides, match):
  with pytest.raises(ValueError, match=match):
    _scanned(CFG, scan_layers=True, num_layers=4 if "moe_every" in overrides else 3,
             **overrides)
