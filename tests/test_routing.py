"""Routing math against hand-computed cases and the papers' formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax import routing


def logits_from_probs(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def route1(probs_SE, valid_S=None, **kw):
  probs_SE = np.asarray(probs_SE, np.float32)
  valid_S = np.ones(probs_SE.shape[0], bool) if valid_S is None else np.asarray(valid_S)
  return routing.route_group(logits_from_probs(probs_SE), jnp.asarray(valid_S), **kw)


# ---------------------------------------------------------------------------- capacity formulas


@pytest.mark.parametrize("convention, expected", [
    ("switch", 19),  # ceil(2 * 1.25 * 60 / 8) = ceil(18.75)
    ("mesh_tf", 9),  # max(min(60, int(60 * 1.25 / 8)), 4) = int(9.375)
    ("flaxformer", 9),  # max(round(1.25 * 60 / 8), 4) = round(9.375): no k factor
    ("vmoe", 20),  # ceil(60 * 2 * 1.25 / 8) = 19, up to a multiple of 4
    ("praxis", 12),  # int(9.375) = 9, up to a multiple of 4
    ("maxtext", 18),  # int(max(ceil(60 * 2 / 8) * 1.25, 1.25)) = int(18.75)
])
def test_capacity_conventions(convention, expected):
  assert routing.expert_capacity(60, 8, 2, 1.25, convention=convention) == expected


def test_capacity_round_versus_floor():
  # flaxformer rounds (9.6 -> 10) where mesh_tf truncates (9.6 -> 9).
  assert routing.expert_capacity(64, 8, 1, 1.2, convention="flaxformer") == 10
  assert routing.expert_capacity(64, 8, 1, 1.2, convention="mesh_tf") == 9


def test_capacity_floor_multiple_clip_and_no_drop():
  assert routing.expert_capacity(10, 8, 1, 1.0) == 2  # ceil(10 / 8)
  assert routing.expert_capacity(10, 8, 1, 1.0, min_capacity=4) == 4
  assert routing.expert_capacity(10, 8, 1, 1.0, multiple=4) == 4
  assert routing.expert_capacity(10, 2, 2, 3.0) == 10  # ceil(30) clipped to S
  assert routing.expert_capacity(37, 8, 2, math.inf) == 37
  assert routing.expert_capacity(6, 4, 1, 1.0, convention="mesh_tf") == 4  # the built-in floor
  with pytest.raises(ValueError, match="capacity_convention='nope'"):
    routing.expert_capacity(8, 2, 1, 1.0, convention="nope")


# ---------------------------------------------------------------------------- hand-computed routes


def test_switch_top1_position_priority_drops_later_tokens():
  probs = [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]
  r = route1(probs, top_k=1, capacity=1)
  np.testing.assert_array_equal(r.expert[:, 0], [0, 0, 1])
  np.testing.assert_array_equal(r.kept[:, 0], [True, False, True])
  np.testing.assert_array_equal(r.slot[[0, 2], 0], [0, 0])
  # Switch gate: the raw router probability; dropped choices weigh 0.
  np.testing.assert_allclose(r.gate[:, 0], [0.7, 0.0, 0.8], rtol=1e-6)


def test_batch_prioritized_routing_lets_the_confident_token_win():
  probs = [[0.55, 0.45], [0.9, 0.1], [0.6, 0.4]]
  r = route1(probs, top_k=1, capacity=2, priority="probability")
  # Expert 0 is wanted by all three; the two most confident (tokens 1, 2) get its two slots.
  np.testing.assert_array_equal(r.kept[:, 0], [False, True, True])
  np.testing.assert_array_equal(r.slot[[1, 2], 0], [0, 1])
  r_pos = route1(probs, top_k=1, capacity=2, priority="position")
  np.testing.assert_array_equal(r_pos.kept[:, 0], [True, True, False])


def test_top2_places_all_first_choices_before_any_second_choice():
  # token 0 prefers (e0, e1); token 1 prefers (e1, e0). C = 1.
  probs = [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1]]
  r = route1(probs, top_k=2, capacity=1, gate="gshard")
  np.testing.assert_array_equal(r.expert, [[0, 1], [1, 0]])
  # Token-major order would have given token 0 both e0 and e1; choice-major gives each token
  # its first choice and drops both second choices.
  np.testing.assert_array_equal(r.kept, [[True, False], [True, False]])
  # GShard gates normalised over the top-2 before the drop: 0.6 / 0.9.
  np.testing.assert_allclose(r.gate, [[0.6 / 0.9, 0.0], [0.6 / 0.9, 0.0]], rtol=1e-6)
  after = route1(probs, top_k=2, capacity=1, gate="gshard", renormalize="after_drop")
  np.testing.assert_allclose(after.gate, [[1.0, 0.0], [1.0, 0.0]], rtol=1e-6)
  raw = route1(probs, top_k=2, capacity=1, gate="softmax")
  np.testing.assert_allclose(raw.gate, [[0.6, 0.0], [0.6, 0.0]], rtol=1e-6)


def test_mixtral_gate_is_softmax_over_selected_logits():
  logits_SE = jax.random.normal(jax.random.key(0), (11, 7))
  r = routing.route_group(logits_SE, jnp.ones(11, bool), top_k=3, capacity=11, gate="mixtral")
  selected_SK = jnp.take_along_axis(logits_SE, r.expert, axis=-1)
  np.testing.assert_allclose(r.gate, jax.nn.softmax(selected_SK, axis=-1), rtol=1e-5)


def test_second_expert_policies():
  probs = [[0.5, 0.45, 0.05], [0.85, 0.1, 0.05]]
  # Normalised second gates: 0.45 / 0.95 = 0.47 and 0.1 / 0.95 = 0.105.
  thr = route1(probs, top_k=2, capacity=2, second_expert_policy="threshold",
               second_expert_threshold=0.2)
  np.testing.assert_array_equal(thr.wanted, [[True, True], [True, False]])
  np.testing.assert_array_equal(thr.kept, [[True, True], [True, False]])
  # random: keep iff 2 * g2 > u. 2 * 0.47 = 0.95 > 0.9; 2 * 0.105 = 0.21 < 0.3 but > 0.2.
  u = jnp.array([[0.0, 0.9], [0.0, 0.3]])
  rnd = route1(probs, top_k=2, capacity=2, second_expert_policy="random", uniform_SK=u)
  np.testing.assert_array_equal(rnd.kept[:, 1], [True, False])
  rnd2 = route1(probs, top_k=2, capacity=2, second_expert_policy="random",
                uniform_SK=jnp.array([[0.0, 0.99], [0.0, 0.2]]))
  np.testing.assert_array_equal(rnd2.kept[:, 1], [False, True])
  # Without draws (eval) `random` keeps every choice.
  det = route1(probs, top_k=2, capacity=2, second_expert_policy="random")
  assert bool(jnp.all(det.kept))


def test_token_major_priority_places_each_tokens_choices_together():
  # Same inputs as the choice-major test above: token 0 now keeps both its experts first.
  probs = [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1]]
  r = route1(probs, top_k=2, capacity=1, gate="gshard", priority="token")
  np.testing.assert_array_equal(r.kept, [[True, True], [False, False]])


def test_token_major_priority_is_causal_for_top2():
  # Token 0's routing must not depend on token 1, whatever token 1 wants.
  first = [0.6, 0.3, 0.1]
  for later in ([0.3, 0.6, 0.1], [0.1, 0.3, 0.6], [0.6, 0.3, 0.1]):
    r = route1([first, later], top_k=2, capacity=1, gate="gshard", priority="token")
    np.testing.assert_array_equal(r.kept[0], [True, True])
    np.testing.assert_allclose(r.gate[0], [0.6 / 0.9, 0.3 / 0.9], rtol=1e-6)
  # Choice-major is not: token 1's first choice takes the slot token 0's second choice wanted.
  a = route1([first, [0.1, 0.3, 0.6]], top_k=2, capacity=1, priority="position")
  b = route1([first, [0.3, 0.6, 0.1]], top_k=2, capacity=1, priority="position")
  assert bool(a.kept[0, 1]) and not bool(b.kept[0, 1])


def test_reroute_with_top2_only_uses_unused_experts():
  # C = 1, E = 4. Both tokens rank e0 > e1 > e2 > e3. First choices: t0 -> e0, t1 loses e0.
  # Second choices: t0 -> e1, t1 loses e1. Round 0 offers rank-2 (e2) to t1's first unplaced
  # choice (its first), round 1 offers e3 to its second.
  probs = [[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]
  r = route1(probs, top_k=2, capacity=1, gate="gshard", overflow="reroute")
  np.testing.assert_array_equal(r.expert, [[0, 1], [2, 3]])
  assert bool(jnp.all(r.kept))
  # Gates before_drop: the new experts' probabilities over the router's original top-2 sum.
  np.testing.assert_allclose(r.gate[1], [0.2 / 0.7, 0.1 / 0.7], rtol=1e-6)


def test_reroute_sends_overflow_to_next_best_expert_with_room():
  # Both tokens want e0 (C = 1). Token 1's ranking: e0, e2, e1 -> rerouted to e2.
  probs = [[0.7, 0.2, 0.1], [0.5, 0.15, 0.35]]
  r = route1(probs, top_k=1, capacity=1, overflow="reroute")
  np.testing.assert_array_equal(r.router_expert[:, 0], [0, 0])
  np.testing.assert_array_equal(r.expert[:, 0], [0, 2])
  np.testing.assert_array_equal(r.kept[:, 0], [True, True])
  np.testing.assert_allclose(r.gate[:, 0], [0.7, 0.35], rtol=1e-6)
  # Full next-best expert: token 2's second-best (e2) is taken by token 1, so it goes to e1.
  probs3 = probs + [[0.45, 0.2, 0.35]]
  r3 = route1(probs3, top_k=1, capacity=1, overflow="reroute")
  np.testing.assert_array_equal(r3.expert[:, 0], [0, 2, 1])
  dropped = route1(probs3, top_k=1, capacity=1, overflow="drop")
  np.testing.assert_array_equal(dropped.kept[:, 0], [True, False, False])


def test_padding_takes_no_capacity():
  probs = [[0.9, 0.1], [0.8, 0.2]]
  r = route1(probs, valid_S=[False, True], top_k=1, capacity=1)
  np.testing.assert_array_equal(r.kept[:, 0], [False, True])
  assert int(r.slot[1, 0]) == 0
  assert float(r.gate[0, 0]) == 0.0


# ---------------------------------------------------------------------------- losses vs formulas


def reference_losses(logits_GSE, valid_GS, top_k, choices):
  """Straight from the papers, in numpy, one group at a time."""
  logits_GSE = np.asarray(logits_GSE, np.float64)
  G, S, E = logits_GSE.shape
  bal, gsh, z, n = [], [], 0.0, 0
  for g in range(G):
    v = np.asarray(valid_GS[g], bool)
    if not v.any():
      continue
    lg = logits_GSE[g][v]
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    f = np.zeros(E)
    f_first = np.bincount(order[:, 0], minlength=E) / len(p)
    if choices == "first":
      f = f_first
    else:  # all: each of the K choices counts 1/K; any (flaxformer): each counts 1.
      for j in range(top_k):
        f += np.bincount(order[:, j], minlength=E) / (len(p) * (top_k if choices == "all" else 1))
    P = p.mean(0)
    bal.append(E * np.sum(f * P))  # Switch eq. 4
    gsh.append(np.mean(f_first * P))  # GShard: (1/E) sum_e (c_e / S) m_e
    lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
    z += np.sum(lse**2)
    n += len(p)
  return np.mean(bal), np.mean(gsh), z / n


@pytest.mark.parametrize("choices", ["first", "all", "any"])
def test_aux_losses_match_the_paper_formulas(choices):
  G, S, E, K = 3, 13, 5, 2
  logits = 2.0 * jax.random.normal(jax.random.key(1), (G, S, E))
  valid = jax.random.bernoulli(jax.random.key(2), 0.7, (G, S)).at[2].set(False)
  r = routing.route(logits, valid, top_k=K, capacity=3)
  m = routing.finalize_sums(routing.routing_sums(r, valid, balance_loss_choices=choices))
  bal, gsh, z = reference_losses(logits, valid, K, choices)
  np.testing.assert_allclose(m["balance_loss"], bal, rtol=1e-5)
  np.testing.assert_allclose(m["gshard_loss"], gsh, rtol=1e-5)
  np.testing.assert_allclose(m["z_loss"], z, rtol=1e-5)
  assert float(m["tokens"]) == float(jnp.sum(valid))


@pytest.mark.parametrize("choices", ["first", "all", "any"])
def test_batch_scope_balance_losses_are_the_losses_of_one_group_holding_every_token(choices):
  """Scope `batch` over G groups = scope `group` over the same tokens as a single group: values
  and gradients (padding, a group without tokens, K=2 included)."""
  G, S, E, K = 3, 13, 5, 2
  logits = 2.0 * jax.random.normal(jax.random.key(1), (G, S, E))
  valid = jax.random.bernoulli(jax.random.key(2), 0.7, (G, S)).at[2].set(False)

  def losses(logits, valid, scope):
    r = routing.route(logits, valid, top_k=K, capacity=3)
    m = routing.finalize_sums(routing.routing_sums(r, valid, balance_loss_choices=choices),
                              balance_loss_scope=scope)
    return m["balance_loss"] + 10.0 * m["gshard_loss"], m

  (batch, m), g_batch = jax.value_and_grad(losses, has_aux=True)(logits, valid, "batch")
  (one, m_one), g_one = jax.value_and_grad(losses, has_aux=True)(
      logits.reshape(1, G * S, E), valid.reshape(1, G * S), "group")
  bal, gsh, _ = reference_losses(logits.reshape(1, G * S, E), valid.reshape(1, G * S), K, choices)
  np.testing.assert_allclose(m["balance_loss"], bal, rtol=1e-5)
  np.testing.assert_allclose(m["gshard_loss"], gsh, rtol=1e-5)
  np.testing.assert_allclose(batch, one, rtol=1e-6)
  np.testing.assert_allclose(g_batch, g_one.reshape(G, S, E), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("choices", ["first", "all"])
def test_step_balance_makes_micro_batch_losses_the_exact_share_of_the_step(choices):
  """Gradient accumulation with the `batch` scope: micro-batches holding unequally many valid
  tokens (padding), each with the step's f (`StepBalance`): the mean of their losses and the sum
  of their gradients equal one pass over the whole step. Each micro-batch's own f does not."""
  G, S, E, K, A = 4, 11, 5, 2, 2
  logits = 2.0 * jax.random.normal(jax.random.key(3), (G, S, E))
  valid = jax.random.bernoulli(jax.random.key(4), 0.8, (G, S)).at[3, 2:].set(False)

  def sums(logits, valid):
    r = routing.route(logits, valid, top_k=K, capacity=4)
    return routing.routing_sums(r, valid, balance_loss_choices=choices)

  def loss(logits, valid, step_balance=None):
    m = routing.finalize_sums(sums(logits, valid), balance_loss_scope="batch",
                              step_balance=step_balance)
    return m["balance_loss"] + 10.0 * m["gshard_loss"]

  one, g_one = jax.value_and_grad(loss)(logits, valid)
  micro_logits, micro_valid = logits.reshape(A, G // A, S, E), valid.reshape(A, G // A, S)
  assert len({float(jnp.sum(v)) for v in micro_valid}) == A  # unequal token counts
  counts = [sums(lg, v) for lg, v in zip(micro_logits, micro_valid)]
  step = routing.StepBalance.from_counts(
      {k: sum(c[k] for c in counts) for k in routing.BALANCE_COUNTS}, A)
  per_micro = [jax.value_and_grad(loss)(lg, v, step) for lg, v in zip(micro_logits, micro_valid)]
  np.testing.assert_allclose(np.mean([v for v, _ in per_micro]), one, rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([g for _, g in per_micro]) / A, g_one,
                             rtol=1e-5, atol=1e-8)
  own_f = np.mean([loss(lg, v) for lg, v in zip(micro_logits, micro_valid)])
  assert abs(own_f - one) > 1e-3 * one
  with pytest.raises(ValueError, match="step_balance is for balance_loss_scope='batch'"):
    routing.finalize_sums(counts[0], step_balance=step)


def test_batch_scope_lets_groups_specialise_where_group_scope_penalises_them():
  # Group 0 sends every token to e0 (p = 0.9), group 1 every token to e1: each group on its own is
  # collapsed (Switch loss E * 1 * 0.9 = 1.8), the batch is perfectly balanced (1.0).
  probs = np.array([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
  valid = jnp.ones((2, 4), bool)
  r = routing.route(logits_from_probs(probs), valid, top_k=1, capacity=4)
  sums = routing.routing_sums(r, valid)
  np.testing.assert_allclose(routing.finalize_sums(sums)["balance_loss"], 1.8, rtol=1e-6)
  np.testing.assert_allclose(
      routing.finalize_sums(sums, balance_loss_scope="batch")["balance_loss"], 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match=r"balance_loss_scope='sequence'; allowed: \('group', "
                                       r"'batch'\)"):
    routing.finalize_sums(sums, balance_loss_scope="sequence")


def test_balance_loss_is_one_when_routing_is_uniform():
  # 8 tokens, 4 experts, each expert the argmax of two tokens, probabilities evenly spread.
  E, S = 4, 8
  probs_SE = np.full((S, E), 0.1)
  probs_SE[np.arange(S), np.arange(S) % E] = 0.7
  probs_SE /= probs_SE.sum(-1, keepdims=True)
  r = routing.route(logits_from_probs(probs_SE)[None], jnp.ones((1, S), bool), top_k=1,
                    capacity=S)
  m = routing.finalize_sums(routing.routing_sums(r, jnp.ones((1, S), bool)))
  np.testing.assert_allclose(m["balance_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["gshard_loss"], 1.0 / E**2, rtol=1e-6)
  np.testing.assert_allclose(m["expert_load"], np.full(E, 0.25))
  np.testing.assert_allclose([m["expert_load_max"], m["expert_load_min"]], [1.0, 1.0])


def test_statistics_count_drops_per_choice():
  probs = [[0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.6, 0.1, 0.3]]
  valid = jnp.ones((1, 3), bool)
  r = routing.route(logits_from_probs(probs)[None], valid, top_k=2, capacity=1)
  m = routing.finalize_sums(routing.routing_sums(r, valid))
  # First choices: t0->e0 kept, t1->e1 kept, t2->e0 dropped. Second: t0->e1 dropped,
  # t1->e0 dropped, t2->e2 kept.
  np.testing.assert_allclose(m["dropped_fraction"], [1 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(m["unrouted_fraction"], 0.0)
  np.testing.assert_allclose(m["expert_load"], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(m["router_load"], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
  p = np.asarray(probs)
  np.testing.assert_allclose(m["router_entropy"], np.mean(-np.sum(p * np.log(p), -1)), rtol=1e-5)


def test_statistics_count_policy_skips_and_unrouted_tokens():
  # Token 2 is padding. Threshold 0.3 skips token 1's second choice (0.1/0.9); capacity 1 drops
  # token 1's first choice (e0, taken by token 0), so token 1 has no expert at all.
  probs = [[0.6, 0.3, 0.1], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]
  valid = jnp.array([[True, True, False]])
  r = routing.route(logits_from_probs(probs)[None], valid, top_k=2, capacity=1,
                    second_expert_policy="threshold", second_expert_threshold=0.3)
  m = routing.finalize_sums(routing.routing_sums(r, valid))
  np.testing.assert_allclose(m["skipped_fraction"], [0.0, 0.5])
  np.testing.assert_allclose(m["dropped_fraction"], [0.5, 0.0])
  np.testing.assert_allclose(m["unrouted_fraction"], 0.5)
  assert float(m["tokens"]) == 2.0


# ---------------------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(S=st.sampled_from([1, 5, 12]), E=st.sampled_from([2, 3, 8]), K=st.integers(1, 3),
       C=st.integers(1, 6), priority=st.sampled_from(routing.PRIORITIES),
       overflow=st.sampled_from(routing.OVERFLOWS),
       policy=st.sampled_from(routing.SECOND_EXPERT_POLICIES),
       renormalize=st.sampled_from(routing.RENORMALIZE), seed=st.integers(0, 2**16))
def test_route_invariants(S, E, K, C, priority, overflow, policy, renormalize, seed):
  K = min(K, E)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  logits = jax.random.normal(k1, (S, E))
  valid = jax.random.bernoulli(k2, 0.8, (S,))
  uniform = jax.random.uniform(k3, (S, K)) if policy == "random" else None
  r = routing.route_group(logits, valid, top_k=K, capacity=C, priority=priority,
                          overflow=overflow, second_expert_policy=policy, uniform_SK=uniform,
                          gate="gshard", renormalize=renormalize)
  kept = np.asarray(r.kept)
  expert = np.asarray(r.expert)
  slot = np.asarray(r.slot)
  # Padding never holds a slot; no expert exceeds C; no two choices share a slot.
  assert not kept[~np.asarray(valid)].any()
  for e in range(E):
    slots = slot[kept & (expert == e)]
    assert len(slots) <= C
    assert len(set(slots.tolist())) == len(slots)
    assert np.all((slots >= 0) & (slots < C))
  # A token never uses the same expert twice.
  for s in range(S):
    used = expert[s][kept[s]]
    assert len(set(used.tolist())) == len(used)
  if overflow == "drop":
    np.testing.assert_array_equal(expert, r.router_expert)
    # Dropping only happens when the expert is full.
    for e in range(E):
      lost = r.wanted & ~r.kept & (expert == e)
      if np.any(lost):
        assert np.sum(kept & (expert == e)) == C
  else:
    # Rerouting only drops a choice when every expert it could still use is full.
    for s in range(S):
      for j in range(K):
        if r.wanted[s, j] and not kept[s, j]:
          unused = set(range(E)) - set(expert[s][kept[s]].tolist())
          for e in unused:
            assert np.sum(kept & (expert == e)) == C
  # Gates: zero exactly where not kept, positive where kept; per token they sum to 1 after the
  # drop (after_drop) or to the kept share of the router's top-K mass (before_drop).
  gate = np.asarray(r.gate)
  assert np.all(gate[~kept] == 0) and np.all(gate[kept] > 0)
  sums = gate.sum(-1)
  if renormalize == "after_drop":
    np.testing.assert_allclose(sums[kept.any(-1)], 1.0, rtol=1e-5)
  else:
    assert np.all(sums <= 1.0 + 1e-5)
  # Policy: only later choices are ever skipped, and only valid tokens want slots.
  wanted = np.asarray(r.wanted)
  np.testing.assert_array_equal(wanted[:, 0], np.asarray(valid))
  if policy == "all":
    np.testing.assert_array_equal(wanted, np.asarray(valid)[:, None] & np.ones(K, bool))


def test_sigmoid_scores_deepseek_v3_gates():
  """DeepSeek-V3: s = sigmoid(logits) per expert; top-k by s; gates s_j / sum_topk(s) * scale.
  Hand-computed for one token: logits (2, 0, 1, -1) -> s = (.881, .5, .731, .269); top-2 =
  experts 0 and 2; gates .881/1.612 * 2.5 = 1.366 and .731/1.612 * 2.5 = 1.134."""
  logits = jnp.array([[[2.0, 0.0, 1.0, -1.0]]])
  r = routing.route(logits, jnp.ones((1, 1), bool), top_k=2, capacity=1, gate="gshard",
                    score="sigmoid", routed_scaling_factor=2.5)
  s = 1 / (1 + np.exp(-np.array([2.0, 0.0, 1.0, -1.0])))
  np.testing.assert_array_equal(r.expert[0, 0], [0, 2])
  np.testing.assert_allclose(r.gate[0, 0], 2.5 * s[[0, 2]] / (s[0] + s[2]), rtol=1e-6)
  np.testing.assert_allclose(r.probs[0, 0], s, rtol=1e-6)  # raw scores, not normalised
  # The balance loss reads normalised scores: P = s / sum(s), f = first choices.
  m = routing.finalize_sums(routing.routing_sums(r, jnp.ones((1, 1), bool), score="sigmoid"))
  np.testing.assert_allclose(m["balance_loss"], 4 * s[0] / s.sum(), rtol=1e-6)
  # Softmax scores with the scale: the Switch gate times 2.5.
  r = routing.route(logits, jnp.ones((1, 1), bool), top_k=1, capacity=1,
                    routed_scaling_factor=2.5)
  np.testing.assert_allclose(r.gate[0, 0, 0], 2.5 * jax.nn.softmax(logits[0, 0])[0],
                             rtol=1e-6)


def test_expert_choice_each_expert_takes_its_top_c_tokens():
  """4 tokens, 2 experts, C = 2. Scores (softmax of the logits below):
  token 0 (.9, .1), 1 (.6, .4), 2 (.2, .8), 3 (.5, .5) [padding]. Expert 0 picks tokens 0, 1 (.9,
  .6; token 3 is padding); expert 1 picks tokens 2, 1 (.8, .4). Token 1 gets both experts, token 0
  and 2 one each, and the padding none."""
  probs = np.array([[.9, .1], [.6, .4], [.2, .8], [.5, .5]])
  valid = jnp.array([[True, True, True, False]])
  r = routing.route(logits_from_probs(probs)[None], valid, choice="expert", capacity=2)
  kept = np.zeros((4, 2), bool)  # [token, expert]
  for token, expert in ((0, 0), (1, 0), (2, 1), (1, 1)):
    kept[token, expert] = True
  # Columns are each token's experts by its own score: token 2 lists expert 1 first.
  np.testing.assert_array_equal(r.expert[0], [[0, 1], [0, 1], [1, 0], [0, 1]])
  got = np.zeros((4, 2), bool)
  for s_ in range(4):
    for j in range(2):
      got[s_, r.expert[0, s_, j]] = r.kept[0, s_, j]
  np.testing.assert_array_equal(got, kept)
  # Slots: rank among the expert's picks (expert 1: token 2 first, then token 1).
  assert int(r.slot[0, 1, 1]) == 1 and int(r.slot[0, 2, 0]) == 0
  # Gates: the token's score for each expert that picked it, 0 otherwise.
  np.testing.assert_allclose(r.gate[0], [[.9, 0], [.6, .4], [.8, 0], [0, 0]], atol=1e-6)
  m = routing.finalize_sums(routing.routing_sums(r, valid))
  np.testing.assert_allclose(m["unrouted_fraction"], 0.0)
  np.testing.assert_allclose(m["expert_load"], [0.5, 0.5])


def test_expert_choice_leaves_slots_empty_when_a_group_has_few_real_tokens():
  probs = np.full((4, 3), 1 / 3)
  valid = jnp.array([[True, False, False, False]])
  r = routing.route(logits_from_probs(probs)[None], valid, choice="expert", capacity=2)
  assert int(jnp.sum(r.kept)) == 3  # The one real token, once per expert; padding never.
  assert not bool(jnp.any(r.kept[0, 1:]))


def test_selection_bias_steers_the_choice_but_not_the_gate():
  """Scores (.5, .3, .2): top-1 is expert 0; a bias of +.25 on expert 2 makes it the choice
  (.45 > .5 is false, so +.35: .55 > .5), and its gate stays its score, .2."""
  logits = logits_from_probs(np.array([[.5, .3, .2]]))[None]
  valid = jnp.ones((1, 1), bool)
  r = routing.route(logits, valid, top_k=1, capacity=1)
  assert int(r.expert[0, 0, 0]) == 0
  r = routing.route(logits, valid, top_k=1, capacity=1,
                    selection_bias_E=jnp.array([0.0, 0.0, 0.35]))
  assert int(r.expert[0, 0, 0]) == 2
  np.testing.assert_allclose(r.gate[0, 0, 0], 0.2, rtol=1e-5)
  m = routing.finalize_sums(routing.routing_sums(r, valid))
  np.testing.assert_array_equal(m["selection_count"], [0, 0, 1])


def test_group_limited_routing_picks_inside_the_best_groups():
  """6 experts in 3 groups {0,1} {2,3} {4,5}; scores (.30, .01, .20, .19, .25, .05): group scores
  (sum of its top 2) .31, .39, .30. With topk_groups=1 the token may use group 1 only, so its
  top-2 is experts 2 and 3, although expert 0 (.30) and 4 (.25) score higher; gates keep scores."""
  probs = np.array([[.30, .01, .20, .19, .25, .05]])
  logits = logits_from_probs(probs)[None]
  valid = jnp.ones((1, 1), bool)
  r = routing.route(logits, valid, top_k=2, capacity=1, gate="gshard", num_expert_groups=3,
                    topk_groups=1)
  np.testing.assert_array_equal(r.expert[0, 0], [2, 3])
  np.testing.assert_allclose(r.gate[0, 0], [.20 / .39, .19 / .39], rtol=1e-5)
  r = routing.route(logits, valid, top_k=2, capacity=1, gate="gshard", num_expert_groups=3,
                    topk_groups=2)  # groups 1 and 0: experts 0 (.30) and 2 (.20)
  np.testing.assert_array_equal(r.expert[0, 0], [0, 2])
