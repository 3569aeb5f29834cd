"""Verdict statistics: t-test p-values, Holm–Bonferroni, equivalence (TOST), F-test, and the
adjusted interval that plots draw (it must agree with the verdict)."""

import math
import random

import pytest
from scipy import stats as scipy_stats

from moejax import study
from moejax.study import stats


def _final(table):
  return {(arm, seed): {"nodrop/ce": v} for arm, values in table.items()
          for seed, v in enumerate(values)}


def test_holm_by_hand():
  # Sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> kept monotone at 0.06.
  assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert study.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
  out = study.holm([0.01, math.nan, 0.02])  # claims not run do not count: m = 2
  assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_p_value_is_scipys_paired_t_test():
  dense, moe = [1.53, 1.55, 1.54, 1.52], [1.50, 1.545, 1.52, 1.515]
  v = study.verdict(study.Better("b", "moe", "dense"), _final({"dense": dense, "moe": moe}))
  expected = scipy_stats.ttest_rel(dense, moe).pvalue
  assert v.p == pytest.approx(expected) and v.p_adjusted == pytest.approx(expected)


def test_holm_turns_a_lone_significant_claim_inconclusive_in_a_family():
  final = _final({"dense": [1.53, 1.55, 1.54], "moe": [1.50, 1.535, 1.515],
                  "other": [1.52, 1.58, 1.50], "third": [1.56, 1.52, 1.55]})
  claims = [study.Better("moe", "moe", "dense"), study.Better("other", "other", "dense"),
            study.Better("third", "third", "dense")]
  alone = study.verdict(claims[0], final)
  assert alone.status == study.AGREES and 0.05 / 3 < alone.p < 0.05
  family = study.verdicts(claims, final)
  assert family[0].p == pytest.approx(alone.p)
  assert family[0].p_adjusted == pytest.approx(3 * alone.p)  # the smallest of the three
  assert family[0].status == study.INCONCLUSIVE
  assert "Holm p = " in family[0].line()


def test_adjusted_interval_excludes_zero_exactly_when_the_verdict_is_significant():
  rng = random.Random(0)
  checked = 0
  for _ in range(200):
    m = rng.choice([1, 2, 3, 5])
    table = {"base": [0.0] * 3}
    claims = []
    for j in range(m):
      mean = rng.choice([0.0, 0.01, 0.03])
      table[f"a{j}"] = [-(mean + rng.gauss(0, 0.01)) for _ in range(3)]
      claims.append(study.Better(f"a{j}", f"a{j}", "base"))
    if rng.random() < 0.2 and m >= 2:  # Holm's step-down stop: two claims with equal p.
      table["a1"] = list(table["a0"])
    for v in study.verdicts(claims, _final(table)):
      lo, hi = v.effect - v.adjusted_half_width, v.effect + v.adjusted_half_width
      excludes = lo > 0 or hi < 0
      if abs(v.p_adjusted - stats.ALPHA) > 1e-9:
        assert excludes == v.significant, v
        checked += 1
      assert v.adjusted_half_width >= v.half_width - 1e-12  # never narrower than the raw CI
  assert checked > 300


def test_equivalence_tost():
  margin = 0.01
  claim = study.Equivalent("no cost", "a", "b", margin=margin)
  tight = study.verdict(claim, _final({"a": [1.500, 1.600, 1.550], "b": [1.501, 1.599, 1.552]}))
  assert tight.status == "equivalent within ±0.01" and tight.kind == "equivalence"
  assert abs(tight.effect) + tight.half_width < margin  # 90% CI inside the margin
  wide = study.verdict(claim, _final({"a": [1.50, 1.60, 1.55], "b": [1.52, 1.58, 1.56]}))
  assert wide.status == study.NOT_SHOWN
  outside = study.verdict(claim, _final({"a": [1.50, 1.60, 1.55], "b": [1.52, 1.62, 1.57]}))
  assert outside.status == study.NOT_SHOWN and outside.p > 0.5
  # TOST p equals the larger one-sided p, by scipy.
  diffs = [0.001, -0.001, 0.002]
  se = scipy_stats.sem(diffs)
  mean = sum(diffs) / 3
  p = max(scipy_stats.t.sf((mean + margin) / se, 2), scipy_stats.t.sf((margin - mean) / se, 2))
  assert tight.p == pytest.approx(p)
  with pytest.raises(ValueError, match="margin=0"):
    study.Equivalent("x", "a", "b", margin=0)


def test_equivalence_joins_the_family_and_can_be_undone_by_it():
  eq = study.Equivalent("no cost", "a", "b", margin=0.01)
  final = _final({"a": [1.500, 1.600, 1.550], "b": [1.506, 1.604, 1.557],
                  "c": [1.60, 1.50, 1.58]})
  alone = study.verdict(eq, final)
  assert alone.status.startswith("equivalent") and alone.p > 0.01
  family = study.verdicts([eq, study.Better("c", "c", "a"), study.Better("c2", "c", "b"),
                           study.Better("c3", "c", "c")], final)
  assert family[0].status == study.NOT_SHOWN and family[0].p_adjusted > 0.05


def test_spread_p_is_a_two_sided_f_test():
  a = [1.50, 1.501, 1.499, 1.5005, 1.4995]
  b = [1.40, 1.60, 1.45, 1.55, 1.52]
  v = study.verdict(study.Spread("a varies less", "a", "b"), _final({"a": a, "b": b}))
  f = scipy_stats.tvar(b) / scipy_stats.tvar(a)
  assert v.p == pytest.approx(2 * scipy_stats.f.sf(f, 4, 4))
  assert v.status == study.AGREES and v.kind == "spread"


def test_gain_trend_is_the_slope_of_the_gain_on_log2_x():
  import numpy as np
  claim = study.gain_trend("grows", [(1, "d1", "m1"), (4, "d4", "m4"), (32, "d32", "m32")])
  final = {}
  gains = {0: (0.00, 0.02, 0.05), 1: (0.01, 0.01, 0.03)}
  for seed, g in gains.items():
    for (x, d, m), gain in zip([(1, "d1", "m1"), (4, "d4", "m4"), (32, "d32", "m32")], g):
      final[(d, seed)] = {"nodrop/ce": 2.0 + seed}
      final[(m, seed)] = {"nodrop/ce": 2.0 + seed - gain}
  per_seed = claim.per_seed(final)
  for seed, g in gains.items():
    assert per_seed[seed] == pytest.approx(np.polyfit(np.log2([1, 4, 32]), g, 1)[0])
  with pytest.raises(ValueError, match="two distinct x"):
    study.gain_trend("flat", [(2, "a", "b"), (2, "c", "d")])


def test_adjusted_equivalence_interval_lies_in_the_margin_exactly_when_shown():
  rng = random.Random(1)
  checked = 0
  for _ in range(150):
    table = {"base": [0.0] * 3}
    claims = [study.Better("b", "b", "base")]
    table["b"] = [-(rng.choice([0.0, 0.02]) + rng.gauss(0, 0.01)) for _ in range(3)]
    for j in range(rng.choice([1, 2, 3])):
      table[f"e{j}"] = [rng.choice([0.0, 0.004]) + rng.gauss(0, 0.002) for _ in range(3)]
      claims.append(study.Equivalent(f"e{j}", f"e{j}", "base", margin=0.01))
    for v in study.verdicts(claims, _final(table))[1:]:
      inside = abs(v.effect) + v.adjusted_half_width < v.margin
      if abs(v.p_adjusted - stats.ALPHA) > 1e-9:
        assert inside == v.status.startswith("equivalent within"), v
        checked += 1
  assert checked > 200
