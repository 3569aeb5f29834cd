"""`train_and_evaluate(config, workdir)`: train, evaluate and checkpoint a decoder-only MoE LM.

One linear function in banner-commented sections (config → mesh → data → model & optimizer →
checkpoint/resume → jitted steps → loop). Design decisions, each for a reason:

- Functional core: `nnx.split` once, then pure `jax.jit` functions over the NNX `State`, with the
  state's shardings as in/out shardings and the state donated — no graph traversal per step.
- Loss = masked CE / (real target tokens in the *whole* batch) + the MoE aux losses. Normalising
  by the whole batch makes gradient accumulation exact (micro-batches are summed in a scan).
- Train/eval/no-drop differ only in static call arguments of the model (`deterministic`,
  `moe_capacity_factor`): one graphdef, one state, a jitted function per variant.
- The loop dispatches step n+1 before reading step n's loss (asynchronous dispatch keeps the
  device busy); before a checkpoint the current step's loss is checked, so a non-finite state is
  never saved. NaN/Inf stops the run naming the step and the last good checkpoint.
- Determinism: everything random comes from `config.seed` (params, routing noise, data order);
  the same seed on the same device count gives the same losses, and resuming from a checkpoint
  (params, optimizer, step, RNG streams, data-iterator position) continues bit-identically.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from absl import logging
from flax import nnx

from moejax import analysis
from moejax import checkpoint as ckpt_lib
from moejax import cli
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import metrics as metrics_lib
from moejax import optim
from moejax import routing
from moejax import sharding
from moejax.model import Transformer, TransformerConfig, count_params, masked_ce_sums

# Config validation lives in moejax.config; the trainer's name for it is kept.
validate_config = config_lib.validate_config

# What the model reads of a pipeline batch (everything but the analysis-only `domain`).
BATCH_KEYS = tuple(k for k in data_lib.BATCH_KEYS if k != "domain")


def _moe_metrics(moe_aux: dict[int, Any]) -> dict[str, jax.Array]:
  """Per-layer `moe/layer{i}/{stat}`, layer means `moe/{stat}`, and `moe/aux_loss` (their sum)."""
  if not moe_aux:  # A dense model logs no MoE keys.
    return {}
  out = {"moe/aux_loss": sum(a.loss for a in moe_aux.values())}
  for i, aux in moe_aux.items():
    for name, value in aux.metrics.items():
      out[f"moe/layer{i}/{name}"] = value
      if jnp.ndim(value) == 0:
        out[f"moe/{name}"] = out.get(f"moe/{name}", 0.0) + value / len(moe_aux)
  return out


# --------------------------------------------------------------------------------------------------
# The train and eval steps: pure functions of the (model, optimizer) state, jitted by the caller
# with the mesh's shardings (`train_and_evaluate`, `experiments/bench_train.py`).
# --------------------------------------------------------------------------------------------------


def _loss_fn(params, rest, model_graphdef, batch, num_targets, grad_accum_steps: int,
             step_balance=None, deterministic=None, capacity_factor=None):
  """Mean token CE over the whole batch's `num_targets` + this micro-batch's share of the MoE
  auxiliary losses; aux: (non-param state, CE sum, correct count, MoE metrics). `deterministic`
  and `capacity_factor` are the model's call variants (eval: True and the factor to evaluate)."""
  # copy=True: fresh Variables in this trace (the routing RNG counters are mutated here).
  model = nnx.merge(model_graphdef, params, rest, copy=True)
  logits_BLV, moe_aux = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                              batch["mask"], moe_step_balance=step_balance,
                              deterministic=deterministic, moe_capacity_factor=capacity_factor)
  ce_sum, correct = masked_ce_sums(logits_BLV, batch["targets"], batch["mask"])
  stats = _moe_metrics(moe_aux)
  loss = ce_sum / num_targets + stats.get("moe/aux_loss", 0.0) / grad_accum_steps
  return loss, (nnx.state(model, nnx.Not(nnx.Param)), ce_sum, correct, stats)


