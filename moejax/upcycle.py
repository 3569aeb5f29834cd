"""Sparse upcycling (Komatsuzaki et al. 2022): start a MoE model from a trained dense one.

Every parameter of the dense model is copied into the MoE model of the same architecture; in each
MoE layer every expert starts as a copy of that block's dense MLP (`DENSE_OF`: `w_up_DF` -> `wi[e]`,
`w_gate_DF` -> `wi_gate[e]`, `w_down_FD` -> `wo[e]`), optionally times `1 + noise * N(0, 1)` per
weight so the experts can diverge; routers keep their fresh initialisation, shared experts (if
any) start with a zero output projection, and the optimizer
state starts fresh (the caller builds it). With gates that sum to one over the selected experts
(`gate="gshard"`) and no drops, the upcycled model computes exactly the dense model's function
at step 0 (tested). Works on any mesh: values are placed with each target parameter's sharding.

`experiments/upcycle.py` writes an upcycled checkpoint at step 0 into a new workdir, which
`moejax.main` then trains like any run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Expert parameter of a MoE layer -> the dense MLP parameter it starts from.
DENSE_OF = {"wi": "w_up_DF", "wi_gate": "w_gate_DF", "wo": "w_down_FD"}


def _path(path) -> str:
  return "/".join(str(p) for p in path)


def upcycle(dense: nnx.Module, moe: nnx.Module, *, noise: float = 0.0,
            key: jax.Array | None = None) -> None:
  """Copies `dense` (a `Transformer`) into `moe` (a `Transformer` with MoE layers) in place.

  Raises ValueError naming the first parameter whose shape differs (other width, depth,
  vocabulary, or an MLP whose activation is gated in one model and not in the other).
  """
  if noise and key is None:
    raise ValueError(f"upcycle: noise={noise} needs a PRNG key.")
  if dense.cfg.scan_layers or moe.cfg.scan_layers:
    raise ValueError("upcycle: both models need model.scan_layers=False (it copies layer by "
                     "layer).")
  dense_params = {_path(p): v for p, v in nnx.to_flat_state(nnx.state(dense, nnx.Param))}
  moe_params = dict(nnx.to_flat_state(nnx.state(moe, nnx.Param)))
  moe_layers = {i for i, block in enumerate(moe.blocks) if block.is_moe}
  updated = []
  for i, block in enumerate(moe.blocks):
    if i in moe_layers and dense.blocks[i].is_moe:
      raise ValueError(f"upcycle: block {i} of the dense model is already a MoE layer.")
  for path, var in moe_params.items():
    name = _path(path)
    target = var.get_value()
    parts = name.split("/")
    in_moe = len(parts) >= 4 and parts[0] == "blocks" and int(parts[1]) in moe_layers
    if in_moe and parts[2] == "ffn":
      source_name = DENSE_OF.get(parts[3])
      if parts[3] == "shared_wo":  # Shared experts start silent: the function stays exact.
        updated.append((path, var.replace(jnp.zeros_like(target))))
        continue
      if source_name is None:  # The router and the shared experts' inputs: fresh.
        updated.append((path, var))
        continue
      source = dense_params.get(f"blocks/{parts[1]}/ffn/{source_name}")
      if source is None or source.get_value().shape != target.shape[1:]:
        raise ValueError(
            f"upcycle: expert parameter {name!r} {tuple(target.shape)} has no dense source of "
            f"shape {tuple(target.shape[1:])}: blocks/{parts[1]}/ffn/{source_name} is "
            + (f"{tuple(source.get_value().shape)}" if source is not None else "missing")
            + " (the MoE layer's d_ff and activation must equal the dense MLP's).")
      value = jnp.broadcast_to(source.get_value(), target.shape)
      if noise:
        key, sub = jax.random.split(key)
        value = value * (1 + noise * jax.random.normal(sub, target.shape, value.dtype))
    else:
      source = dense_params.get(name)
      if source is None or source.get_value().shape != target.shape:
        raise ValueError(
            f"upcycle: parameter {name!r} has shape {tuple(target.shape)} in the MoE model and "
            + (f"{tuple(source.get_value().shape)}" if source is not None else "is missing")
            + " in the dense model (the two configs must match except for the MoE layers).")
      value = source.get_value()
    updated.append((path, var.replace(jax.device_put(value.astype(target.dtype),
                                                     target.sharding))))
  nnx.update(moe, nnx.from_flat_state(updated))
