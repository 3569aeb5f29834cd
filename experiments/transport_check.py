"""Dropless expert parallelism: each transport against the one-device layer, and its step time.

    python experiments/transport_check.py                    # CPU: 8 fake devices, buffered
    python experiments/transport_check.py --mesh expert=-1   # a GPU / TPU host: all its chips

For each transport that this platform runs (`buffered` everywhere; `ragged`, i.e.
`jax.lax.ragged_all_to_all`, on GPU and TPU only) it runs one fwd+bwd step of a dropless MoE
layer on the mesh, compares the outputs, gradients and losses with the same layer on one device
(max absolute difference), and times the step (median of --repeats). Exact receive buffers
(`receive_buffer_factor=None`), so nothing may overflow: `ep_overflow_fraction` must print 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from moejax import cli  # light: imports no JAX


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mesh", default="data=2,expert=4", help="mesh axis sizes (-1: the rest)")
  parser.add_argument("--tokens", type=int, default=8192, help="tokens in the batch")
  parser.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
  parser.add_argument("--d_model", type=int, default=256, help="model width D")
  parser.add_argument("--d_ff", type=int, default=1024, help="expert width F")
  parser.add_argument("--experts", type=int, default=8, help="experts E")
  parser.add_argument("--top_k", type=int, default=2, help="experts per token k")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per transport")
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from moejax import sharding  # pylint: disable=import-outside-toplevel
  from moejax.moe import MoEConfig, MoELayer  # pylint: disable=import-outside-toplevel

  B, L = args.tokens // args.seq_len, args.seq_len
  x = jax.random.normal(jax.random.key(1), (B, L, args.d_model))

  def step_fn(transport):
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff,
                    gate="gshard" if args.top_k > 1 else "softmax", dispatch="dropless",
                    **({"ep_transport": transport} if transport else {}))
    layer = MoELayer(cfg, args.d_model, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(layer, x):
      def loss(layer, x):
        y, aux = layer(x)
        return jnp.sum(jnp.square(y)) + aux.loss, (y, aux.metrics)
      return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return layer, step

  layer, step = step_fn(None)
  (ref_loss, (ref_y, _)), (ref_g, ref_gx) = step(layer, x)
  platform = jax.devices()[0].platform
  shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  mesh = sharding.make_mesh(shape)
  print(f"# dropless MoE layer fwd+bwd, B={B} L={L} D={args.d_model} F={args.d_ff} "
        f"E={args.experts} k={args.top_k}, mesh {dict(mesh.shape)} on {jax.devices()[0].device_kind}")
  for transport in ("buffered", "ragged"):
    if transport == "ragged" and platform == "cpu":
      print(f"{transport:>9}: skipped (XLA:CPU has no ragged all-to-all)")
      continue
    with jax.set_mesh(mesh):
      layer, step = step_fn(transport)
      xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
      (loss, (y, metrics)), (g, gx) = step(layer, xs)
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(layer, xs))
        times.append(time.perf_counter() - start)
    grads = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
        jax.tree.leaves(nnx.state(g, nnx.Param)), jax.tree.leaves(nnx.state(ref_g, nnx.Param)))]
    print(f"{transport:>9}: |dy| {float(jnp.max(jnp.abs(y - ref_y))):.2e}  |dloss| "
          f"{abs(float(loss - ref_loss)):.2e}  |dgrad| {max(grads):.2e}  |dgrad_x| "
          f"{float(jnp.max(jnp.abs(gx - ref_gx))):.2e}  ep_overflow_fraction "
          f"{float(metrics['ep_overflow_fraction']):g}  step {1e3 * statistics.median(times):.1f} ms",
          flush=True)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
