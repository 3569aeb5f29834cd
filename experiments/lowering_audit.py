"""Lowering audit: what the MoE layer and a train step compile to on TPU and GPU, read on any machine.

    python experiments/lowering_audit.py                       # layer, capacity vs dropless
    python experiments/lowering_audit.py --config=configs/switch.py --platforms=tpu
    python experiments/lowering_audit.py --mesh data=2,expert=4 --platforms=tpu

Lowers with `jax.jit(...).trace(...).lower(lowering_platforms=(platform,))` (no accelerator needed:
fake CPU devices stand in for the mesh) and prints, per platform and variant, every matmul (dense
`dot_general` and grouped `ragged_dot`, with MFLOPs) and every collective (bytes per device) of
the StableHLO that XLA:TPU / XLA:GPU would compile (`moejax.audit.lowered_ops`).

Variants: the MoE layer's fwd+bwd with `dispatch=sort` (capacity buffers) and
`dispatch=dropless`, and, with `--config`, one whole train step of that config with each
dispatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from moejax import cli  # light: imports no JAX


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--platforms", default="tpu,cuda", help="comma-separated: tpu, cuda, cpu")
  parser.add_argument("--mesh", default="data=1",
                      help="mesh axis sizes, e.g. data=2,expert=4 (fake CPU devices)")
  parser.add_argument("--transport", default="auto", choices=("auto", "ragged", "buffered"),
                      help="dropless expert-parallel transport (auto: ragged for TPU/GPU)")
  parser.add_argument("--config", default=None,
                      help="also lower one train step of this config file (e.g. configs/tiny.py)")
  parser.add_argument("--batch", type=int, default=8, help="layer: sequences")
  parser.add_argument("--seq_len", type=int, default=128, help="layer: tokens per sequence")
  parser.add_argument("--d_model", type=int, default=128, help="layer: model width D")
  parser.add_argument("--d_ff", type=int, default=512, help="layer: expert width F")
  parser.add_argument("--experts", type=int, default=8, help="layer: experts E")
  parser.add_argument("--top_k", type=int, default=2, help="layer: experts per token k")
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import math  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel

  from moejax import audit, sharding  # pylint: disable=import-outside-toplevel
  from moejax.moe import DROPLESS_IGNORES, MoEConfig  # pylint: disable=import-outside-toplevel

  shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  devices = jax.devices()[:math.prod(shape.values())]
  mesh = sharding.make_mesh(shape, devices)
  platforms = args.platforms.split(",")

  def layer_ops(platform, dispatch):
    extra = {"ep_transport": args.transport} if dispatch == "dropless" else {}
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff,
                    gate="gshard" if args.top_k > 1 else "softmax", dispatch=dispatch, **extra)
    return audit.lowered_ops(audit.lower_moe_layer(cfg, args.d_model, (args.batch, args.seq_len),
                                                   mesh, platform))

  print(f"# MoE layer fwd+bwd: B={args.batch} L={args.seq_len} D={args.d_model} F={args.d_ff} "
        f"E={args.experts} k={args.top_k}, mesh {dict(mesh.shape)}, float32")
  for platform in platforms:
    for dispatch in ("sort", "dropless"):
      print(f"\n## {platform}: dispatch={dispatch}")
      print(audit.format_lowered(layer_ops(platform, dispatch)))

  if args.config:
    from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
    for platform in platforms:
      for dispatch in ("sort", "dropless"):
        config = config_lib.load_config(args.config)
        config.mesh.update({"data": 1, "fsdp": 1, "expert": 1, "model": 1, **shape})
        if dispatch == "dropless":  # capacity-only fields back to their defaults
          defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
          for name in DROPLESS_IGNORES:
            config.model.moe[name] = defaults[name]
          config.model.moe.ep_transport = args.transport
        config.model.moe.dispatch = dispatch
        ops = audit.lowered_ops(audit.lower_train_step(config, platform, devices))
        print(f"\n## {platform}: one train step of {args.config}, dispatch={dispatch}")
        print(audit.format_lowered(ops))


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
