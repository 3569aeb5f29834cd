"""A study's records: reading `results.jsonl`, and turning a finished run's `metrics.jsonl` into
records (one per evaluation; the last one `final`, with the training-side summaries)."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence

from moejax.study.spec import FinalRecords


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


def final_records(records: Sequence[dict]) -> FinalRecords:
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

