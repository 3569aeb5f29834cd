"""Reproduction studies: arms x seeds of configs, trained resumably, summarised by a table, plots and
a verdict against a paper's claim.

A study is data (`Study`): the paper claim it tests, a list of arms (a config file, its `:arg`, and
dotted overrides), seeds, named scales (overrides applied to every arm: `cpu` runs here, `tpu` is a
Switch-Base-like size for a pod, validated but not run here), and the claims a verdict reads.
`experiments/studies/<name>.py` define them; `experiments/reproduce.py` is the command.

Design:
- Everything a study writes lives in `DIR/<study>/`: `results.jsonl` (one line per run and eval
  step; a run's lines are appended only when it has finished, the last one with `"final": true`),
  `study.json` (scale, data, tokenizer: a workdir never mixes two), `table.md`, `*.png`, and
  `runs/<arm>/seed<k>/` (the trainer's workdir: checkpoints, metrics.jsonl).
- Resumable at two levels: a run with a final record in `results.jsonl` is skipped (so committing
  `results.jsonl` is enough to resume across machines); an interrupted run resumes from its own
  checkpoint in `runs/` (the trainer's exact resume).
- Identical runs are trained once: every record carries `config_key` (a hash of the resolved
  config: model, data, seed, steps); a run whose key already finished in another study of the same
  workdir (e.g. a dense baseline two studies share) copies those records, marked `reused_from`.
- Order: seed-major (every arm of seed 0, then seed 1, ...), so a partial study already holds
  complete paired comparisons.
- Verdicts are paired over seeds: each claim defines one number per seed (a difference between
  two arms, or a slope across arms), positive when the claim holds; the verdict is a one-sample
  t-test of those numbers: `agrees` when the 95% interval lies above 0, `disagrees` when it lies
  below, otherwise `inconclusive (within seed noise)`. Same seed = same data order, so pairing
  removes the data-order part of the seed noise; the interval uses Student's t with n-1 degrees of
  freedom (at 3 seeds that is mean +- 4.3 standard errors: deliberately hard to pass).
- Matplotlib is imported only when plotting (headless `Agg`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive (within seed noise)"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One configuration of a study. Override values may be callables `f(config) -> value`."""
  name: str
  config: str  # "configs/switch.py" or "configs/switch.py:experts=8" (relative to the repo root).
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  x: float | None = None  # Position on the study's key axis (E, CF, ...); None = reference line.
  series: str = ""  # Curve the arm belongs to in the key plot (e.g. "top-1").
  paper: str = ""  # The paper's figure for this arm, shown beside ours in the table.
  # The name of an earlier arm of the study: this arm's run starts from that arm's final
  # checkpoint of the same seed (`moejax.upcycle.start_run`: upcycled when this arm has MoE
  # layers the source lacks, else copied; fresh optimizer; the source's data position).
  start_from: str = ""


@dataclasses.dataclass(frozen=True)
class Better:
  """Claim: `metric` of arm `a` is lower than `metric_b` (default: `metric`) of arm `b`."""
  text: str
  a: str
  b: str
  metric: str = "nodrop/ce"
  metric_b: str | None = None

  def per_seed(self, final: dict[tuple[str, int], dict]) -> dict[int, float]:
    out = {}
    for (arm, seed), rec in final.items():
      other = final.get((self.b, seed))
      if arm == self.a and other is not None:
        va, vb = rec.get(self.metric), other.get(self.metric_b or self.metric)
        if va is not None and vb is not None:
          out[seed] = vb - va
    return out


