"""Routing-specialisation statistics (moejax.analysis) and the layer's routing recorder."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import analysis, routing
from moejax.moe import MoEConfig, MoELayer


def test_mutual_information_extremes():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, 20000)
  # Y a bijection of X: I = H(X) = 2 bits. Y independent of X: I ~ 0.
  np.testing.assert_allclose(analysis.mutual_information(analysis.contingency(x, (x + 1) % 4, 4, 4)),
                             2.0, atol=1e-3)
  y = rng.integers(0, 4, 20000)
  assert analysis.mutual_information(analysis.contingency(x, y, 4, 4)) < 1e-2


def test_routing_report_separates_token_from_domain():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 10, 5000)
  domains = rng.integers(0, 3, 5000)
  # Routing is a function of the token: the domain adds nothing beyond it.
  by_token = analysis.routing_report(tokens % 4, tokens, domains, num_experts=4)
  np.testing.assert_allclose(by_token["token_share"], 1.0, atol=0.01)
  assert abs(by_token["domain_given_token_share"]) < 0.01
  # Routing is a function of the domain: all of it is explained by the domain, also given tokens.
  by_domain = analysis.routing_report(domains, tokens, domains, num_experts=4)
  np.testing.assert_allclose(by_domain["domain_share"], 1.0, atol=0.01)
  assert by_domain["domain_given_token_share"] > 0.9


def test_shuffled_baseline_removes_the_small_sample_bias():
  """Random routing against a 500-value label on 2,000 tokens: the plug-in MI is far from 0
  (about (500-1)(8-1)/(2 N ln 2) = 1.3 bits), the corrected share is ~0; planted structure
  (expert = f(label)) still reads ~1."""
  rng = np.random.default_rng(0)
  label = rng.integers(0, 500, 2000)
  experts = rng.integers(0, 8, 2000)
  report = analysis.information_report(experts, label)
  assert report["mi_bits"] > 0.3 * report["expert_entropy_bits"]  # the bias a plug-in shows
  assert abs(report["share"]) < 0.05, report
  # Planted structure with enough tokens per label (40): the share reads ~1. (With 4 per label,
  # as above, the baseline -- the bias under independence -- over-corrects: a lower bound.)
  many = rng.integers(0, 500, 20000)
  planted = analysis.information_report(many % 8, many)
  assert planted["share"] > 0.9, planted
  # The conditional baseline permutes within each stratum: the per-stratum counts are kept.
  given = rng.integers(0, 5, 2000)
  shuffled = analysis._permute_within(label, given, rng)
  for g in range(5):
    assert sorted(shuffled[given == g]) == sorted(label[given == g])


def test_domain_lift_and_top_tokens_on_planted_routing():
  # Domain 0 -> experts {0, 1} only, domain 1 -> all four uniformly.
  rng = np.random.default_rng(2)
  domains = np.repeat([0, 1], 4000)
  experts = np.concatenate([rng.integers(0, 2, 4000), rng.integers(0, 4, 4000)])
  lift = analysis.domain_expert_lift(experts, domains, 2, 4)
  # p(e) = 3/8 for e < 2 and 1/8 otherwise: domain 0 has 1/2 / (3/8) = 4/3 and 0.
  np.testing.assert_allclose(lift[0], [4 / 3, 4 / 3, 0, 0], atol=0.05)
  np.testing.assert_allclose(lift[1], [2 / 3, 2 / 3, 2, 2], atol=0.1)
  # Token 7 always goes to expert 3; token 5 mostly to 3; tokens below min_count are ignored.
  tokens = np.array([7] * 30 + [5] * 30 + [5] * 10 + [9] * 3)
  routed = np.array([3] * 30 + [3] * 30 + [1] * 10 + [3] * 3)
  top = analysis.top_tokens(routed, tokens, 4, min_count=20)
  assert top[3] == [(7, 30, 1.0), (5, 30, 30 / 40)] and top[0] == []
  assert top[1] == [(5, 10, 10 / 40)]


def test_consecutive_sharing_is_chance_for_random_routing_and_one_for_runs():
  rng = np.random.default_rng(3)
  B, L, K, E = 256, 128, 2, 8
  topk = np.stack([rng.permutation(E)[:K] for _ in range(B * L)]).reshape(B, L, K)
  valid = np.ones((B, L), bool)
  segments = np.ones((B, L), int)
  out = analysis.consecutive_sharing(topk, valid, segments, np.zeros((B, L), int))
  for key in ("first", "any"):
    assert abs(out["all"][key] - out["all"][f"{key}_chance"]) < 0.015, out
  np.testing.assert_allclose(out["all"]["first_chance"], 1 / E, atol=0.01)
  # Top-2 sets of two independent tokens intersect with probability 1 - C(6,2)/C(8,2) = 13/28.
  np.testing.assert_allclose(out["all"]["any_chance"], 13 / 28, atol=0.01)
  assert out[0]["first"] == out["all"]["first"] and out[0]["pairs"] == out["all"]["pairs"]
  # Experts owning domains, no neighbour effect: Mixtral's global chance (1/4) sits below the
  # rate (1/2), the domain-matched chance does not.
  domain = np.repeat([0, 1], B // 2)[:, None].repeat(L, 1)
  first = rng.integers(0, 2, (B, L)) + 2 * domain
  owned = np.stack([first, (first + 1) % 4], -1)
  out = analysis.consecutive_sharing(owned, valid, np.ones((B, L), int), domain)
  np.testing.assert_allclose(out["all"]["first_chance"], 0.25, atol=0.01)
  for d in (0, 1):
    np.testing.assert_allclose(out[d]["first"], out[d]["first_chance"], atol=0.015)
  # Every document routed to one expert pair: both rates are 1, and pairs never cross documents.
  same = np.broadcast_to(np.array([1, 2]), (B, L, K))
  segments = np.repeat(np.arange(1, 9), L // 8)[None].repeat(B, 0)
  out = analysis.consecutive_sharing(same, valid, segments)
  assert out["all"]["first"] == 1.0 and out["all"]["pairs"] == B * (L - 8)


def test_drop_rates_by_position_and_domain():
  # 1 row of 8 positions, top-2: the last half of the row loses its second choice, domain 1 is
  # the last quarter; padding (position 7) is not counted.
  kept = np.ones((1, 8, 2), bool)
  kept[0, 4:, 1] = False
  valid = np.array([[True] * 7 + [False]])
  positions = np.arange(8)[None]
  domain = np.array([[0, 0, 0, 0, 0, 0, 1, -1]])
  out = analysis.drop_rates(kept, valid, positions, domain, num_buckets=2, max_position=8)
  np.testing.assert_allclose(out["all"], 1.5 / 7)
  np.testing.assert_allclose(out["by_position"], [0.0, 0.5])
  np.testing.assert_allclose([out["by_domain"][0], out["by_domain"][1]], [1 / 6, 0.5])
  # A second choice the policy skipped (not wanted) is not a drop: token 6 keeps 1 of 1 wanted.
  wanted = np.ones((1, 8, 2), bool)
  wanted[0, 6, 1] = False
  out = analysis.drop_rates(kept, valid, positions, domain, wanted_BLK=wanted, num_buckets=2,
                            max_position=8)
  np.testing.assert_allclose(out["by_domain"][1], 0.0)
  assert analysis.drop_rates(kept, valid, positions, num_buckets=16,
                             max_position=16)["by_position"][8] is None  # an empty bucket


def test_agreement_with_final():
  final = np.array([0, 1, 2, 3])
  out = analysis.agreement_with_final({10: np.array([0, 0, 0, 0]), 20: np.array([0, 1, 2, 0]),
                                       30: final})
  assert out == {10: 0.25, 20: 0.75, 30: 1.0}


def test_consecutive_same_expert_counts_pairs_within_documents():
  experts = np.array([[0, 0, 1, 1, 2]])
  mask = np.array([[True, True, True, True, False]])
  segments = np.array([[1, 1, 2, 2, 0]])
  rate, chance = analysis.consecutive_same_expert(experts, mask, segments)
  assert rate == 1.0  # pairs (0,1) and (2,3); (1,2) crosses documents, (3,4) is padding
  np.testing.assert_allclose(chance, 0.5**2 + 0.5**2)


def test_layer_records_router_top_k_before_capacity():
  cfg = MoEConfig(num_experts=5, top_k=2, d_ff=4, gate="gshard", capacity_factor=0.5)
  layer = MoELayer(cfg, 7, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 9, 7))
  _, sown = nnx.capture(lambda m: m(x), nnx.Intermediate)(layer)
  assert not sown  # off by default
  _, sown = nnx.capture(lambda m: m(x, record_routing=True), nnx.Intermediate)(layer)
  (recorded,) = sown["router_topk"].get_value()
  (kept,) = sown["router_kept"].get_value()
  logits = routing.router_logits(x.reshape(2, 9, 7), layer.router_DE[...])
  capacity = cfg.capacity(9, deterministic=False)
  r = routing.route(logits, jnp.ones((2, 9), bool), top_k=2, capacity=capacity)
  np.testing.assert_array_equal(recorded, r.router_expert)
  np.testing.assert_array_equal(kept, r.kept)  # At the layer's (training) capacity.
  assert 0 < kept.sum() < kept.size  # CF 0.5 drops some choices, not all.


def test_router_dtype_disagreement_counts_bfloat16_flips_of_the_top_expert():
  w = jnp.eye(4)
  # Clear winners: both precisions agree. Near-ties (1e-4 apart): bfloat16 rounds them together
  # and argmax falls to the lower index, while float32 keeps the true winner (index 1).
  clear = jnp.array([[[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]])
  tie = jnp.array([[[1.0, 1.0001, 0.0, 0.0], [1.0, 1.0001, 0.0, 0.0]]])
  valid = jnp.ones((1, 2), bool)
  assert analysis.router_dtype_disagreement(clear, w, valid) == 0.0
  assert analysis.router_dtype_disagreement(tie, w, valid) == 1.0
  assert analysis.router_dtype_disagreement(tie, w, jnp.zeros((1, 2), bool)) == 0.0


def test_routing_analysis_cli_end_to_end(tmp_path):
  """A tiny run (built-in corpus, 8 domains) with checkpoints at steps 2 and 4: the analysis
  writes every file, covers both checkpoints, and its numbers are consistent."""
  import json
  import os
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  sys.path.insert(0, os.path.join(root, "experiments"))
  import routing_analysis  # pylint: disable=import-outside-toplevel
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  c = tiny.get_config("runlocal")
  c.mesh.data, c.mesh.expert = 2, 4
  c.num_train_steps, c.checkpoint_every, c.eval_every, c.eval_steps = 4, 2, 4, 1
  train.train_and_evaluate(c, str(tmp_path / "run"))
  out = tmp_path / "analysis"
  result = routing_analysis.run(str(tmp_path / "run"), str(out), tokens=1024)
  saved = json.loads((out / "analysis.json").read_text())
  assert saved["steps"] == [2, 4] and saved["tokens"] >= 1024
  assert len(saved["domain_names"]) == 8 and sorted(saved["layers"]) == ["1"]  # 2 layers, MoE 2nd
  for name in ("report.md", "analysis.json", "information.png", "consecutive.png", "drops.png",
               "stability.png", "heatmap_layer1.png"):
    assert (out / name).stat().st_size > 0, name
  for layer in result["layers"].values():
    assert abs(sum(layer["load"]) - 1) < 1e-6
    assert set(layer["information"]) == {"domain", "token", "position", "previous",
                                         "domain|token"}
    assert 0 <= layer["drops"]["all"] <= 1
  assert all(agreement[4] == 1.0 for agreement in result["stability"].values())
  assert "## When is routing decided?" in (out / "report.md").read_text()
