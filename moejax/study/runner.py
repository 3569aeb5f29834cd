"""Training a study: every (seed, arm) not yet finished, resumably, each run's records appended to
`results.jsonl` in one write when it finishes.

Resumable at two levels: a run with a final record in `results.jsonl` is skipped (committing
`results.jsonl` is enough to resume on another machine); an interrupted run resumes from its own
checkpoint in `runs/` (the trainer's exact resume). Identical runs are trained once: a run whose
`config_key` (`moejax.study.keys`) finished in another study of the same workdir copies those
records, marked `reused_from`. Order is seed-major, so a partial study already holds complete
paired comparisons.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moejax import config as config_lib
from moejax.study.keys import config_key, data_identity
from moejax.study.results import read_results, run_records
from moejax.study.spec import Arm, Study


def arm_config(study: Study, arm: Arm, seed: int, scale: str,
               data: Mapping[str, Any] | None = None):
  """The ConfigDict of one run: config file (+ arg) -> scale -> arm overrides -> data -> seed."""
  if scale not in study.scales:
    raise ValueError(f"--scale={scale!r}: study {study.name} has scales {sorted(study.scales)}")
  config = config_lib.load_config(arm.config)
  config_lib.apply_overrides(config, study.scales[scale])
  config_lib.apply_overrides(config, arm.overrides)
  config_lib.apply_overrides(config, data or {})
  config.seed = seed
  return config


def data_meta(data: str, tokenizer: str) -> dict[str, str]:
  """How `study.json` and `table.md` name the data, independent of where it lives: 'builtin', a
  TFDS name, or the text files' base names with their identity (`keys.data_identity`)."""
  overrides = config_lib.data_overrides(data, tokenizer)
  meta = {"data": data, "tokenizer": tokenizer}
  if overrides["data.source"] == "text_files":
    meta["data"] = ",".join(os.path.basename(p) for p in data.split(","))
    meta["data_identity"] = data_identity(overrides["data.text_files.paths"])
  return meta


