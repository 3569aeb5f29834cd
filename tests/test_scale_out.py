"""FSDP and tensor parallelism on 8 fake CPU devices: every mesh axis gives the one-device
numbers, checkpoints move between meshes, and per-device parameter + optimizer bytes shrink as
`sharding.LOGICAL_AXIS_RULES` says."""

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
from moejax import optim, sharding, study, train  # noqa: E402
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
  assert split(("blocks", 1, "ffn", "wi")) == (used("expert"), "fsdp", used("model"))
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
  study.apply_overrides(c, overrides)
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
