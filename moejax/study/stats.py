"""Verdicts: paired tests over seeds, with Holm–Bonferroni across the claims of a study.

Each claim gives one number per seed, positive when the claim holds (`spec`). Per claim:
- `Better`, `Trend`, `Contrast`: a two-sided one-sample t-test of those numbers against 0
  (Student's t, n - 1 degrees of freedom). Same seed = same data order, so pairing removes the
  data-order part of the seed noise.
- `Equivalent`: two one-sided t-tests (TOST) against -margin and +margin; p is the larger of the
  two. Significant = the difference is shown to lie within +-margin.
- `Spread`: a two-sided F-test of the two arms' variances (not paired: the claim is about the
  seed distribution).

Multiplicity: the claims of one study are one family. Their p-values are adjusted by Holm's step-
down method (claims without a test yet, not run or with one seed, do not count, so the family
grows as seeds finish), and the verdict word follows the adjusted p at
0.05: `agrees` / `disagrees` (significant, by the sign of the effect), `inconclusive`; for
equivalence claims `equivalent within +-m` / `equivalence not shown`. With 3 seeds a 95% interval
is mean +- 4.3 standard errors: that makes a real effect hard to detect (low power); it does not
by itself control false positives across many claims, which is what the adjustment is for.

Intervals: `half_width` is the raw 95% interval (90% for TOST: the interval whose inclusion in
+-margin is the unadjusted TOST). `adjusted_half_width` inverts the adjusted test: the claim's own
interval at level 1 - 0.05 * p / p_adjusted, which excludes 0 (or lies within +-margin) exactly
when the adjusted verdict is significant. Plots draw it, so a plot never contradicts its verdict;
it is not a simultaneous confidence region for the family.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

from moejax.study.spec import Claim, Equivalent, FinalRecords, Spread

ALPHA = 0.05
AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
NOT_SHOWN = "equivalence not shown"
NOT_RUN = "no finished runs"


def equivalent_word(margin: float) -> str:
  return f"equivalent within ±{margin:g}"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One claim's test. `effect` is the mean of the per-seed numbers (positive = the claim holds);
  for `Spread` it is std(b) - std(a) and there is no interval."""
  claim: str
  status: str
  effect: float
  half_width: float  # Raw 95% interval (90% for an equivalence claim); inf with one seed.
  n: int
  p: float = math.nan  # Raw two-sided p (TOST p for equivalence).
  p_adjusted: float = math.nan  # Holm-adjusted within the study.
  adjusted_half_width: float = math.inf  # Interval at the adjusted level.
  margin: float | None = None  # Equivalence claims.
  kind: str = "difference"  # "difference" | "equivalence" | "spread"

  @property
  def significant(self) -> bool:
    return self.p_adjusted < ALPHA

  def line(self) -> str:
    if self.n == 0:
      return f"{self.claim}: not run yet"
    ps = (f"p = {_p(self.p)}, Holm p = {_p(self.p_adjusted)}" if math.isfinite(self.p)
          else "no test")
    if self.kind == "spread":
      return (f"{self.claim}: std difference {self.effect:+.4f} (F-test of variances, {self.n}+ "
              f"seeds per arm; {ps}) -> **{self.status}**")
    if self.n == 1:
      return f"{self.claim}: effect {self.effect:+.4f} (one seed, no interval) -> **{self.status}**"
    level = "90% CI" if self.kind == "equivalence" else "95% CI"
    margin = f", margin ±{self.margin:g}" if self.margin is not None else ""
    return (f"{self.claim}: effect {self.effect:+.4f} ± {self.half_width:.4f} ({level}, paired "
            f"over {self.n} seeds{margin}; {ps}) -> **{self.status}**")