def _step_balance(params, rest, model_graphdef, micro) -> dict[int, routing.StepBalance]:
  """The routing pre-pass of the `batch`-scope balance losses under gradient accumulation: a
  forward pass over every micro-batch (from the same RNG state as the gradient pass that follows,
  so the same routing decisions) summing each MoE layer's f counts over the whole step."""
  A = jax.tree.leaves(micro)[0].shape[0]

  def count(rest, micro_batch):
    model = nnx.merge(model_graphdef, params, rest, copy=True)
    _, moe_aux = model(micro_batch["inputs"], micro_batch["positions"],
                       micro_batch["segment_ids"], micro_batch["mask"])
    return nnx.state(model, nnx.Not(nnx.Param)), {i: a.balance_counts for i, a in moe_aux.items()}

  _, counts = jax.lax.scan(count, rest, micro)  # The RNG state it advanced is thrown away.
  return {i: routing.StepBalance.from_counts(jax.tree.map(lambda c: jnp.sum(c, axis=0), c), A)
          for i, c in counts.items()}


def make_train_step(graphdef, grad_accum_steps: int, schedule):
  """`train_step(state, batch) -> (state, metrics)` for the `nnx.split((model, optimizer))`
  graphdef: gradients accumulated over `grad_accum_steps` micro-batches, one optimizer update,
  the auxiliary-loss-free selection bias updated from the step's counts. With
  `balance_loss_scope="batch"` and more than one micro-batch, a routing pre-pass
  (`_step_balance`, one extra forward pass per micro-batch) first counts the step's f, so each
  micro-batch's balance losses are its exact share of the whole step's."""
  A = grad_accum_steps

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_targets = jnp.maximum(jnp.sum(batch["mask"]), 1).astype(jnp.float32)
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)
    step_balance = None
    if (A > 1 and model.cfg.moe_layer_indices
        and model.cfg.moe_config().balance_loss_scope == "batch"):
      step_balance = _step_balance(params, rest, model_graphdef, micro)

    def accumulate(carry, micro_batch):
      grads, rest, sums = carry
      (_, (rest, ce_sum, correct, stats)), g = jax.value_and_grad(_loss_fn, has_aux=True)(
          params, rest, model_graphdef, micro_batch, num_targets, A, step_balance)
      # Stats are means over micro-batches, except counts, which are summed (exactly).
      sums = jax.tree.map(jnp.add, sums, {"ce_sum": ce_sum, "correct": correct, **{
          k: v if k.endswith("selection_count") else v / A for k, v in stats.items()}})
      return (jax.tree.map(jnp.add, grads, g), rest, sums), None

    _, (_, _, _, moe_stats_shapes) = jax.eval_shape(
        _loss_fn, params, rest, model_graphdef, jax.tree.map(lambda x: x[0], micro),
        num_targets, A, step_balance)
    zero_sums = {"ce_sum": jnp.zeros(()), "correct": jnp.zeros(()),
                 **jax.tree.map(jnp.zeros_like, moe_stats_shapes)}
    (grads, rest, sums), _ = jax.lax.scan(
        accumulate, (jax.tree.map(jnp.zeros_like, params), rest, zero_sums), micro)
    nnx.update(model, rest)
    # A copy of the values: `optimizer.update` mutates the Variables behind `params` in place.
    old_params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
    optimizer.update(model, grads)
    # Auxiliary-loss-free balancing (DeepSeek-V3), from the step's counts (summed over
    # micro-batches; global on a mesh).
    model.update_selection_biases({i: sums[f"moe/layer{i}/selection_count"]
                                   for i in model.cfg.moe_layer_indices})
    if A > 1 and model.cfg.moe_layer_indices:  # The step's load CV, not a mean of micro-batch CVs.
      cvs = [routing.load_cv(sums[f"moe/layer{i}/selection_count"])
             for i in model.cfg.moe_layer_indices]
      sums.update({f"moe/layer{i}/load_cv": cv for i, cv in zip(model.cfg.moe_layer_indices, cvs)})
      sums["moe/load_cv"] = sum(cvs) / len(cvs)
    new_params = nnx.state(model, nnx.Param)
    ce = sums.pop("ce_sum") / num_targets
    metrics = {"loss": ce + sums.get("moe/aux_loss", 0.0), "ce": ce,
               "accuracy": sums.pop("correct") / num_targets, **sums,
               "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params),
               "update_norm": optax.tree.norm(jax.tree.map(
                   jnp.subtract, nnx.to_pure_dict(new_params), old_params)),
               "lr": schedule(optimizer.step[...] - 1)}
    return nnx.state((model, optimizer)), metrics

  return train_step