@dataclasses.dataclass(frozen=True)
class Trend:
  """Claim: `metric` falls as arm.x grows: per seed, minus the least-squares slope of metric on
  x (log2 x when `log_x`), over `arms` (all of them must be present for that seed)."""
  text: str
  arms: tuple[str, ...]
  metric: str = "nodrop/ce"
  log_x: bool = True
  xs: tuple[float, ...] = ()  # Filled by Study from the arms' x.

  def per_seed(self, final: dict[tuple[str, int], dict]) -> dict[int, float]:
    out = {}
    for seed in sorted({s for _, s in final}):
      ys = [final.get((arm, seed), {}).get(self.metric) for arm in self.arms]
      if any(y is None for y in ys):
        continue
      xs = [math.log2(x) if self.log_x else x for x in self.xs]
      mx, my = statistics.mean(xs), statistics.mean(ys)
      slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
               / sum((x - mx) ** 2 for x in xs))
      out[seed] = -slope
    return out


@dataclasses.dataclass(frozen=True)
class Contrast:
  """Claim: per seed, sum(coef * metric of arm) over `terms` is positive (e.g. diminishing returns:
  (loss@0.5 - loss@1.0) - (loss@1.25 - loss@2.0) > 0)."""
  text: str
  terms: tuple[tuple[float, str, str], ...]  # (coef, arm, metric)

  @property
  def arms(self) -> tuple[str, ...]:
    return tuple(arm for _, arm, _ in self.terms)

  def per_seed(self, final: dict[tuple[str, int], dict]) -> dict[int, float]:
    out = {}
    for seed in sorted({s for _, s in final}):
      values = [final.get((arm, seed), {}).get(metric) for _, arm, metric in self.terms]
      if all(v is not None for v in values):
        out[seed] = sum(c * v for (c, _, _), v in zip(self.terms, values))
    return out


@dataclasses.dataclass(frozen=True)
class Spread:
  """Claim: `metric` varies less across seeds for arm `a` than for arm `b` (two-sided 95% F-test
  on the ratio of sample variances; not paired: the claim is about the seed distribution)."""
  text: str
  a: str
  b: str
  metric: str = "nodrop/ce"

  @property
  def arms(self) -> tuple[str, ...]:
    return (self.a, self.b)


@dataclasses.dataclass(frozen=True)
class ArmPlot:
  """Key plot: `metric` against arm.x, one line per arm.series; arms without x are reference
  lines."""
  filename: str
  metric: str
  xlabel: str
  ylabel: str
  log_x: bool = False


@dataclasses.dataclass(frozen=True)
class MetricPlot:
  """Key plot: for each arm, its final metrics `[(x, metric), ...]` as one curve (e.g. eval loss
  against eval capacity factor)."""
  filename: str
  points: tuple[tuple[float, str], ...]
  xlabel: str
  ylabel: str
  log_x: bool = False


@dataclasses.dataclass(frozen=True)
class StepPlot:
  """Key plot: `metric` of every eval against training step, one curve per arm (mean over seeds,
  band = min..max), like `curves.png` for another metric (e.g. the router z-loss). `log_y`
  needs values > 0."""
  filename: str
  metric: str
  ylabel: str
  log_y: bool = False


