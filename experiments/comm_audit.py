"""Communication audit of the MoE layer: every collective in the compiled forward or train step.

    python experiments/comm_audit.py --mesh data=2,expert=4 --step forward
    python experiments/comm_audit.py --mesh data=2,expert=4 --step train --experts 32 --top_k 2

Runs on fake CPU devices (`--devices`, default 8) unless real accelerators are present. Prints each
collective (kind, result shapes, bytes per device) and a summary, next to the analytic floor for
capacity-based dispatch: two all-to-alls of `E * g*C * D * dtype_bytes` per layer forward.
"""

from __future__ import annotations

import argparse
import os

from moejax import cli  # light: imports no JAX


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices when on CPU")
  parser.add_argument("--mesh", default="data=2,expert=4",
                      help="mesh axis sizes, e.g. data=2,expert=4")
  parser.add_argument("--step", choices=("forward", "train"), default="forward",
                      help="compile the MoE layer's forward or a whole train step")
  parser.add_argument("--batch", type=int, default=16, help="batch rows")
  parser.add_argument("--seq_len", type=int, default=256, help="tokens per row")
  parser.add_argument("--d_model", type=int, default=256, help="model width D")
  parser.add_argument("--d_ff", type=int, default=1024, help="expert width F")
  parser.add_argument("--experts", type=int, default=8, help="number of experts E")
  parser.add_argument("--top_k", type=int, default=2, help="experts per token")
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="capacity factor")
  parser.add_argument("--dtype", default="float32", help="activation dtype")
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from moejax import audit, sharding  # pylint: disable=import-outside-toplevel
  from moejax.moe import MoEConfig, MoELayer  # pylint: disable=import-outside-toplevel

  shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  mesh = sharding.make_mesh(shape)
  dtype = jnp.dtype(args.dtype)
  cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff,
                  capacity_factor=args.capacity_factor, gate="gshard" if args.top_k > 1 else "softmax")
  with jax.set_mesh(mesh):
    layer = MoELayer(cfg, args.d_model, dtype=dtype, rngs=nnx.Rngs(0))
    x = jax.device_put(jnp.ones((args.batch, args.seq_len, args.d_model), dtype),
                       sharding.batch_sharding(mesh, 3))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params, x):
      y, aux = nnx.merge(graphdef, params, rest)(x)
      return jnp.sum(y.astype(jnp.float32) ** 2) + aux.loss

    fn = forward if args.step == "forward" else jax.grad(forward, argnums=(0, 1))
    compiled = jax.jit(fn).lower(params, x).compile()

  found = audit.collectives(compiled)
  groups_per_device = args.batch // sharding.num_batch_shards(mesh)
  capacity = cfg.capacity(args.seq_len, deterministic=False)
  floor = args.experts * groups_per_device * capacity * args.d_model * dtype.itemsize
  print(f"# MoE layer {args.step} on mesh {dict(mesh.shape)}: E={args.experts} k={args.top_k} "
        f"D={args.d_model} F={args.d_ff} B={args.batch} L={args.seq_len} (one group per "
        f"sequence, {groups_per_device} per device) C={capacity} dtype={args.dtype}")
  for c in found:
    print(f"  {c.kind:<18} {c.bytes:>12,} B  {' '.join(c.shapes)[:100]}")
  print(audit.format_table(found))
  print(f"capacity-buffer floor per all-to-all: E*g*C*D*bytes = {floor:,} B")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