def _routes_of(state, batch, *, graphdef) -> dict[int, jax.Array]:
  """Each MoE layer's experts per token (`aux.routes`) for `batch`, in the no-drop eval of the
  (model, optimizer) `state`."""
  model = nnx.merge(graphdef, state, copy=True)[0]
  _, moe_aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], batch["mask"],
                     deterministic=True, moe_capacity_factor=math.inf)
  return {i: aux.routes for i, aux in moe_aux.items()}


def make_eval_step(graphdef):
  """`eval_step(state, batch, capacity_factor) -> sums` (CE, correct, targets, MoE metrics) in
  eval mode; `capacity_factor` (static) picks the variant: None = the eval capacity factor,
  `math.inf` = no drop, a number = that factor."""

  def eval_step(state, batch, capacity_factor):
    model_graphdef, params, rest = nnx.split(nnx.merge(graphdef, state)[0], nnx.Param, ...)
    num_targets = jnp.maximum(jnp.sum(batch["mask"]), 1).astype(jnp.float32)
    _, (_, ce_sum, correct, stats) = _loss_fn(params, rest, model_graphdef, batch, num_targets, 1,
                                              deterministic=True, capacity_factor=capacity_factor)
    return {"ce_sum": ce_sum, "correct": correct, "num_targets": num_targets, **stats}

  return eval_step