def _check_meta(study_dir: str, meta: dict) -> None:
  path = os.path.join(study_dir, "study.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    different = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
    if different:
      raise ValueError(f"{study_dir} holds runs with other settings {different} (stored, asked); "
                       f"use another --workdir, or the stored settings.")
  else:
    with open(path, "w") as f:
      json.dump(meta, f, indent=2)


def run_study(study: Study, workdir: str, *, scale: str = "cpu", data: str = "builtin",
              tokenizer: str = "byte", seeds: Sequence[int] | None = None,
              train_fn: Callable | None = None, log: Callable[[str], None] | None = None,
              on_run_finished: Callable[[], None] | None = None) -> list[dict]:
  """Trains every (seed, arm) not yet finished, appending to `results.jsonl`; returns all records.

  `train_fn(config, run_dir)` defaults to `moejax.train.train_and_evaluate`; `on_run_finished()`
  is called after each run's records are written (the command rewrites the table there, so a
  committed `results.jsonl` always has its table). After each run the process's compiled
  programs are released (`release_compiled_programs`): a caller's own jitted functions recompile
  on their next call.
  """
  log = log or functools.partial(print, flush=True)
  if study.reuse:
    raise ValueError(f"study {study.name} reuses the runs of {study.reuse}: run that study")
  if train_fn is None:
    from moejax import train  # pylint: disable=import-outside-toplevel
    train_fn = train.train_and_evaluate
  study_dir = os.path.join(workdir, study.name)
  os.makedirs(study_dir, exist_ok=True)
  seeds = tuple(seeds if seeds is not None else study.seeds)
  _check_meta(study_dir, {"study": study.name, "scale": scale, **data_meta(data, tokenizer)})
  results_path = os.path.join(study_dir, "results.jsonl")
  overrides = config_lib.data_overrides(data, tokenizer)
  plan = [(seed, arm) for seed in seeds for arm in study.arms]
  configs = {(a.name, s): arm_config(study, a, s, scale, overrides) for s, a in plan}
  keys: dict[tuple[str, int], str] = {}
  for s, a in plan:  # A run started from another run's checkpoint is keyed by both.
    keys[(a.name, s)] = config_key(configs[(a.name, s)]) + (
        f"+from:{keys[(a.start_from, s)]}" if a.start_from else "")
  # Validate every run's config before training any: a typo fails now, not after an hour.
  for arm in study.arms:
    config_lib.validate_config(configs[(arm.name, seeds[0])])
  finished = [r for r in read_results(results_path) if r.get("final")]
  for r in finished:  # A finished run counts only if it ran the config the study asks for now.
    key = keys.get((r["arm"], r["seed"]))
    if key is not None and r.get("config_key", key) != key:
      raise ValueError(f"{results_path}: {r['arm']!r} seed {r['seed']} finished with another "
                       f"config than the study now defines (edited arm?); use another --workdir "
                       f"or remove its records and runs/ directory.")
  done = {(r["arm"], r["seed"]) for r in finished}
  todo = [(s, a) for s, a in plan if (a.name, s) not in done]
  log(f"[{study.name}] {len(plan)} runs, {len(plan) - len(todo)} finished, {len(todo)} to go "
      f"(scale={scale}, data={data})")
  durations = [r["wall_s"] for r in finished if r.get("wall_s") and "reused_from" not in r]
  for i, (seed, arm) in enumerate(todo):
    eta = statistics.mean(durations) * (len(todo) - i) if durations else None
    log(f"[{study.name}] run {len(plan) - len(todo) + i + 1}/{len(plan)}: {arm.name} seed {seed}"
        + (f" (ETA {eta / 60:.0f} min)" if eta else ""))
    config = configs[(arm.name, seed)]
    key = keys[(arm.name, seed)]
    same = _finished_elsewhere(workdir, key)
    extras = _extra_measurements(study, config)
    source_dir, missing = "", []
    if same:
      source_dir = os.path.join(workdir, same[-1]["study"], "runs", _slug(same[-1]["arm"]),
                                f"seed{seed}")
      missing = [fn for name, fn in extras.items() if name not in same[-1]["metrics"]]
    if missing and not os.path.isdir(source_dir):
      same = []  # Its checkpoint is gone, and this study measures more: train it here.
    if same:  # The same config (and data, seed) finished in another study: reuse its records.
      log(f"[{study.name}]   identical to {same[0]['study']}/{same[0]['arm']} seed {seed}: reused")
      records = [{**r, "study": study.name, "arm": arm.name, "reused_from": r["study"]}
                 for r in same]
      records[-1] = {**records[-1], "metrics": dict(records[-1]["metrics"])}
      for measure in missing:
        records[-1]["metrics"].update(measure(source_dir))
    else:
      run_dir = os.path.join(study_dir, "runs", _slug(arm.name), f"seed{seed}")
      if arm.start_from:
        _start_from(workdir, study_dir, arm, seed, keys[(arm.start_from, seed)], config, run_dir)
      wall = _train_timed(train_fn, config, run_dir, key)
      durations.append(wall)
      records = [{**r, "config_key": key}
                 for r in run_records(run_dir, study.name, arm.name, seed, wall)]
      for measure in extras.values():
        records[-1]["metrics"].update(measure(run_dir))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    with open(results_path, "a") as f:  # One write: a run's records land together.
      f.write(lines)
    release_compiled_programs()
    if on_run_finished is not None:
      on_run_finished()
  return read_results(results_path)


def release_compiled_programs() -> None:
  """Frees the executables of finished runs: `jax.clear_caches()`, then a garbage collection.

  XLA:CPU maps each compiled program's kernel code into memory mappings of its own (a few for a
  small program, about a hundred for a 30-layer gradient), and JAX's jit caches keep every
  program alive. A process that compiles many distinct programs (a study sweeping model sizes; a
  test worker running hundreds of tests) can reach the kernel's `vm.max_map_count` (65,530 by
  default); past it nothing more can be mapped: starting a thread fails (array_record's thread
  pool then hangs in its constructor) and loading an executable segfaults. The next run compiles afresh or loads from the persistent
  compilation cache.
  """
  import jax  # pylint: disable=import-outside-toplevel  (`moejax.study` stays JAX-free to import)
  jax.clear_caches()
  gc.collect()


def _start_from(workdir: str, study_dir: str, arm: Arm, seed: int, source_key: str, config,
                run_dir: str) -> None:
  """Writes step 0 of `arm`'s run from its source arm's final checkpoint (once: a run that has a
  checkpoint already resumes from it)."""
  from moejax import checkpoint, upcycle  # pylint: disable=import-outside-toplevel
  if checkpoint.saved_steps(os.path.join(run_dir, "checkpoints")):
    return
  source_dir = os.path.join(study_dir, "runs", _slug(arm.start_from), f"seed{seed}")
  same = _finished_elsewhere(workdir, source_key)
  if same and same[-1]["study"] != os.path.basename(study_dir):  # Reused from another study.
    source_dir = os.path.join(workdir, same[-1]["study"], "runs", _slug(same[-1]["arm"]),
                              f"seed{seed}")
  if not checkpoint.saved_steps(os.path.join(source_dir, "checkpoints")):
    raise FileNotFoundError(
        f"arm {arm.name!r} seed {seed} starts from {arm.start_from!r}, whose checkpoint is not in "
        f"{source_dir}/checkpoints (its records were committed, its runs/ were not); remove its "
        f"records from results.jsonl to train it again.")
  os.makedirs(run_dir, exist_ok=True)
  upcycle.start_run(source_dir, config, run_dir, continue_data=True)


def _is_moe(config) -> bool:
  return bool(config.model.moe_every or config.model.moe_layers)


def _extra_measurements(study: Study, config) -> dict[str, Callable[[str], dict[str, float]]]:
  """Post-training measurements the study asks for on this run: {metric key: fn(run_dir)}."""
  if not _is_moe(config):
    return {}
  out = {}
  if study.causal_leak_positions:
    out["leak"] = functools.partial(_leak, positions=study.causal_leak_positions)
    if study.causal_leak_at_train_cf:
      out["leak_train_cf"] = functools.partial(
          _leak, positions=study.causal_leak_positions,
          capacity_factor=float(config.model.moe.capacity_factor), suffix="_train_cf")
  if study.router_precision:
    out["router_dtype_disagreement"] = _router_precision
  return out


def _leak(run_dir: str, positions: int, capacity_factor: float | None = None,
          suffix: str = "") -> dict[str, float]:
  """`leak`, `causal_ce`, `teacher_forced_ce` (+ `suffix`) of a finished run (`moejax.causal`),
  at its eval capacity factor or at `capacity_factor`."""
  from moejax import causal  # pylint: disable=import-outside-toplevel
  leak = causal.measure_run(run_dir, positions, capacity_factor=capacity_factor)
  return {k + suffix: leak[k] for k in ("leak", "causal_ce", "teacher_forced_ce")}


def _router_precision(run_dir: str) -> dict[str, float]:
  """`router_dtype_disagreement`: top-1 experts that differ between a float32 and a bfloat16
  router on the same layer inputs (one eval batch of the run's data, mean over MoE layers)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax import analysis, train  # pylint: disable=import-outside-toplevel
  from moejax.moe import MoELayer  # pylint: disable=import-outside-toplevel
  config = train.load_run_config(run_dir)
  model, mesh, _ = train.load_model(config, run_dir)
  layers = {tuple(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, MoELayer)}
  with jax.set_mesh(mesh):
    batch = train.first_eval_batch(config, mesh)
    forward = nnx.capture(lambda m: m(batch["inputs"], batch["positions"], batch["segment_ids"],
                                      batch["mask"], deterministic=True,
                                      moe_record_routing=True), nnx.Intermediate)
    _, sown = forward(model)
  rates = [analysis.router_dtype_disagreement(v.get_value()[0], layers[tuple(path[:-1])].router_DE[...],
                                              batch["mask"])
           for path, v in nnx.to_flat_state(sown) if path[-1] == "router_input"]
  return {"router_dtype_disagreement": statistics.mean(rates)}


def _train_timed(train_fn: Callable, config, run_dir: str, key: str) -> float:
  """Trains (or resumes) one run; returns its total wall time over every resumed segment.

  `run_dir/config_key` pins the run directory to its config: resuming a checkpoint written by
  another config (an edited arm) is an error, not a silent mix.
  """
  os.makedirs(run_dir, exist_ok=True)
  key_path, wall_path = os.path.join(run_dir, "config_key"), os.path.join(run_dir, "wall_s")
  if os.path.exists(key_path):
    with open(key_path) as f:
      old = f.read().strip()
    if old != key:
      raise ValueError(f"{run_dir} holds a run of another config ({old} != {key}); remove it "
                       "to start this run afresh.")
  with open(key_path, "w") as f:
    f.write(key)
  before = float(open(wall_path).read()) if os.path.exists(wall_path) else 0.0
  start = time.time()
  try:
    train_fn(config, run_dir)
  finally:
    with open(wall_path, "w") as f:
      f.write(str(before + time.time() - start))
  return before + time.time() - start


def _finished_elsewhere(workdir: str, key: str) -> list[dict]:
  """The records of one finished run with config `key` in any study under `workdir`."""
  for name in sorted(os.listdir(workdir)):
    records = [r for r in read_results(os.path.join(workdir, name, "results.jsonl"))
               if r.get("config_key") == key and "reused_from" not in r]
    finals = [r for r in records if r.get("final")]
    if finals:  # Exactly one run: the (arm, seed) of the first finished match.
      run = (finals[0]["arm"], finals[0]["seed"])
      return sorted((r for r in records if (r["arm"], r["seed"]) == run), key=lambda r: r["step"])
  return []


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)