@dataclasses.dataclass(frozen=True)
class Study:
  """A paper claim, the arms and seeds that test it, and how to read the result."""
  name: str
  paper: str  # Which table / figure.
  claim: str  # One sentence, with the paper's number where there is one.
  arms: tuple[Arm, ...]
  claims: tuple[Better | Trend | Contrast | Spread, ...]
  scales: Mapping[str, Mapping[str, Any]]  # name -> overrides for every arm ("cpu" first).
  seeds: tuple[int, ...] = (0, 1, 2)
  columns: tuple[tuple[str, str], ...] = (("nodrop/ce", "no-drop eval CE"),)
  plots: tuple[ArmPlot | MetricPlot | StepPlot, ...] = ()
  curve_metric: str = "nodrop/ce"  # Plotted against step in `curves.png`.
  reuse: str | None = None  # Train nothing: read the runs of this study (same arms).
  # > 0: after each MoE run, measure its routing leak on this many positions (`moejax.causal`):
  # final records gain `leak`, `causal_ce`, `teacher_forced_ce`.
  causal_leak_positions: int = 0
  # True: after each MoE run, the fraction of top-1 experts that a bfloat16 router would pick
  # differently from a float32 one on the same inputs (`router_dtype_disagreement`).
  router_precision: bool = False
  notes: str = ""  # Shown under the table: what the numbers mean, caveats.

  def __post_init__(self):
    names = [a.name for a in self.arms]
    if len(set(names)) != len(names):
      raise ValueError(f"study {self.name}: arm names must be unique, got {names}")
    for i, arm in enumerate(self.arms):
      if arm.start_from and arm.start_from not in names[:i]:
        raise ValueError(f"study {self.name}: arm {arm.name!r} starts from {arm.start_from!r}, "
                         f"which must be an arm listed before it; arms are {names}")
    xs = {a.name: a.x for a in self.arms}
    claims = []
    for c in self.claims:
      used = (c.a, c.b) if isinstance(c, Better) else c.arms
      unknown = [a for a in used if a not in xs]
      if unknown:
        raise ValueError(f"study {self.name}: claim {c.text!r} names unknown arms {unknown}; "
                         f"arms are {names}")
      if isinstance(c, Trend):
        c = dataclasses.replace(c, xs=tuple(xs[a] for a in c.arms))
        if (any(x is None or (c.log_x and x <= 0) for x in c.xs) or len(set(c.xs)) < 2):
          raise ValueError(f"study {self.name}: trend {c.text!r} needs arms with at least two "
                           f"distinct x{' > 0 (log_x)' if c.log_x else ''}; got {c.xs}")
      claims.append(c)
    object.__setattr__(self, "claims", tuple(claims))


# --------------------------------------------------------------------------------------------------
# Configs of a study's runs.
# --------------------------------------------------------------------------------------------------


def load_config_module(path: str):
  """Imports a config file with the repository root on sys.path (configs import configs.common)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(
      "moejax_study_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_overrides(config, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys in order; a callable value is called with the config first."""
  for key, value in overrides.items():
    value = value(config) if callable(value) else value
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"override {key!r}: config has no field {leaf!r} (fields: {sorted(node)})")
    node[leaf] = value


def data_overrides(data: str, tokenizer: str = "byte") -> dict[str, Any]:
  """`--data`: 'builtin', a TFDS name ('lm1b', 'wiki40b/en'), or comma-separated text files."""
  out: dict[str, Any] = {"data.tokenizer": tokenizer}
  if data == "builtin":
    out["data.source"] = "builtin"
  elif any(p.endswith(".txt") or os.path.exists(p) or "*" in p for p in data.split(",")):
    missing = [p for p in data.split(",") if "*" not in p and not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"--data: text files {missing} do not exist")
    out["data.source"] = "text_files"
    out["data.text_files.paths"] = ",".join(os.path.abspath(p) if "*" not in p else p
                                            for p in data.split(","))
  else:
    out.update({"data.source": "tfds", "data.tfds.name": data})
  return out


def arm_config(study: Study, arm: Arm, seed: int, scale: str,
               data: Mapping[str, Any] | None = None):
  """The ConfigDict of one run: config file (+ arg) -> scale -> arm overrides -> data -> seed."""
  if scale not in study.scales:
    raise ValueError(f"--scale={scale!r}: study {study.name} has scales {sorted(study.scales)}")
  path, _, arg = arm.config.partition(":")
  config = load_config_module(path).get_config(arg or None)
  apply_overrides(config, study.scales[scale])
  apply_overrides(config, arm.overrides)
  apply_overrides(config, data or {})
  config.seed = seed
  return config


# --------------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------------


def read_results(path: str) -> list[dict]:
  """Records of `results.jsonl`; a truncated last line (a kill mid-write) is ignored, and a
  (arm, seed, step) written twice keeps its last copy."""
  if not os.path.exists(path):
    return []
  records = {}
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      records[(r["arm"], r["seed"], r["step"])] = r
  return list(records.values())