def _new_model_and_optimizer(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                             seed: int) -> tuple[Transformer, nnx.Optimizer]:
  """Model and optimizer (call under `jax.set_mesh`, inside a transformation)."""
  model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed, routing=seed + 1,
                                               dropout=seed + 2))
  # Optimizer moments copy their param's metadata; factored (Adafactor) moments have another
  # rank than the param, so re-applying the param's `out_sharding` to them would fail: turn
  # eager sharding off (the params are already sharded) and constrain the moments below.
  param_specs = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and node.get_metadata().get("eager_sharding"):
      node.set_metadata("eager_sharding", False)
    if isinstance(node, nnx.Param):
      param_specs[tuple(path)] = (node.get_value().shape,
                                  node.get_metadata().get("out_sharding"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Moments shaped like their param (AdamW mu/nu, Adafactor's unfactored v) are laid out like
  # it, so expert moments stay sharded over `expert` instead of replicated on every device.
  # Adafactor's factored moments (`v_row`, `v_col`) drop one axis of their param: they keep
  # the param's sharding on the axes that remain (so expert moments stay over `expert`).
  for path, node in nnx.iter_graph(optimizer.opt_state):
    if not isinstance(node, nnx.Variable):
      continue
    value = node.get_value()
    for start in range(len(path)):
      shape, spec = param_specs.get(tuple(path[start:]), (None, None))
      if spec is None:
        continue
      moment = next((p for p in path[:start] if p in ("v_row", "v_col")), None)
      dropped = optim.factored_moment_axis(shape, moment) if moment else None
      if dropped is not None:
        shape = shape[:dropped] + shape[dropped + 1:]
        spec = tuple(spec[:dropped]) + tuple(spec[dropped + 1:])
      if shape == getattr(value, "shape", None):
        node.set_value(jax.lax.with_sharding_constraint(value, P(*spec)))
        break
  return model, optimizer


def create_model_and_optimizer(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                               mesh: jax.sharding.Mesh, seed: int
                               ) -> tuple[Transformer, nnx.Optimizer]:
  """Model and optimizer, created inside jit so every array is born sharded on `mesh`."""
  with jax.set_mesh(mesh):
    return nnx.jit(lambda: _new_model_and_optimizer(model_cfg, tx, seed))()


def state_shapes(model_cfg: TransformerConfig, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, seed: int) -> dict[str, tuple[int, ...]]:
  """The checkpoint names and shapes of (model, optimizer), traced without compiling anything."""
  with jax.set_mesh(mesh):
    flat = jax.eval_shape(
        lambda: ckpt_lib.flatten_state(nnx.state(_new_model_and_optimizer(model_cfg, tx, seed))))
  return {name: tuple(x.shape) for name, x in flat.items()}


def load_run_config(workdir: str):
  """The resolved config a run wrote to `workdir/config.json` (ConfigDict; lists become tuples)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training run's directory (no config.json "
                            "there); allowed: a --workdir that moejax.main trained")
  def tuples(node):
    if isinstance(node, dict):
      return {k: tuples(v) for k, v in node.items()}
    return tuple(tuples(v) for v in node) if isinstance(node, list) else node
  with open(path) as f:
    return ml_collections.ConfigDict(tuples(json.load(f)))


def load_model(config, workdir: str, step: int | None = None,
               mesh_shape: dict[str, int] | None = None
               ) -> tuple[Transformer, jax.sharding.Mesh, int]:
  """The model of a run restored from its checkpoint (`step`, default the latest), in eval mode,
  on the mesh `mesh_shape` (default the run's `config.mesh`) resolves to on this machine: any
  mesh the experts divide, whatever mesh the run was trained on."""
  model_cfg = validate_config(config)
  directory = os.path.join(workdir, "checkpoints")
  steps = ckpt_lib.saved_steps(directory)
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(
        f"{directory}: " + (f"no checkpoint of step {step}; saved steps: {steps}" if steps else
                            "no checkpoint (the run has not saved one yet, or --workdir is "
                            "not a run's directory)"))
  mesh = sharding.make_mesh(dict(config.mesh if mesh_shape is None else mesh_shape))
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  model, optimizer = create_model_and_optimizer(model_cfg, tx, mesh, config.seed)
  checkpointer = ckpt_lib.Checkpointer(directory, save_every=1, keep=1, async_save=False)
  restored, _, meta = checkpointer.restore(nnx.state((model, optimizer)), step)
  checkpointer.close()
  nnx.update((model, optimizer), restored)
  model.eval()
  return model, mesh, int(meta["step"])


def first_eval_batch(config, mesh: jax.sharding.Mesh, seed: int = 0) -> dict[str, jax.Array]:
  """The first batch the trainer's evaluation reads (the model's keys), sharded on `mesh`."""
  it = data_lib.make_pipeline(config.data, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, split=config.data.eval_split,
                              seed=seed)
  batch = {k: np.asarray(v) for k, v in next(it).items() if k in BATCH_KEYS}
  return data_lib.make_global_batch(batch, mesh, config.batch_size)


def finished_run(workdir: str, config) -> dict[str, float] | None:
  """The final eval metrics of a run of this very `config` (its `config.json` is the same) that
  has a complete checkpoint at `num_train_steps` and logged its eval there (`metrics.jsonl`);
  else None (a new, interrupted, extended, changed or damaged run: the normal path)."""
  num_train_steps = config.num_train_steps
  steps = ckpt_lib.saved_steps(os.path.join(workdir, "checkpoints"))
  path = os.path.join(workdir, "metrics.jsonl")
  config_path = os.path.join(workdir, "config.json")
  if (not steps or steps[-1] != num_train_steps or not os.path.exists(path)
      or not os.path.exists(config_path) or not ckpt_lib.looks_complete(
          os.path.join(workdir, "checkpoints", str(num_train_steps)))):
    return None  # The normal path reports (or resumes from) whatever is there.
  with open(config_path) as f:
    if json.load(f) != json.loads(config.to_json_best_effort(sort_keys=True)):
      return None
  final = None
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if row.get("split") == "eval" and row.get("step") == num_train_steps:
        final = {k: float(v) for k, v in row.items()
                 if k not in ("step", "split") and isinstance(v, (int, float))}
  return final


def train_and_evaluate(config, workdir: str, *, make_pipeline: Callable | None = None
                       ) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns final eval metrics.

  `make_pipeline(data_config, *, seq_len, global_batch_size, split, seed)` defaults to
  `moejax.data.make_pipeline`; tests pass a synthetic one.
  """
  # ----------------------------------------------------------------------------------------------
  # Config, workdir and writers.
  # ----------------------------------------------------------------------------------------------
  cli.quiet_library_logs()  # first: validation may start JAX's backends (their probe)
  start_time = time.time()
  model_cfg = validate_config(config)
  is_main = jax.process_index() == 0
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file; allowed: a directory (new or a "
                             "run's, to resume it).")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    data_lib.config.resolve_paths(config.data)  # The saved config must not depend on the cwd.
  finished = finished_run(workdir, config)
  if finished is not None:  # Nothing to train: build nothing, write nothing.
    logging.info("already finished at step %d (checkpoints in %s): eval CE %.4f%s; nothing "
                 "trained or written", config.num_train_steps, os.path.join(workdir, "checkpoints"),
                 finished.get("ce", float("nan")),
                 f", no-drop CE {finished['nodrop/ce']:.4f}" if "nodrop/ce" in finished else "")
    return finished

  # ----------------------------------------------------------------------------------------------
  # Mesh: batch over (data, fsdp, expert); parameters laid out by sharding.LOGICAL_AXIS_RULES.
  # ----------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(dict(config.mesh))
  batch_sharding = sharding.batch_sharding(mesh, 2)
  logging.info("mesh %s on %d devices", dict(mesh.shape), jax.device_count())

  # ----------------------------------------------------------------------------------------------
  # Input pipeline. Each process reads its share of the global batch. The eval batches are read
  # now, so a bad eval split fails here, not after the first `eval_every` steps.
  # ----------------------------------------------------------------------------------------------
  make_pipeline = make_pipeline or data_lib.make_pipeline  # TFDS is imported only on its paths.

  def pipeline(split: str, seed: int):
    return make_pipeline(config.data, seq_len=config.seq_len,
                         global_batch_size=config.batch_size, split=split, seed=seed)

  def to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return data_lib.make_global_batch({k: np.asarray(batch[k]) for k in BATCH_KEYS}, mesh,
                                      config.batch_size)

  train_iter = pipeline(config.data.train_split, config.seed)
  # Every evaluation sees the same batches: read once (a few MB of token ids).
  eval_batches = [{k: np.asarray(b[k]) for k in BATCH_KEYS}
                  for b in itertools.islice(pipeline(config.data.eval_split, 0),
                                            config.eval_steps)]
  if not eval_batches:
    raise ValueError(f"config.data.eval_split={config.data.eval_split!r} yields no batch; "
                     "allowed: a split with at least one document.")

  # ----------------------------------------------------------------------------------------------
  # Checkpoint: the latest complete one in workdir, if any, is checked against this model and
  # data pipeline before anything is compiled or written.
  # ----------------------------------------------------------------------------------------------
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       save_every=config.checkpoint_every,
                                       keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoint)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    checkpointer.check_restorable(resume_step, state_shapes(model_cfg, tx, mesh, config.seed))
    data_state, _ = checkpointer.restore_data(resume_step)
    if data_state:
      train_iter.set_state(data_state)  # Refuses another seq_len, batch, source or tokenizer.

  # ----------------------------------------------------------------------------------------------
  # Writers: only now does the run write into workdir.
  # ----------------------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  counts = count_params(model_cfg, config.seq_len)
  logging.info("%s", counts.summary())
  if is_main:
    with open(os.path.join(workdir, "model_info.json"), "w") as f:
      json.dump({**vars(counts), "moe_layers": list(model_cfg.moe_layer_indices)}, f, indent=2)

  # ----------------------------------------------------------------------------------------------
  # Model and optimizer, created inside jit so every array is born sharded on the mesh.
  # ----------------------------------------------------------------------------------------------
  model, optimizer = create_model_and_optimizer(model_cfg, tx, mesh, config.seed)
  graphdef, state = nnx.split((model, optimizer))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  del model, optimizer  # From here on, `state` is the single source of truth.

  step = 0
  if resume_step is not None:
    state, _, meta = checkpointer.restore(state, resume_step)
    step = int(meta["step"])
    writer.drop_after(step)  # Steps logged after this checkpoint are about to be redone.
    if is_main and os.path.isdir(os.path.join(workdir, "routing")):  # ... and their traces.
      for name in os.listdir(os.path.join(workdir, "routing")):
        traced = name.removeprefix("step_").removesuffix(".npz")
        if traced.isdigit() and int(traced) > step:
          os.remove(os.path.join(workdir, "routing", name))
    logging.info("resumed from %s at step %d", checkpointer.directory, step)

  # ----------------------------------------------------------------------------------------------
  # Train and eval steps, jitted with the mesh's shardings.
  # ----------------------------------------------------------------------------------------------
  eval_step = make_eval_step(graphdef)
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  with jax.set_mesh(mesh):
    train_step = jax.jit(make_train_step(graphdef, config.grad_accum_steps, schedule),
                         in_shardings=(state_sharding, batch_shardings),
                         out_shardings=(state_sharding, None), donate_argnums=(0,))
    # The eval variants: capacity factor None = the eval factor; `nodrop`; and fixed factors
    # (ST-MoE Table 8 curve, logged as `cf{x}/...`, evaluated at the last step only).
    variants = [("eval", None)]
    if model_cfg.moe_layer_indices:
      variants += [("nodrop", math.inf)] if config.eval_no_drop else []
      variants += [(f"cf{float(cf):g}", float(cf))
                   for cf in config.get("eval_capacity_factors", ())]
    eval_fns = {name: jax.jit(lambda s, b, cf=cf: eval_step(s, b, cf),
                              in_shardings=(state_sharding, batch_shardings))
                for name, cf in variants}

  trace_every = config.get("routing_trace_every", 0) if model_cfg.moe_layer_indices else 0
  if trace_every:  # Every process computes (the arrays are global); process 0 writes.
    trace_batch = to_device(eval_batches[0])
    with jax.set_mesh(mesh):
      trace_fn = jax.jit(functools.partial(_routes_of, graphdef=graphdef))

  trace_dir = os.path.join(workdir, "routing")
  last_trace = {}  # {"step": n, "routes": {layer: [B, L, K]}}: the previous trace, for `changed`

  def write_routing_trace(state, at_step: int) -> None:
    """`routing/step_<at_step>.npz`: per MoE layer (`layer<i>`), each token's experts on the
    first eval batch ([B, L, K], uint8 when E <= 256), and the batch's `mask`. Logs, per layer,
    `routing/layer<i>/changed_fraction`: the fraction of those tokens whose experts changed since
    the previous trace (read back from disk after a resume)."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    routes, mask = multihost_utils.process_allgather(
        (trace_fn(state, trace_batch), trace_batch["mask"]), tiled=True)
    if not is_main:
      return
    E = model_cfg.moe_config().num_experts
    routes = {i: np.asarray(r, np.uint8 if E <= 256 else np.int32) for i, r in routes.items()}
    mask = np.asarray(mask, bool)
    os.makedirs(trace_dir, exist_ok=True)
    path = os.path.join(trace_dir, f"step_{at_step}.npz")
    np.savez_compressed(path + ".tmp.npz", mask=mask,
                        **{f"layer{i}": r for i, r in routes.items()})
    os.replace(path + ".tmp.npz", path)
    if not last_trace:  # First trace of this process: the latest earlier one on disk, if any.
      earlier = [n for n in analysis.trace_steps(trace_dir) if n < at_step]
      if earlier:  # Only a trace of the same layers and tokens compares (a reused workdir).
        with np.load(os.path.join(trace_dir, f"step_{earlier[-1]}.npz")) as z:
          if all(f"layer{i}" in z.files and z[f"layer{i}"].shape == r.shape
                 for i, r in routes.items()):
            last_trace.update(step=earlier[-1], routes={i: z[f"layer{i}"] for i in routes})
    if last_trace and mask.any():
      writer.write(at_step, {f"layer{i}/changed_fraction": analysis.routes_changed(
          last_trace["routes"][i], r, mask) for i, r in routes.items()}, "routing")
    last_trace.update(step=at_step, routes=routes)

  def evaluate(state, final: bool) -> dict[str, Any]:
    out = {}
    for name, fn in eval_fns.items():
      if name.startswith("cf") and not final:
        continue
      totals = None
      for batch in eval_batches:  # Sums stay on device; one host transfer at the end.
        m = fn(state, to_device(batch))
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
      totals = jax.device_get(totals)
      n = totals.pop("num_targets")
      prefix = "" if name == "eval" else f"{name}/"
      out[f"{prefix}ce"] = totals.pop("ce_sum") / n
      out[f"{prefix}accuracy"] = totals.pop("correct") / n
      out[f"{prefix}perplexity"] = float(np.exp(min(out[f"{prefix}ce"], 50.0)))
      out.update({f"{prefix}{k}": v / len(eval_batches) for k, v in totals.items()})
      overflow = out.get(f"{prefix}moe/ep_overflow_fraction", 0.0)
      if overflow > 0:  # Dropless expert parallelism with bounded receive buffers dropped pairs.
        logging.warning(
            "%s at step %d: %.4g of the expert assignments overflowed a receive buffer and were "
            "dropped (model.moe.receive_buffer_factor=%s); this is not a no-drop evaluation.",
            name, step, overflow, model_cfg.moe_config().receive_buffer_factor)
    return out

  # ----------------------------------------------------------------------------------------------
  # Train loop.
  # ----------------------------------------------------------------------------------------------
  def check_finite(at_step: int, m: dict[str, Any]) -> None:
    # loss and grad_norm come from the params before step `at_step`'s update, param_norm from
    # the params after it: all three finite means the state about to be saved is finite.
    loss, grad_norm, param_norm = (float(m[k]) for k in ("loss", "grad_norm", "param_norm"))
    if not all(map(math.isfinite, (loss, grad_norm, param_norm))):
      checkpointer.wait()
      last = checkpointer.latest_step()
      writer.close()
      raise FloatingPointError(
          f"non-finite training signal at step {at_step}: loss={loss}, grad_norm={grad_norm}, "
          f"param_norm={param_norm}. "
          f"Stopping. Last good checkpoint: "
          + (f"step {last} in {checkpointer.directory}" if last is not None else "none")
          + " (it resumes from there; lower optim.learning_rate or raise z_loss_weight).")

  tokens_per_step = config.batch_size * config.seq_len
  pending = None  # (step, device metrics) of the last dispatched step, not yet checked.
  last_log_time, last_log_step, final_eval = time.time(), step, {}
  logging.info("training from step %d to %d", step, config.num_train_steps)
  with jax.set_mesh(mesh), ckpt_lib.PreemptionWatcher() as preemption:
    while step < config.num_train_steps:
      state, step_metrics = train_step(state, to_device(next(train_iter)))
      step += 1
      if pending is not None:  # Read step n-1 only now, with step n already queued.
        check_finite(pending[0], jax.device_get(
            {k: pending[1][k] for k in ("loss", "grad_norm", "param_norm")}))
      pending = (step, step_metrics)
      is_last = step == config.num_train_steps

      if step % config.log_every == 0 or is_last:
        host = jax.device_get(step_metrics)
        check_finite(step, host)
        now = time.time()
        dt = (now - last_log_time) / max(step - last_log_step, 1)
        host["tokens_per_sec"] = tokens_per_step / dt
        host["step_time_s"] = dt
        eta = (config.num_train_steps - step) * dt
        writer.write(step, host, "train",
                     f" | {host['tokens_per_sec']:,.0f} tok/s ETA {eta / 60:.1f} min")
        last_log_time, last_log_step = time.time(), step

      if trace_every and (step % trace_every == 0 or is_last):
        with jax.set_mesh(mesh):
          write_routing_trace(state, step)

      if step % config.eval_every == 0 or is_last:
        check_finite(step, jax.device_get(step_metrics))
        final_eval = evaluate(state, final=is_last)
        writer.write(step, final_eval, "eval")
        # Restart the throughput clock: neither eval time nor the steps before it count.
        last_log_time, last_log_step = time.time(), step

      saved = step % config.checkpoint_every == 0 or is_last
      if saved:
        check_finite(step, jax.device_get(step_metrics))  # Never save a non-finite state.
        checkpointer.save(step, state, train_iter.get_state(), force=is_last)

      # Called every step on every process (multi-process: JAX's preemption sync point).
      if preemption.reached(step) and not is_last:  # SIGTERM: save this step, then stop.
        if not saved:
          check_finite(step, jax.device_get(step_metrics))
          checkpointer.save(step, state, train_iter.get_state(), force=True)
        checkpointer.close()
        writer.close()
        raise ckpt_lib.Preempted(step, checkpointer.directory)

  if not final_eval:  # Resumed a finished run: nothing trained, so evaluate what was restored.
    with jax.set_mesh(mesh):
      final_eval = evaluate(state, final=True)

  # ----------------------------------------------------------------------------------------------
  # Wrap up: wait for the async save, flush writers.
  # ----------------------------------------------------------------------------------------------
  checkpointer.close()
  writer.close()
  summary = {k: float(v) for k, v in final_eval.items() if np.ndim(v) == 0}
  nodrop = f", no-drop CE {summary['nodrop/ce']:.4f}" if "nodrop/ce" in summary else ""
  logging.info("finished at step %d: eval CE %.4f%s; %s tokens; %.0f s; checkpoints in %s",
               step, summary.get("ce", float("nan")), nodrop,
               f"{step * tokens_per_step:,}", time.time() - start_time, checkpointer.directory)
  return summary
