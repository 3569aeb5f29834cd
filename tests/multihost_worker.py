"""One process of the two-process expert-parallel test (launched by test_expert_parallel.py).

    python tests/multihost_worker.py PORT PROCESS_ID OUT_JSON

Each process owns 4 CPU devices; together they form a (data=2, expert=4) mesh of 8 devices. The
process feeds its half of the batch, runs the sharded MoE layer's forward and backward, and
compares the result with the single-device reference computed locally from the same inputs.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top

from moejax import sharding  # pylint: disable=g-import-not-at-top

port, process_id, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

from moejax.moe import MoEConfig, MoELayer  # pylint: disable=g-import-not-at-top

B, L, D = 8, 12, 7
cfg = MoEConfig(num_experts=8, top_k=2, d_ff=6, capacity_factor=0.75, gate="gshard",
                z_loss_weight=1e-3)
x_np = np.asarray(jax.random.normal(jax.random.key(1), (B, L, D)))
mask_np = np.ones((B, L), bool)
mask_np[5, 7:] = False


def loss_fn(layer, x, mask):
  y, aux = layer(x, mask)
  return jnp.sum(jnp.sin(y)) + aux.loss, (y, aux.metrics)


step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))

# Single-device reference on this process's first local device, no mesh.
with jax.default_device(jax.local_devices()[0]):
  ref_layer = MoELayer(cfg, D, rngs=nnx.Rngs(0))
  (ref_loss, (ref_y, ref_metrics)), ref_grads = step(ref_layer, jnp.asarray(x_np),
                                                     jnp.asarray(mask_np))

mesh = sharding.make_mesh({"data": 2, "expert": 4})
with jax.set_mesh(mesh):
  layer = MoELayer(cfg, D, rngs=nnx.Rngs(0))
  rows = np.split(np.arange(B), jax.process_count())[jax.process_index()]
  x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 3), x_np[rows],
                                             (B, L, D))
  mask = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, 2), mask_np[rows],
                                                (B, L))
  (loss, (y, metrics)), grads = step(layer, x, mask)
  y = multihost_utils.process_allgather(y, tiled=True)
  wi_grad = multihost_utils.process_allgather(grads.w_up_EDF[...], tiled=True)
  router_grad = multihost_utils.process_allgather(grads.router_DE[...], tiled=True)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


result = {
    "process_index": jax.process_index(),
    "devices": jax.device_count(),
    "loss": max_diff(loss, ref_loss),
    "y": max_diff(y, ref_y),
    "wi_grad": max_diff(wi_grad, ref_grads.w_up_EDF[...]),
    "router_grad": max_diff(router_grad, ref_grads.router_DE[...]),
    "metrics": max(max_diff(metrics[k], ref_metrics[k]) for k in ref_metrics),
    "dropped_fraction": float(np.sum(np.asarray(ref_metrics["dropped_fraction"]))),
}
with open(out_path, "w") as f:
  json.dump(result, f)
jax.distributed.shutdown()