def _p(p: float) -> str:
  return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def t_quantile_975(df: int) -> float:
  """Two-sided 95% Student-t critical value."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(0.975, df))


def _t_quantile(q: float, df: int) -> float:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(q, df))


def holm(ps: Sequence[float]) -> list[float]:
  """Holm–Bonferroni adjusted p-values (NaN entries stay NaN and are not counted)."""
  order = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
  m = len(order)
  out = [math.nan] * len(ps)
  running = 0.0
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out


def raw_test(claim: Claim, final: FinalRecords) -> Verdict:
  """One claim's test before the multiplicity adjustment (status from the raw p)."""
  if isinstance(claim, Spread):
    return _spread_test(claim, final)
  values = list(claim.per_seed(final).values())
  n = len(values)
  equivalence = isinstance(claim, Equivalent)
  kind, margin = ("equivalence", claim.margin) if equivalence else ("difference", None)
  if n == 0:
    return Verdict(claim.text, NOT_RUN, math.nan, math.inf, 0, margin=margin, kind=kind)
  mean = statistics.mean(values)
  if n == 1:
    status = NOT_SHOWN if equivalence else INCONCLUSIVE
    return Verdict(claim.text, status, mean, math.inf, 1, margin=margin, kind=kind)
  from scipy import stats  # pylint: disable=import-outside-toplevel
  se = statistics.stdev(values) / math.sqrt(n)
  if equivalence:  # TOST: H0 mean <= -m and H0 mean >= m, both rejected.
    if se == 0:
      p = 0.0 if abs(mean) < claim.margin else 1.0
    else:
      p = max(float(stats.t.sf((mean + claim.margin) / se, n - 1)),
              float(stats.t.sf((claim.margin - mean) / se, n - 1)))
    half = _t_quantile(1 - ALPHA, n - 1) * se
  else:
    p = (0.0 if mean else 1.0) if se == 0 else float(2 * stats.t.sf(abs(mean) / se, n - 1))
    half = t_quantile_975(n - 1) * se
  return _with_status(Verdict(claim.text, "", mean, half, n, p=p, p_adjusted=p, margin=margin,
                              kind=kind), se)


def _with_status(v: Verdict, se: float) -> Verdict:
  """Sets the status from `p_adjusted` and the interval at the adjusted level."""
  significant = v.p_adjusted < ALPHA
  if v.kind == "equivalence":
    status = equivalent_word(v.margin) if significant else NOT_SHOWN
  elif v.kind == "spread":
    status = (AGREES if v.effect > 0 else DISAGREES) if significant else INCONCLUSIVE
  else:
    status = (AGREES if v.effect > 0 else DISAGREES) if significant else INCONCLUSIVE
  adjusted = v.adjusted_half_width
  if v.kind != "spread" and v.n >= 2:
    # The level at which this claim's own test decides as the adjusted p does.
    level = ALPHA * (v.p / v.p_adjusted if v.p_adjusted > 0 else 1.0)
    tail = level if v.kind == "equivalence" else level / 2
    adjusted = _t_quantile(1 - tail, v.n - 1) * se
  return dataclasses.replace(v, status=status, adjusted_half_width=adjusted)


def _spread_test(claim: Spread, final: FinalRecords) -> Verdict:
  from scipy import stats  # pylint: disable=import-outside-toplevel
  va = [m[claim.metric] for (arm, _), m in final.items() if arm == claim.a and claim.metric in m]
  vb = [m[claim.metric] for (arm, _), m in final.items() if arm == claim.b and claim.metric in m]
  n = min(len(va), len(vb))
  if n < 2:
    return Verdict(claim.text, NOT_RUN if n == 0 else INCONCLUSIVE, math.nan, math.inf, n,
                   kind="spread")
  sa, sb = statistics.stdev(va), statistics.stdev(vb)
  if sa == 0 or sb == 0:
    p = 1.0 if sa == sb else 0.0
  else:
    cdf = float(stats.f.cdf(sb ** 2 / sa ** 2, len(vb) - 1, len(va) - 1))
    p = min(1.0, 2 * min(cdf, 1 - cdf))
  return _with_status(Verdict(claim.text, "", sb - sa, math.nan, n, p=p, p_adjusted=p,
                              kind="spread"), math.nan)


def verdicts(claims: Sequence[Claim], final: FinalRecords) -> list[Verdict]:
  """Every claim's verdict, Holm-adjusted across `claims` (one study's)."""
  raw = [raw_test(c, final) for c in claims]
  adjusted = holm([v.p for v in raw])
  out = []
  for v, p_adj in zip(raw, adjusted):
    if math.isnan(p_adj):
      out.append(v)
      continue
    se = (v.half_width / (_t_quantile(1 - ALPHA, v.n - 1) if v.kind == "equivalence"
                          else t_quantile_975(v.n - 1))) if v.kind != "spread" else math.nan
    out.append(_with_status(dataclasses.replace(v, p_adjusted=p_adj), se))
  return out


def verdict(claim: Claim, final: FinalRecords) -> Verdict:
  """A single claim's verdict (a family of one: no adjustment)."""
  return verdicts([claim], final)[0]
