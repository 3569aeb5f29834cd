"""Sparse upcycling (Komatsuzaki et al. 2022): start a MoE model from a trained dense one.

Every parameter of the dense model is copied into the MoE model of the same architecture; in each
MoE layer every expert starts as a copy of that block's dense MLP, found by name: an expert
parameter is the dense one with the expert axis E in front (`w_up_DF` -> `w_up_EDF[e]`,
`w_gate_DF` -> `w_gate_EDF[e]`, `w_down_FD` -> `w_down_EFD[e]`; `dense_name`), optionally times
`1 + noise * N(0, 1)` per weight so the experts can diverge; routers keep their fresh
initialisation, shared experts (if any) start with a zero output projection, and the optimizer
state starts fresh (the caller builds it). With gates that sum to one over the selected experts
(`gate="gshard"`) and no drops, the upcycled model computes exactly the dense model's function
at step 0 (tested). Works on any mesh: values are placed with each target parameter's sharding.

`start_run` (and its CLI, `experiments/upcycle.py`) writes that model as step 0 of a new run,
which `moejax.main` then trains like any run; it also starts a dense run from a dense one (every
parameter copied: the "continue the dense model" arm of the upcycling study), and can carry the
source run's data position over, so the new run reads the documents after those its source read.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx


def dense_name(expert_name: str) -> str | None:
  """The dense MLP parameter an expert parameter starts from: the same name without the expert
  axis (`w_up_EDF` -> `w_up_DF`, `w_down_EFD` -> `w_down_FD`); None for the router and the
  shared experts (fresh)."""
  stem, _, axes = expert_name.rpartition("_")
  if expert_name.startswith(("router", "shared_")) or not axes.startswith("E"):
    return None
  return f"{stem}_{axes[1:]}"


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
      source_name = dense_name(parts[3])
      if parts[3] == "shared_w_down_EFD":  # Shared experts start silent: the function is exact.
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


def start_run(source_workdir: str, config, workdir: str, *, noise: float = 0.0,
              continue_data: bool = False) -> int:
  """Writes `workdir/checkpoints/0`: `config`'s model started from the latest checkpoint of the
  run in `source_workdir` (upcycled when `config` has MoE layers the source lacks, copied
  otherwise), with a fresh optimizer state. `continue_data`: the new run's data iterator starts
  where the source's stopped (both configs must read the same data with the same seed, sequence
  length and batch size; the trainer checks it on resume). Returns the source run's step."""
  from moejax import checkpoint, optim, sharding, train  # pylint: disable=import-outside-toplevel
  target_dir = os.path.join(workdir, "checkpoints")
  if checkpoint.saved_steps(target_dir):
    raise FileExistsError(f"{workdir} already holds a checkpoint; start the run in a new "
                          "directory.")
  model_cfg = train.validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  source, _, source_step = train.load_model(train.load_run_config(source_workdir),
                                            source_workdir, mesh_shape=dict(config.mesh))
  data_state = None
  if continue_data:
    source_ckpt = checkpoint.Checkpointer(os.path.join(source_workdir, "checkpoints"),
                                          save_every=1, keep=1, async_save=False)
    data_state, _ = source_ckpt.restore_data(source_step)
    source_ckpt.close()
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model, optimizer = train.create_model_and_optimizer(model_cfg, tx, mesh, config.seed)
  with jax.set_mesh(mesh):
    upcycle(source, model, noise=noise, key=jax.random.key(config.seed))
  ckpt = checkpoint.Checkpointer(target_dir, save_every=1, keep=1, async_save=False)
  ckpt.save(0, nnx.state((model, optimizer)), data_state or None,
            meta={"started_from": os.path.abspath(source_workdir), "source_step": source_step,
                  "upcycled": bool(model_cfg.moe_layer_indices)}, force=True)
  ckpt.close()
  return source_step