def final_records(records: Sequence[dict]) -> dict[tuple[str, int], dict]:
  """(arm, seed) -> metrics of the finished run's last evaluation."""
  return {(r["arm"], r["seed"]): r["metrics"] for r in records if r.get("final")}


SPIKE_NATS, SPIKE_WINDOW = 0.1, 10


def loss_spikes(losses: Sequence[float], threshold: float = SPIKE_NATS,
                window: int = SPIKE_WINDOW) -> int:
  """How many logged training losses exceed the mean of the `window` before them by more than
  `threshold` nats (ST-MoE's instability, counted at the logging frequency), plus non-finite."""
  spikes = 0
  for i in range(window, len(losses)):
    before = statistics.mean(losses[i - window:i])
    spikes += (not math.isfinite(losses[i])) or losses[i] > before + threshold
  return int(spikes)


def _mean_over(record: dict, prefix: str, stat: str) -> float | None:
  """Mean over MoE layers (and choices) of a per-layer vector statistic, e.g. dropped_fraction."""
  values = []
  for key, value in record.items():
    if key.startswith(prefix + "moe/layer") and key.endswith("/" + stat):
      values.extend(value if isinstance(value, list) else [value])
  return statistics.mean(values) if values else None


def run_records(run_dir: str, study: str, arm: str, seed: int, wall_s: float) -> list[dict]:
  """One record per evaluation of a finished run (from its metrics.jsonl): every scalar eval
  metric, the drop fraction of each eval variant (`drop`, `nodrop/drop`, `cf{x}/drop`), and the
  training drop fraction (`train_drop`): the mean of the logged training steps (one every
  `log_every`) in the last fifth of training, each averaged over MoE layers and choices. The
  final record also has `train_ce`, the training-batch CE over the same steps, and
  `generalisation_gap` = no-drop eval CE - `train_ce`."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  if not evals:
    raise RuntimeError(f"{run_dir}: no eval record in metrics.jsonl")
  last_step = max(r["step"] for r in rows)
  late = [d for r in train if r["step"] > 0.8 * last_step
          if (d := _mean_over(r, "", "dropped_fraction")) is not None]
  late_ce = [r["ce"] for r in train if r["step"] > 0.8 * last_step and "ce" in r]
  tokens_per_sec = [r["tokens_per_sec"] for r in train[1:] if "tokens_per_sec" in r]
  out = []
  for i, r in enumerate(evals):
    metrics = {k: v for k, v in r.items()
               if k not in ("step", "split") and isinstance(v, (int, float))}
    prefixes = {""} | {k[:k.index("moe/layer")] for k in r if "moe/layer" in k}
    for prefix in prefixes:
      drop = _mean_over(r, prefix, "dropped_fraction")
      if drop is not None:
        metrics[f"{prefix}drop"] = drop
    router_loads = [v for k, v in r.items() if k.startswith("moe/layer") and
                    k.endswith("/router_load") and isinstance(v, list)]
    if router_loads:  # Coefficient of variation of the router's per-expert load, layer mean.
      metrics["load_cv"] = statistics.mean(statistics.pstdev(v) / max(statistics.mean(v), 1e-9)
                                           for v in router_loads)
    if "moe/aux_loss" not in r:  # A dense model drops nothing: its no-drop CE is its CE.
      metrics.setdefault("nodrop/ce", metrics["ce"])
    record = {"study": study, "arm": arm, "seed": seed, "step": r["step"], "metrics": metrics}
    if i == len(evals) - 1:
      if late:
        metrics["train_drop"] = statistics.mean(late)
      if late_ce:  # Training-batch CE (train mode) over the last fifth, and the gap to eval.
        metrics["train_ce"] = statistics.mean(late_ce)
        metrics["generalisation_gap"] = metrics.get("nodrop/ce", metrics["ce"]) - metrics["train_ce"]
      metrics["loss_spikes"] = loss_spikes([float(t["loss"]) for t in train if "loss" in t])
      record.update(final=True, wall_s=round(wall_s, 1),
                    tokens_per_sec=round(statistics.median(tokens_per_sec)) if tokens_per_sec
                    else None)
    out.append(record)
  return out


# --------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------


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
              train_fn: Callable | None = None, log: Callable[[str], None] | None = None
              ) -> list[dict]:
  """Trains every (seed, arm) not yet finished, appending to `results.jsonl`; returns all records.

  `train_fn(config, run_dir)` defaults to `moejax.train.train_and_evaluate`.
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
  _check_meta(study_dir, {"study": study.name, "scale": scale, "data": data,
                          "tokenizer": tokenizer})
  results_path = os.path.join(study_dir, "results.jsonl")
  overrides = data_overrides(data, tokenizer)
  plan = [(seed, arm) for seed in seeds for arm in study.arms]
  configs = {(a.name, s): arm_config(study, a, s, scale, overrides) for s, a in plan}
  keys: dict[tuple[str, int], str] = {}
  for s, a in plan:  # A run started from another run's checkpoint is keyed by both.
    keys[(a.name, s)] = config_key(configs[(a.name, s)]) + (
        f"+from:{keys[(a.start_from, s)]}" if a.start_from else "")
  # Validate every run's config before training any: a typo fails now, not after an hour.
  from moejax import train as train_lib  # pylint: disable=import-outside-toplevel
  for arm in study.arms:
    train_lib.validate_config(configs[(arm.name, seeds[0])])
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
  return read_results(results_path)


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
  if study.router_precision:
    out["router_dtype_disagreement"] = _router_precision
  return out


