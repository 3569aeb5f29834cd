"""Lowering audit (`moejax.audit.lower`): what the MoE layer and a whole train step become on TPU
and GPU, read from the StableHLO lowered for those platforms on this CPU machine."""

import math
import sys

import jax
import jax.numpy as jnp
import pytest

from moejax import audit, sharding
from moejax.moe import MoEConfig

B, L, D, E, F, K = 8, 16, 32, 8, 64, 2
PLATFORMS = ("tpu", "cuda")


def lowered_layer(platform, mesh_shape, **kw):
  """fwd + bwd (w.r.t. params and input) of one MoE layer on `mesh_shape`."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  cfg = MoEConfig(num_experts=E, top_k=K, gate="gshard", d_ff=F, **kw)
  return audit.lowered_ops(audit.lower_moe_layer(cfg, D, (B, L), mesh, platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dropless_layer_lowers_to_ragged_dots(platform):
  ops = lowered_layer(platform, {"data": 1}, dispatch="dropless")
  ragged = [op for op in ops if op.name == "ragged_dot"]
  dense = [op for op in ops if op.name == "dot_general"]
  # Forward: 2 grouped matmuls; backward: 2 for the input gradient, 2 for the weights
  # (the first layer's input gradient w.r.t. x is needed: argnums=(0, 1)).
  assert len(ragged) >= 5, ops
  # Every expert row meets exactly one expert: the grouped matmuls do T*K*D*F work per pass,
  # not E times that; and no dense product is expert-sized.
  one_pass = 2 * B * L * K * D * F
  assert all(op.flops == one_pass for op in ragged), [op.flops for op in ragged]
  assert max(op.flops for op in dense) < one_pass / 4, dense
  assert not [op for op in dense if {(E, D, F), (E, F, D)} & set(op.operand_shapes)]
  assert not [op for op in ops if op.name in audit.LOWERED_COLLECTIVES]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_capacity_layer_lowering_is_unchanged(platform):
  """The capacity path: the padded einsum over `[E, C, D]` buffers, no grouped matmul."""
  ops = lowered_layer(platform, {"data": 1})
  C = math.ceil(K * 1.25 * L / E)
  assert not [op for op in ops if op.name.startswith("ragged")]
  padded = 2 * E * (B * C) * D * F  # one expert matmul over every group's slots
  assert sum(op.flops == padded for op in ops if op.name == "dot_general") >= 3


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dropless_expert_parallel_lowers_to_ragged_all_to_all(platform):
  """EP dropless with the default transport, lowered for an accelerator (on this CPU machine): tokens travel by ragged all-to-all only; the dense
  all-to-alls carry int32 counts (a few bytes), the all-reduces routing statistics and the
  data-parallel gradient reduction; nothing is all-gathered."""
  mesh_shape = {"data": 2, "expert": 4}  # ep_transport="auto": ragged when lowered for TPU/GPU
  ops = lowered_layer(platform, mesh_shape, dispatch="dropless")
  kinds = {op.name for op in ops}
  assert "ragged_all_to_all" in kinds and "ragged_dot" in kinds
  assert "all_gather" not in kinds and "collective_permute" not in kinds
  dense_a2a = [op for op in ops if op.name == "all_to_all"]
  assert dense_a2a and all("i32" in op.result and op.bytes <= 4 * E for op in dense_a2a), dense_a2a
  # Local pairs per device: B*L/8 tokens * K; the exact receive buffer holds ep times that.
  M = B * L // 8 * K
  for op in ops:
    if op.name == "ragged_all_to_all":
      assert op.bytes in (4 * M * D * 4, M * D * 4), op  # [ep*M, D] there, [M, D] back
  weight_grads = {(E // 4) * D * F * 4, D * E * 4}  # expert grads over `data`, router grads
  for op in ops:
    if op.name == "all_reduce":
      assert op.bytes in weight_grads or op.bytes <= 4096, op


@pytest.mark.parametrize("platform", PLATFORMS)
def test_whole_train_step_lowers_dropless(platform):
  """configs/tiny.py with dispatch='dropless': the step's MoE layers hold ragged dots (two
  layers, forward and backward), and no dense product touches the stacked expert weights."""
  sys.path.insert(0, ".")
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.moe.dispatch = "dropless"
  config.mesh.data = 1
  module = audit.lower_train_step(config, platform, jax.devices()[:1])
  ops = audit.lowered_ops(module)
  ragged = [op for op in ops if op.name == "ragged_dot"]
  assert len(ragged) >= 2 * 2 * 3, len(ragged)  # swiglu: 3 matmuls per layer, x2 passes
  # The experts' work: tokens * k * D * F per matmul, never E times it.
  tokens, k, d, f = 16 * 64, 2, 64, 128
  assert {op.flops for op in ragged} == {2 * tokens * k * d * f}
  assert not [op for op in ops if op.name == "dot_general"
              and {(8, d, f), (8, f, d)} & set(op.operand_shapes)]
  # ... where the capacity path's step multiplies the stacked expert weights densely.
  config.model.moe.dispatch = "sort"
  capacity = audit.lowered_ops(audit.lower_train_step(config, platform, jax.devices()[:1]))
  assert [op for op in capacity if op.name == "dot_general"
          and {(8, d, f), (8, f, d)} & set(op.operand_shapes)]
  assert not [op for op in capacity if op.name == "ragged_dot"]


def test_lowered_ops_reads_flops_and_bytes():
  """The parser against a function whose numbers are known."""
  def f(a, b, c):
    return a @ b, jax.lax.ragged_dot(a, c, jnp.array([3, 5], jnp.int32))
  args = (jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((4, 6), jnp.float32),
          jax.ShapeDtypeStruct((2, 4, 6), jnp.float32))
  ops = audit.lowered_ops(audit.lower(f, args, "tpu"))
  assert [(op.name, op.flops) for op in ops] == [("dot_general", 2 * 8 * 4 * 6),
                                                  ("ragged_dot", 2 * 8 * 4 * 6)]
  table = audit.format_lowered(ops)
  assert "ragged_dot" in table and "dot_general" in table
