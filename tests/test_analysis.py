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
  np.testing.assert_allclose(by_token["token_share"], 1.0, atol=1e-9)
  assert by_token["domain_given_token_share"] < 0.02
  # Routing is a function of the domain: all of it is explained by the domain, also given tokens.
  by_domain = analysis.routing_report(domains, tokens, domains, num_experts=4)
  np.testing.assert_allclose(by_domain["domain_share"], 1.0, atol=1e-9)
  assert by_domain["domain_given_token_share"] > 0.9


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
  forward = nnx.capture(lambda m: m(x), nnx.Intermediate)
  _, sown = forward(layer)
  assert not sown  # off by default
  layer.record_routing = True
  _, sown = forward(layer)
  (recorded,) = sown["router_topk"].get_value()
  logits = routing.router_logits(x.reshape(2, 9, 7), layer.router[...])
  r = routing.route(logits, jnp.ones((2, 9), bool), top_k=2, capacity=3)
  np.testing.assert_array_equal(recorded, r.router_expert_SK)


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
