"""What a study is: arms, seeds, scales, the claims a verdict reads, and the plots it draws.

Pure data (frozen dataclasses); `Study.__post_init__` checks that claims and `start_from` name
arms that exist. Each claim turns the final records of a study into one number per seed,
positive when the claim holds (`per_seed`); `moejax.study.stats` tests those numbers.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

FinalRecords = dict[tuple[str, int], dict]  # (arm, seed) -> metrics of the run's last eval.


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
  paper_effect: float | None = None  # The paper's value of the effect, marked in plots.

  def per_seed(self, final: FinalRecords) -> dict[int, float]:
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
  paper_effect: float | None = None  # The paper's value of the effect, marked in plots.

  def per_seed(self, final: FinalRecords) -> dict[int, float]:
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
  paper_effect: float | None = None  # The paper's value of the effect, marked in plots.

  @property
  def arms(self) -> tuple[str, ...]:
    return tuple(arm for _, arm, _ in self.terms)

  def per_seed(self, final: FinalRecords) -> dict[int, float]:
    out = {}
    for seed in sorted({s for _, s in final}):
      values = [final.get((arm, seed), {}).get(metric) for _, arm, metric in self.terms]
      if all(v is not None for v in values):
        out[seed] = sum(c * v for (c, _, _), v in zip(self.terms, values))
    return out


@dataclasses.dataclass(frozen=True)
class Equivalent:
  """Claim: arms `a` and `b` do not differ in `metric` by more than `margin` (a "no cost" or
  "no difference" claim). Per seed: b - a (as `Better`); tested by two one-sided t-tests against
  +-margin. `margin` is part of the study file, written before reading the verdict."""
  text: str
  a: str
  b: str
  margin: float
  metric: str = "nodrop/ce"
  paper_effect: float | None = None

  def __post_init__(self):
    if not self.margin > 0:
      raise ValueError(f"Equivalent {self.text!r}: margin={self.margin}; allowed: a number > 0")

  def per_seed(self, final: FinalRecords) -> dict[int, float]:
    return Better(self.text, self.a, self.b, self.metric).per_seed(final)

  @property
  def arms(self) -> tuple[str, ...]:
    return (self.a, self.b)


@dataclasses.dataclass(frozen=True)
class Spread:
  """Claim: `metric` varies less across seeds for arm `a` than for arm `b` (two-sided 95% F-test
  on the ratio of sample variances; not paired: the claim is about the seed distribution)."""
  text: str
  a: str
  b: str
  metric: str = "nodrop/ce"
  paper_effect: float | None = None

  @property
  def arms(self) -> tuple[str, ...]:
    return (self.a, self.b)


def gain_trend(text: str, pairs: Sequence[tuple[float, str, str]], metric: str = "nodrop/ce",
               log_x: bool = True) -> Contrast:
  """Claim: the gain `metric(base) - metric(other)` grows with x, for pairs (x, base, other): per
  seed, the least-squares slope of the gain on x (log2 x when `log_x`), written as a `Contrast`
  (each arm weighted by its x's distance from the mean x)."""
  xs = [math.log2(x) if log_x else x for x, _, _ in pairs]
  mean = statistics.mean(xs)
  sxx = sum((x - mean) ** 2 for x in xs)
  if len(pairs) < 2 or sxx == 0:
    raise ValueError(f"gain_trend {text!r}: needs at least two distinct x; got "
                     f"{[x for x, _, _ in pairs]}")
  return Contrast(text, tuple(term for x, (_, base, other) in zip(xs, pairs)
                              for term in (((x - mean) / sxx, base, metric),
                                           (-(x - mean) / sxx, other, metric))))


Claim = Better | Trend | Contrast | Equivalent | Spread


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
  claims: tuple[Claim, ...]
  scales: Mapping[str, Mapping[str, Any]]  # name -> overrides for every arm ("cpu" first).
  seeds: tuple[int, ...] = (0, 1, 2)
  columns: tuple[tuple[str, str], ...] = (("nodrop/ce", "no-drop eval CE"),)
  plots: tuple[ArmPlot | MetricPlot | StepPlot, ...] = ()
  curve_metric: str = "nodrop/ce"  # Plotted against step in `curves.png`.
  reuse: str | None = None  # Train nothing: read the runs of this study (same arms).
  # > 0: after each MoE run, measure its routing leak on this many positions (`moejax.causal`):
  # final records gain `leak`, `causal_ce`, `teacher_forced_ce`.
  causal_leak_positions: int = 0
  # With causal_leak_positions: also measure the leak at each run's own *train* capacity factor
  # (where drops, and so leaks, happen): final records gain `leak_train_cf`,
  # `causal_ce_train_cf`, `teacher_forced_ce_train_cf`.
  causal_leak_at_train_cf: bool = False
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