def _leak(run_dir: str, positions: int) -> dict[str, float]:
  """`leak`, `causal_ce`, `teacher_forced_ce` of a finished run (`moejax.causal`)."""
  from moejax import causal  # pylint: disable=import-outside-toplevel
  leak = causal.measure_run(run_dir, positions)
  return {k: leak[k] for k in ("leak", "causal_ce", "teacher_forced_ce")}


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
  for layer in layers.values():
    layer.record_routing = True
  with jax.set_mesh(mesh):
    batch = train.first_eval_batch(config, mesh)
    forward = nnx.capture(lambda m: m(batch["inputs"], batch["positions"], batch["segment_ids"],
                                      batch["mask"]), nnx.Intermediate)
    _, sown = forward(model)
  rates = [analysis.router_dtype_disagreement(v.get_value()[0], layers[tuple(path[:-1])].router[...],
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


# Config fields added after results were committed, with the default they were added with. A
# field at that default leaves the key unchanged, so adding a field does not orphan earlier runs
# (every earlier run had that behaviour); set away from it, it joins the key as usual.
KEY_NEUTRAL_DEFAULTS = {
    ("model", "attention"): "einsum", ("data", "tfds", "domain_key"): "",
    ("mesh", "fsdp"): 1, ("mesh", "model"): 1, ("model", "remat"): "none",
    ("model", "scan_layers"): False,
    **{("model", "moe", name): default for name, default in (
        ("choice", "token"), ("score", "softmax"), ("routed_scaling_factor", 1.0),
        ("num_expert_groups", 1), ("topk_groups", 1), ("bias_update_rate", 0.0),
        ("num_shared_experts", 0), ("shared_d_ff", None), ("balance_loss_scope", "group"),
        ("grouped_matmul", "auto"), ("ep_transport", "auto"), ("receive_buffer_factor", None),
        ("router", "learned"))},
    ("benchmark",): False, ("routing_trace_every",): 0,
    ("data", "train_max_bytes"): None, ("data", "train_max_docs"): None,
}


def config_key(config) -> str:
  """A hash of everything that determines a run (the resolved config, seed and data included)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  for path, default in KEY_NEUTRAL_DEFAULTS.items():
    node = tree
    for part in path[:-1]:
      node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and node.get(path[-1], default) == default:
      node.pop(path[-1], None)
  return hashlib.sha256(json.dumps(tree, sort_keys=True, indent=None).encode()).hexdigest()[:16]


def _finished_elsewhere(workdir: str, key: str) -> list[dict]:
  """The records of one finished run with config `key` in any study under `workdir` (reuse
  assumes the data files were not edited in place since: the key holds their paths)."""
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


# --------------------------------------------------------------------------------------------------
# Verdicts.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str
  status: str
  effect: float  # Mean over seeds of the per-seed number (positive = the claim holds).
  half_width: float  # Of the 95% interval (inf with one seed).
  n: int

  def line(self) -> str:
    if self.n == 0:
      return f"{self.claim}: not run yet"
    if math.isnan(self.half_width):  # Spread: an F-test, no interval on the difference.
      return (f"{self.claim}: std difference {self.effect:+.4f} (F-test of variances, {self.n}+ "
              f"seeds per arm) -> **{self.status}**")
    if self.n == 1:
      return f"{self.claim}: effect {self.effect:+.4f} (one seed, no interval) -> **{self.status}**"
    return (f"{self.claim}: effect {self.effect:+.4f} ± {self.half_width:.4f} (95% CI, paired "
            f"over {self.n} seeds) -> **{self.status}**")


def t_quantile_975(df: int) -> float:
  """Two-sided 95% Student-t critical value."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(0.975, df))


def verdict(claim: Better | Trend | Contrast | Spread, final: dict[tuple[str, int], dict]) -> Verdict:
  """One-sample t-test over seeds of the claim's per-seed effect (positive = claim holds); for
  `Spread`, an F-test of the two arms' variances (effect = std of b - std of a)."""
  if isinstance(claim, Spread):
    return _spread_verdict(claim, final)
  values = list(claim.per_seed(final).values())
  n = len(values)
  if n == 0:
    return Verdict(claim.text, "no finished runs", math.nan, math.inf, 0)
  mean = statistics.mean(values)
  if n == 1:
    return Verdict(claim.text, INCONCLUSIVE, mean, math.inf, 1)
  half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
  status = AGREES if mean - half > 0 else DISAGREES if mean + half < 0 else INCONCLUSIVE
  return Verdict(claim.text, status, mean, half, n)


def _spread_verdict(claim: Spread, final: dict[tuple[str, int], dict]) -> Verdict:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  va = [m[claim.metric] for (arm, _), m in final.items() if arm == claim.a and claim.metric in m]
  vb = [m[claim.metric] for (arm, _), m in final.items() if arm == claim.b and claim.metric in m]
  n = min(len(va), len(vb))
  if n < 2:
    return Verdict(claim.text, "no finished runs" if n == 0 else INCONCLUSIVE,
                   math.nan, math.inf, n)
  sa, sb = statistics.stdev(va), statistics.stdev(vb)
  effect = sb - sa
  if sa == 0 or sb == 0:
    status = AGREES if sb > sa else DISAGREES if sa > sb else INCONCLUSIVE
  else:
    ratio = sb ** 2 / sa ** 2
    status = (AGREES if ratio > stats.f.ppf(0.975, len(vb) - 1, len(va) - 1) else
              DISAGREES if 1 / ratio > stats.f.ppf(0.975, len(va) - 1, len(vb) - 1) else
              INCONCLUSIVE)
  return Verdict(claim.text, status, effect, math.nan, n)


# --------------------------------------------------------------------------------------------------
# Table and plots.
# --------------------------------------------------------------------------------------------------


def _fmt(values: Sequence[float]) -> str:
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def format_table(study: Study, records: Sequence[dict], command: str, meta: dict) -> str:
  """`table.md`: mean ± sample std over seeds per arm, the paper's figure, verdicts, command."""
  final = final_records(records)
  finals = [r for r in records if r.get("final")]
  lines = [f"# {study.name}: {study.paper}", "", f"**Claim.** {study.claim}", "",
           f"Data: `{meta.get('data')}` ({meta.get('tokenizer')} tokens); scale "
           f"`{meta.get('scale')}`; seeds {sorted({s for _, s in final})}; "
           f"{len(finals)} of {len(study.arms) * len(study.seeds)} runs finished.", ""]
  has_paper = any(a.paper for a in study.arms)
  head = ["arm", "seeds", *[title for _, title in study.columns], "min/run"]
  head += ["paper"] if has_paper else []
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm in study.arms:
    runs = [(s, m) for (a, s), m in sorted(final.items()) if a == arm.name]
    walls = [r["wall_s"] for r in finals if r["arm"] == arm.name and r.get("wall_s")]
    cells = [arm.name, str(len(runs))]
    cells += [_fmt([m[k] for _, m in runs if m.get(k) is not None]) for k, _ in study.columns]
    cells.append(f"{statistics.mean(walls) / 60:.1f}" if walls else "-")
    cells += [arm.paper or ""] if has_paper else []
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Verdict", ""]
  lines += [f"- {verdict(c, final).line()}" for c in study.claims]
  if study.notes:
    lines += ["", study.notes.strip()]
  lines += ["", "Regenerate:", "", "```", command, "```", ""]
  return "\n".join(lines)


def plot(study: Study, records: Sequence[dict], out_dir: str) -> list[str]:
  """Writes `curves.png` (curve_metric vs step, mean over seeds with a min-max band) and the
  study's key plots; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  final = final_records(records)
  done = {(a, s) for a, s in final}
  offsets = start_steps(study, records)
  paths = []
  step_label = "training step" + (" (an arm started from another continues its step count)"
                                  if any(offsets.values()) else "")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _step_curves(ax, study, records, study.curve_metric, offsets, done)
  ax.set_xlabel(step_label)
  ax.set_ylabel(study.curve_metric + " (nats per token)")
  ax.set_title(f"{study.name}: eval loss (mean over seeds, band = min..max)")
  _zoom_to_tail(ax, records, study.curve_metric, done)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  paths.append(save_figure(fig, out_dir, "curves.png"))

  for spec in study.plots:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if isinstance(spec, StepPlot):
      if spec.log_y:
        ax.set_yscale("log")
      _step_curves(ax, study, records, spec.metric, offsets, done)
      ax.set_xlabel(step_label)
      ax.set_ylabel(spec.ylabel)
      ax.set_title(f"{study.name}: {spec.metric} (mean over seeds, band = min..max)", fontsize=10)
    else:
      if spec.log_x:  # Before drawing: the plots set their own ticks at the arms' x.
        ax.set_xscale("log", base=2)
      if isinstance(spec, ArmPlot):
        _arm_plot(ax, study, spec, final)
      else:
        _metric_plot(ax, study, spec, final)
      ax.set_xlabel(spec.xlabel)
      ax.set_ylabel(spec.ylabel)
      ax.set_title(f"{study.name}: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir, spec.filename))
  return paths


def _step_curves(ax, study: Study, records: Sequence[dict], metric: str,
                 offsets: Mapping[str, int], done: set[tuple[str, int]]) -> None:
  """Per arm, `metric` of its finished runs' evals against step: mean line, min..max band; the
  label's n counts the seeds at the last step."""
  if len(study.arms) > 10:  # More arms than the default color cycle: no two share a color.
    import matplotlib  # pylint: disable=import-outside-toplevel
    ax.set_prop_cycle(color=matplotlib.colormaps["tab20"].colors)
  for arm in study.arms:
    by_step: dict[int, list[float]] = {}
    for r in records:
      if r["arm"] == arm.name and (r["arm"], r["seed"]) in done and metric in r["metrics"]:
        by_step.setdefault(offsets[arm.name] + r["step"], []).append(r["metrics"][metric])
    if not by_step:
      continue
    steps = sorted(by_step)
    mean = [statistics.mean(by_step[s]) for s in steps]
    line, = ax.plot(steps, mean, marker=".", label=f"{arm.name} (n={len(by_step[steps[-1]])})")
    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                    color=line.get_color(), alpha=0.2)


def start_steps(study: Study, records: Sequence[dict]) -> dict[str, int]:
  """Per arm, the optimizer steps its weights had seen before its own step 0: 0 for an arm trained
  from scratch; the source's own offset plus its last recorded step for `start_from` arms."""
  last: dict[str, int] = {}
  for r in records:
    last[r["arm"]] = max(last.get(r["arm"], 0), r["step"])
  by_name = {a.name: a for a in study.arms}
  def offset(arm: Arm) -> int:
    if not arm.start_from:
      return 0
    return offset(by_name[arm.start_from]) + last.get(arm.start_from, 0)
  return {a.name: offset(a) for a in study.arms}


def _values(final, arm: str, metric: str) -> list[float]:
  return [m[metric] for (a, _), m in sorted(final.items()) if a == arm and metric in m]


def _arm_plot(ax, study: Study, spec: ArmPlot, final) -> None:
  series: dict[str, list[Arm]] = {}
  for arm in study.arms:
    if arm.x is not None:
      series.setdefault(arm.series, []).append(arm)
  for name, arms in series.items():
    pts = [(a.x, _values(final, a.name, spec.metric)) for a in arms]
    pts = [(x, v) for x, v in pts if v]
    if pts:
      ax.errorbar([x for x, _ in pts], [statistics.mean(v) for _, v in pts],
                  yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                  marker="o", capsize=3, label=name or spec.metric)
  references = [a for a in study.arms if a.x is None and _values(final, a.name, spec.metric)]
  for arm, color in zip(references, ("black", "tab:red", "tab:gray", "tab:brown")):
    v = _values(final, arm.name, spec.metric)
    m = statistics.mean(v)
    ax.axhline(m, linestyle="--", color=color, label=f"{arm.name} (n={len(v)}, band = ±std)")
    if len(v) > 1:
      s = statistics.stdev(v)
      ax.axhspan(m - s, m + s, color=color, alpha=0.12)
  xs = sorted({a.x for a in study.arms if a.x is not None})
  if xs:
    ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _metric_plot(ax, study: Study, spec: MetricPlot, final) -> None:
  for arm in study.arms:
    pts = [(x, _values(final, arm.name, metric)) for x, metric in spec.points]
    pts = [(x, v) for x, v in pts if v]
    if pts:
      ax.errorbar([x for x, _ in pts], [statistics.mean(v) for _, v in pts],
                  yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                  marker="o", capsize=3, label=arm.name)
  xs = sorted({x for x, _ in spec.points if math.isfinite(x)})
  ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _zoom_to_tail(ax, records, metric, done) -> None:
  """The first eval is far above the rest; fit the y-range to the evals after it."""
  steps = sorted({r["step"] for r in records})
  if len(steps) < 3:
    return
  tail = [r["metrics"][metric] for r in records if r["step"] >= steps[1]
          and (r["arm"], r["seed"]) in done and metric in r["metrics"]]
  if tail:
    lo, hi = min(tail), max(tail)
    pad = 0.05 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)


def save_figure(fig, out_dir: str, name: str) -> str:
  """Lays out, writes `out_dir/name` (PNG, 110 dpi) and closes `fig`; returns the path."""
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.close(fig)
  return path


def report(study: Study, workdir: str, command: str, results_from: str | None = None
           ) -> tuple[str, list[str]]:
  """Writes `table.md` and the plots into `workdir/<study>/` from the results; returns them."""
  study_dir = os.path.join(workdir, study.name)
  source_dir = os.path.join(workdir, results_from or study.reuse or study.name)
  os.makedirs(study_dir, exist_ok=True)
  records = read_results(os.path.join(source_dir, "results.jsonl"))
  meta_path = os.path.join(source_dir, "study.json")
  meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
  table = format_table(study, records, command, meta)
  with open(os.path.join(study_dir, "table.md"), "w") as f:
    f.write(table)
  return table, plot(study, records, study_dir)
