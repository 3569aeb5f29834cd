"""Where training metrics go: console, TensorBoard (tensorboardX) and `metrics.jsonl`.

`MetricWriter.write(step, metrics, prefix)` takes a flat dict of host scalars / numpy vectors:

- console (absl logging, every call): the main scalar metrics (all scalars when none of them
  is there, e.g. the `routing` split), formatted short;
- TensorBoard (`workdir/tb`): every scalar; every vector (e.g. per-expert load) as a histogram
  plus one scalar per entry when it is short (<= 16 experts), so loads can be plotted per expert;
- JSONL (`workdir/metrics.jsonl`): one line `{"step", "split", **metrics}` with vectors as lists;
  the file a researcher loads with pandas to compare runs (`pd.read_json(path, lines=True)`).

Only process 0 writes (multi-host: every process computes the same replicated metrics).
Per-MoE-layer names are `moe/layer{i}/{stat}`; aggregated over layers they are `moe/{stat}`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging

# Console shows these first (and only these plus the throughput keys) to stay one line per step.
_CONSOLE_KEYS = ("loss", "ce", "moe/aux_loss", "moe/balance_loss", "moe/z_loss",
                 "moe/dropped_fraction", "grad_norm", "lr", "nodrop/ce", "accuracy")


def _to_host(value: Any) -> Any:
  value = np.asarray(jax.device_get(value))
  return value.item() if value.ndim == 0 else value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} with values on the host."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = _to_host(value)
  return out


class MetricWriter:
  """Console + TensorBoard + JSONL writer; a no-op except on process 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Lazy: keep `import moejax` light.
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

  def drop_after(self, step: int) -> None:
    """Forgets JSONL records past `step` (a resumed run rewrites them: no duplicate steps)."""
    if not self.active:
      return
    path = self._jsonl.name
    self._jsonl.close()
    kept = []
    with open(path) as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError):
          continue  # A line cut short by a kill mid-write: its step is redone anyway.
    with open(path, "w") as f:
      f.writelines(kept)
    self._jsonl = open(path, "a", buffering=1)

  def write(self, step: int, metrics: dict[str, Any], split: str = "train",
            console_extra: str = "") -> None:
    if not self.active:
      return
    metrics = flatten(metrics)
    record = {"step": int(step), "split": split}
    for name, value in metrics.items():
      tag = f"{split}/{name}"
      if isinstance(value, np.ndarray):
        record[name] = value.tolist()
        if value.size:
          self._tb.add_histogram(tag, value, step)
        if value.ndim == 1 and value.size <= 16:
          for i, v in enumerate(value):
            self._tb.add_scalar(f"{tag}/{i}", float(v), step)
      else:
        record[name] = value if math.isfinite(value) else str(value)
        self._tb.add_scalar(tag, value, step)
    self._jsonl.write(json.dumps(record) + "\n")
    keys = [k for k in _CONSOLE_KEYS if k in metrics] or sorted(metrics)  # else: all of them
    shown = [f"{k}={metrics[k]:.4g}" for k in keys if not isinstance(metrics[k], np.ndarray)]
    logging.info("[%s] step %d: %s%s", split, step, " ".join(shown), console_extra)

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
      self.active = False
