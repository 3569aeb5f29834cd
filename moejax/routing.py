"""Routing math for Mixture-of-Experts layers, as pure functions on arrays.

Everything a paper specifies about *which token goes to which expert slot* lives here, so it can be
read against the papers line by line and tested without building a model. Shapes use the
package's one-letter axes (`moejax/__init__.py`):

  G groups, S tokens per group, E experts, K experts per token (top_k), C capacity (slots per
  expert per group), D model width; A flattened (token, choice) pairs; Q expert groups and k the
  groups each token keeps (group-limited routing).

Pipeline for one group (`route_group`; `route` vmaps it over groups):

1. Scores `probs_SE = softmax(logits_SE)` (`score="softmax"`, every paper before DeepSeek-V3) or
   `sigmoid(logits_SE)` (`score="sigmoid"`, DeepSeek-V3: each expert's affinity on its own; the
   scores do not sum to 1), in the logits' dtype (float32 unless `router_logits` was asked for
   another: the whole router, matmul, score, top-k and gates, runs in one dtype, so a bfloat16
   router is Switch Table 2's bfloat16 router, not a float32 softmax of bf16 logits).
2. Top-K experts per token (`jax.lax.top_k`: ties go to the lower expert index).
3. Second-expert policy (GShard), for every choice after the first: `all` keeps it; `random`
   keeps it if `2 * g_j > U(0, 1)` (GShard Algorithm 1, with `g_j` the gate normalised over the
   top-K; training only, eval keeps every choice); `threshold` keeps it if
   `g_j > second_expert_threshold` (deterministic, so in training and eval alike).
4. Capacity (`expert_capacity`): each expert takes at most C choices per group. Choices claim
   slots in priority order:
   - `position`: choice-major (every token's first choice before any second choice), then by
     token position (Switch / GShard / Mesh TF);
   - `token`: token-major (token 0's K choices, then token 1's, ...; MaxText's order);
   - `probability`: choice-major, tokens ranked by their top-1 router probability
     (batch-prioritized routing, V-MoE / ST-MoE).
   Causality in a decoder: whether token t keeps a choice may depend only on tokens <= t. That
   holds for `token` with any K and for `position` with K = 1; with K >= 2, `position` lets the
   first choices of later tokens take the slot an earlier token's second choice wanted, and
   `probability` ranks by every token's score. `reroute` (below) places rerouted choices after
   every token's first choices, so an earlier token's fallback depends on later tokens: it is
   not causal-safe with any priority.
5. Overflow: `drop` (the choice gets no slot; the token keeps its residual) or `reroute` (the
   token's earliest unplaced choice tries its next-best unused expert, one candidate per round,
   rounds in priority order, until it fits or the token has no experts left; Switch's
   "No-Token-Left-Behind" ablation).
6. Gates: `softmax` (raw router probability, Switch), `gshard` (normalised over the selected
   experts) or `mixtral` (softmax over the selected logits -- the same function as `gshard`, kept
   as a name so configs can say what they reproduce). Normalisation happens over the router's
   top-K `before_drop` (Megatron, Tutel, GShard) or over the surviving choices `after_drop`
   (DeepSpeed top-2). Finally every gate is multiplied by `routed_scaling_factor` (DeepSeek-V2/V3;
   1.0 elsewhere). With sigmoid scores, `gshard` is DeepSeek-V3's gate (scores normalised over
   the selected experts) and `softmax` the raw score.

Expert choice (`expert_choice_group`, `choice="expert"`, Zhou et al. 2022) replaces steps 2-5:
each expert takes the C tokens of its group with the highest score; a token gets 0..E experts.

Padding tokens (`valid_S == False`) take no capacity and count in no loss or statistic.

Auxiliary losses and statistics (`routing_sums` → `finalize_sums`) are first accumulated as
*sums and counts* so that the values computed on one device equal those computed with groups
sharded over a mesh (the sums are `psum`-ed before the division).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

CHOICES = ("token", "expert")
SCORES = ("softmax", "sigmoid")
GATES = ("softmax", "gshard", "mixtral")
RENORMALIZE = ("before_drop", "after_drop")
SECOND_EXPERT_POLICIES = ("all", "random", "threshold")
PRIORITIES = ("position", "token", "probability")
OVERFLOWS = ("drop", "reroute")
BALANCE_LOSS_CHOICES = ("first", "all", "any")
BALANCE_LOSS_SCOPES = ("group", "batch")
CAPACITY_CONVENTIONS = ("switch", "mesh_tf", "flaxformer", "vmoe", "praxis", "maxtext")


# ----------------------------------------------------------------------------------------------
# Capacity
# ----------------------------------------------------------------------------------------------


def expert_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float, *,
                    convention: str = "switch", min_capacity: int = 0, multiple: int = 1) -> int:
  """Slots per expert per group, C.

  `switch` (default, Switch eq. 3 generalised to top-k; vmoe without its rounding):
  `C = ceil(k * cf * S / E)`. The other conventions reproduce other codebases' numbers (read
  from each codebase's source): `mesh_tf` `max(min(S, int(S*cf/E)), 4)`;
  `flaxformer` `max(round(cf*S/E), 4)` (no k factor); `vmoe` `ceil(S*k*cf/E)` up to a multiple of
  4; `praxis` `int(S*cf/E)` up to a multiple of 4; `maxtext` `int(max(ceil(S*k/E)*cf, cf))`.

  Then, for every convention: at least `max(min_capacity, 1)`, rounded up to a multiple of
  `multiple` (hardware alignment), and finally clipped to S -- a token sends at most one choice
  to a given expert, so C = S already holds every token and the clip never changes a result
  (it can undo the alignment when S is not a multiple).

  `capacity_factor=math.inf` means no drop: C = S directly.
  """
  S, E, k, cf = group_size, num_experts, top_k, capacity_factor
  if math.isinf(cf):
    return S
  if convention == "switch":
    c = math.ceil(k * cf * S / E)
  elif convention == "mesh_tf":
    c = max(min(S, int(S * cf / E)), 4)
  elif convention == "flaxformer":
    c = max(round(cf * S / E), 4)
  elif convention == "vmoe":
    c = 4 * math.ceil(math.ceil(S * k * cf / E) / 4)
  elif convention == "praxis":
    c = 4 * math.ceil(int(S * cf / E) / 4)
  elif convention == "maxtext":
    c = int(max(math.ceil(S * k / E) * cf, cf))
  else:
    raise ValueError(f"capacity_convention={convention!r}; allowed: {CAPACITY_CONVENTIONS}.")
  c = max(c, min_capacity, 1)
  c = multiple * math.ceil(c / multiple)
  return min(c, S)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


def router_logits(x_GSD: jax.Array, w_DE: jax.Array, *, dtype=jnp.float32,
                  jitter_GSD: jax.Array | None = None) -> jax.Array:
  """`logits = (x * jitter) @ W` computed in `dtype` (float32: Switch's selective precision).

  `jitter_GSD` is the multiplicative input noise U[1-eps, 1+eps] (Switch / ST-MoE apply it to the
  router *input*), drawn by the caller in training only.
  """
  x_GSD = x_GSD.astype(dtype)
  if jitter_GSD is not None:
    x_GSD = x_GSD * jitter_GSD.astype(dtype)
  return jnp.einsum("GSD,DE->GSE", x_GSD, w_DE.astype(dtype))


# ----------------------------------------------------------------------------------------------
# Routing one group
# ----------------------------------------------------------------------------------------------


class Routing(NamedTuple):
  """Where each of a token's K choices went. Every field has shape `[..., S, K]` (`probs` and
  `logits`: `[..., S, E]`), with a leading G when `route` vmaps over groups (`[G, S, K]`) and
  none for one group (`route_group`: `[S, K]`)."""
  router_expert: jax.Array  # int32: the router's top-K experts, before policy and capacity
  expert: jax.Array  # int32: the expert each choice finally uses (differs after reroute)
  slot: jax.Array  # int32: the choice's slot in that expert's buffer, valid where kept
  kept: jax.Array  # bool: the choice has a slot (it is computed and combined)
  wanted: jax.Array  # bool: the choice asked for a slot (valid token, kept by the policy)
  gate: jax.Array  # combine weight (router dtype), 0 where not kept
  probs: jax.Array  # router probabilities (router dtype)
  logits: jax.Array  # router logits (for the z-loss)


def _claim_slots(expert_A: jax.Array, wants_A: jax.Array, fill_E: jax.Array,
                 capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gives slots to A choices (flattened (token, choice) pairs) listed in priority order (earlier
  wins).

  Choice a wanting expert e gets slot `fill_E[e] + (number of earlier choices wanting e)`; it is
  kept if that slot is < capacity. A stable sort by expert makes this O(A log A), independent of
  E, instead of a cumulative sum over an [A, E] one-hot.
  Returns (slot_A, kept_A, new fill_E).
  """
  (num_experts,) = fill_E.shape
  n = expert_A.shape[0]
  key_A = jnp.where(wants_A, expert_A, num_experts)  # non-wanting choices sort last
  order_A = jnp.argsort(key_A, stable=True)
  # [E + 1]: choices per expert, the last bucket the non-wanting ones.
  count = jnp.bincount(key_A, length=num_experts + 1)
  start = jnp.cumsum(count) - count
  rank_sorted_A = jnp.arange(n, dtype=jnp.int32) - start[key_A[order_A]]
  rank_A = jnp.zeros(n, jnp.int32).at[order_A].set(rank_sorted_A.astype(jnp.int32))
  slot_A = fill_E[jnp.minimum(key_A, num_experts - 1)] + rank_A
  kept_A = wants_A & (slot_A < capacity)
  new_fill_E = jnp.minimum(fill_E + count[:num_experts], capacity)
  return slot_A.astype(jnp.int32), kept_A, new_fill_E.astype(jnp.int32)


def route_group(logits_SE: jax.Array, valid_S: jax.Array, *, top_k: int, capacity: int,
                gate: str = "softmax", renormalize: str = "before_drop",
                second_expert_policy: str = "all", second_expert_threshold: float = 0.2,
                uniform_SK: jax.Array | None = None, priority: str = "position",
                overflow: str = "drop", score: str = "softmax",
                routed_scaling_factor: float = 1.0, num_expert_groups: int = 1,
                topk_groups: int = 1, selection_bias_E: jax.Array | None = None,
                forced_expert_SK: jax.Array | None = None,
                forced_gate_SK: jax.Array | None = None) -> Routing:
  """Routes the S tokens of one group to E experts with C slots each. See the module docstring.

  `uniform_SK` holds the U(0, 1) draws of the `random` policy (training only; column 0 unused);
  when it is None, `random` behaves as `all` (deterministic eval).

  Selection only (the gates keep the scores): `selection_bias_E` is added to the scores before
  the top-k (DeepSeek-V3's auxiliary-loss-free balancing), and with `num_expert_groups` n > 1
  each token first keeps its `topk_groups` best groups of E/n consecutive experts, a group
  scored by the sum of its two best (biased) scores, and picks its top-k inside them
  (DeepSeek-V3's group-limited, "node-limited", routing).

  `forced_expert_SK` (benchmarks: `forced_choices`; routing replay) replaces the router's top-K;
  everything after selection (policy, capacity, gates from the scores at those experts) is
  unchanged. `forced_gate_SK` (routing replay with recorded gates; needs `forced_expert_SK`)
  replaces the final gates of the kept choices, and the second-expert policy: a choice wants a
  slot iff its recorded gate is nonzero (what the recording pass kept), so with the recording
  pass's capacity every wanted choice fits whatever the priority, and the output does not depend
  on the current router (a choice whose recorded gate is 0 counts as skipped, not dropped). The
  combine then carries no gradient to the router, only the auxiliary losses do.
  """
  S, E = logits_SE.shape
  K = top_k
  # In the router dtype (module docstring, 1.).
  probs_SE = (jax.nn.sigmoid(logits_SE) if score == "sigmoid"
              else jax.nn.softmax(logits_SE, axis=-1))
  valid_S = valid_S.astype(bool)
  select_SE = probs_SE  # What the top-k ranks: the scores, biased in float32 when a bias is set
  if selection_bias_E is not None:  # (a bfloat16 sum would round away 1e-3 updates).
    select_SE = probs_SE.astype(jnp.float32) + selection_bias_E.astype(jnp.float32)
  if num_expert_groups > 1:
    n = num_expert_groups
    by_group = select_SE.reshape(S, n, E // n)  # [S, Q, E / Q]
    group_score_SQ = jnp.sum(jax.lax.top_k(by_group, min(2, E // n))[0], axis=-1)
    _, best_groups = jax.lax.top_k(group_score_SQ, topk_groups)  # [S, topk_groups]
    allowed_SQ = jnp.zeros((S, n), bool).at[jnp.arange(S)[:, None], best_groups].set(True)
    allowed_SE = jnp.repeat(allowed_SQ, E // n, axis=1)
    select_SE = jnp.where(allowed_SE, select_SE, -jnp.inf)

  # Router's choices. With reroute the full ranking is needed; top_k(E) breaks ties as top_k(K).
  num_ranked = E if overflow == "reroute" else K
  _, ranking = jax.lax.top_k(select_SE, num_ranked)  # [S, K], or [S, E] under reroute
  if forced_expert_SK is not None:  # Benchmarks: these experts instead of the router's top-K.
    ranking = forced_expert_SK.astype(jnp.int32)
  ranking_p = jnp.take_along_axis(probs_SE, ranking, axis=-1)  # scores, without the bias
  router_expert_SK = ranking[:, :K].astype(jnp.int32)
  top_p_SK = ranking_p[:, :K]
  topk_sum_S = jnp.sum(top_p_SK, axis=-1)

  # Second-expert policy (GShard), applied to every choice after the first.
  norm_gate_SK = top_p_SK / topk_sum_S[:, None]
  keep_SK = jnp.ones((S, K), bool)
  if K > 1 and second_expert_policy == "random" and uniform_SK is not None:
    keep_SK = keep_SK.at[:, 1:].set(2.0 * norm_gate_SK[:, 1:] > uniform_SK[:, 1:])
  elif K > 1 and second_expert_policy == "threshold":
    keep_SK = keep_SK.at[:, 1:].set(norm_gate_SK[:, 1:] > second_expert_threshold)
  if forced_gate_SK is not None:  # Replayed gates: the recording pass's keep decisions too.
    keep_SK = forced_gate_SK != 0
  wanted_SK = keep_SK & valid_S[:, None]

  # Priority: the order in which tokens claim slots within each choice rank.
  if priority == "probability":  # batch-prioritized routing: highest top-1 probability first
    token_order_S = jnp.argsort(-top_p_SK[:, 0], stable=True)
  else:
    token_order_S = jnp.arange(S)
  inverse_S = jnp.argsort(token_order_S)
  fill_E = jnp.zeros((E,), jnp.int32)
  if priority == "token":  # token-major: token 0's K choices, then token 1's, ...
    slot_A, kept_A, fill_E = _claim_slots(router_expert_SK.reshape(-1), wanted_SK.reshape(-1),
                                          fill_E, capacity)
    slot_SK, kept_SK = slot_A.reshape(S, K), kept_A.reshape(S, K)
  else:  # choice-major: all first choices, then all second choices, ...
    expert_KS = router_expert_SK[token_order_S].T
    wanted_KS = wanted_SK[token_order_S].T
    slot_A, kept_A, fill_E = _claim_slots(expert_KS.reshape(-1), wanted_KS.reshape(-1), fill_E,
                                          capacity)
    slot_SK = slot_A.reshape(K, S).T[inverse_S]
    kept_SK = kept_A.reshape(K, S).T[inverse_S]
  expert_SK = router_expert_SK

  if overflow == "reroute" and E > K:
    # Round r offers expert ranking[:, K + r] to each token's earliest wanted-but-unplaced choice.
    def reroute_round(r, carry):
      expert_SK, slot_SK, kept_SK, fill_E = carry
      unplaced_SK = wanted_SK & ~kept_SK
      has_unplaced_S = jnp.any(unplaced_SK, axis=-1)
      first_SK = jax.nn.one_hot(jnp.argmax(unplaced_SK, axis=-1), K, dtype=bool) & unplaced_SK
      candidate_S = jax.lax.dynamic_index_in_dim(ranking, K + r, axis=1, keepdims=False)
      # One choice per token, in priority order.
      slot_S, kept_S, fill_E = _claim_slots(candidate_S[token_order_S].astype(jnp.int32),
                                            has_unplaced_S[token_order_S], fill_E, capacity)
      placed_SK = first_SK & kept_S[inverse_S][:, None]
      expert_SK = jnp.where(placed_SK, candidate_S[:, None].astype(jnp.int32), expert_SK)
      slot_SK = jnp.where(placed_SK, slot_S[inverse_S][:, None], slot_SK)
      return expert_SK, slot_SK, kept_SK | placed_SK, fill_E

    expert_SK, slot_SK, kept_SK, fill_E = jax.lax.fori_loop(
        0, E - K, reroute_round, (expert_SK, slot_SK, kept_SK, fill_E))

  # Gates from the probabilities of the experts finally used.
  p_SK = jnp.take_along_axis(probs_SE, expert_SK, axis=-1)
  kept_p_SK = jnp.where(kept_SK, p_SK, 0.0)
  if gate == "softmax":
    gate_SK = kept_p_SK
  elif renormalize == "before_drop":
    gate_SK = kept_p_SK / topk_sum_S[:, None]
  else:
    kept_sum_S1 = jnp.sum(kept_p_SK, axis=-1, keepdims=True)
    gate_SK = kept_p_SK / jnp.where(kept_sum_S1 > 0, kept_sum_S1, 1.0)
  if routed_scaling_factor != 1.0:
    gate_SK = gate_SK * jnp.asarray(routed_scaling_factor, gate_SK.dtype)
  if forced_gate_SK is not None:  # Replay: the recorded combine weights (already scaled).
    gate_SK = jnp.where(kept_SK, forced_gate_SK.astype(gate_SK.dtype), 0.0)
  return Routing(router_expert_SK, expert_SK, jnp.where(kept_SK, slot_SK, 0), kept_SK, wanted_SK,
                 gate_SK, probs_SE, logits_SE)


def expert_choice_group(logits_SE: jax.Array, valid_S: jax.Array, *, capacity: int,
                        score: str = "softmax", routed_scaling_factor: float = 1.0) -> Routing:
  """Expert-choice routing (Zhou et al. 2022) of one group: each expert takes its C tokens of
  highest score (ties: the earlier token); a token gets 0 to E experts; gate = its score.

  Token scores are `softmax` over experts (the paper's) or `sigmoid`. Padding is never picked: an
  expert whose group holds fewer than C real tokens leaves slots empty. The result is a `Routing`
  with K = E choices per token, the token's experts ranked by its own score (so column 0 is its
  top-1 expert, and `routing_sums`' balance statistics read as for token choice); choice j is kept
  when that expert picked the token, in slot = its rank among the expert's picks. An expert
  looks at every token of its group, so in a decoder the choice leaks the future (docs).
  """
  S, E = logits_SE.shape
  probs_SE = (jax.nn.sigmoid(logits_SE) if score == "sigmoid"
              else jax.nn.softmax(logits_SE, axis=-1))
  valid_S = valid_S.astype(bool)
  C = min(capacity, S)
  # Each expert's picks: top-C of its column over real tokens (padding ranks below every score).
  column_ES = jnp.where(valid_S[None, :], probs_SE.T.astype(jnp.float32), -1.0)
  picked_p_EC, token_EC = jax.lax.top_k(column_ES, C)
  picked_EC = picked_p_EC >= 0.0
  expert_EC = jnp.broadcast_to(jnp.arange(E)[:, None], (E, C))  # (token, expert) pairs distinct
  kept_SE = jnp.zeros((S, E), bool).at[token_EC, expert_EC].set(picked_EC)
  slot_SE = jnp.zeros((S, E), jnp.int32).at[token_EC, expert_EC].set(
      jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (E, C)))
  # Per token, its experts in order of its own score.
  _, ranking_SE = jax.lax.top_k(probs_SE, E)
  expert_SK = ranking_SE.astype(jnp.int32)
  kept_SK = jnp.take_along_axis(kept_SE, expert_SK, axis=-1)
  slot_SK = jnp.where(kept_SK, jnp.take_along_axis(slot_SE, expert_SK, axis=-1), 0)
  gate_SK = jnp.where(kept_SK, jnp.take_along_axis(probs_SE, expert_SK, axis=-1), 0.0)
  if routed_scaling_factor != 1.0:
    gate_SK = gate_SK * jnp.asarray(routed_scaling_factor, gate_SK.dtype)
  wanted_SK = jnp.broadcast_to(valid_S[:, None], (S, E))
  return Routing(expert_SK, expert_SK, slot_SK, kept_SK, wanted_SK, gate_SK, probs_SE, logits_SE)


def route(logits_GSE: jax.Array, valid_GS: jax.Array, *, uniform_GSK: jax.Array | None = None,
          forced_expert_GSK: jax.Array | None = None, forced_gate_GSK: jax.Array | None = None,
          choice: str = "token", **kwargs) -> Routing:
  """`route_group` (`choice="token"`) or `expert_choice_group` (`"expert"`; it takes only
  `capacity`, `score` and `routed_scaling_factor`) for every group (vmapped); fields get a
  leading G axis."""
  if choice == "expert":
    ec = {k: kwargs[k] for k in ("capacity", "score", "routed_scaling_factor") if k in kwargs}
    return jax.vmap(lambda l, v: expert_choice_group(l, v, **ec))(logits_GSE, valid_GS)
  return jax.vmap(lambda l, v, u, f, g: route_group(l, v, uniform_SK=u, forced_expert_SK=f,
                                                    forced_gate_SK=g, **kwargs))(
      logits_GSE, valid_GS, uniform_GSK, forced_expert_GSK, forced_gate_GSK)


def forced_choices(router: str, shape_GSK: tuple[int, int, int], num_experts: int, *,
                   key: jax.Array | None = None) -> jax.Array:
  """Experts for the benchmark routers, bypassing the learned router (`MoEConfig.router`):

  - `balanced`: token s of every group takes experts `(s + j) mod E`, j < K: K distinct
    experts per token, and with E dividing S every expert gets exactly S/E of each choice rank
    (so the first choices are balanced too; MaxText's
    `use_random_routing` and Megatron's `moe_router_force_load_balancing` serve the same need);
  - `random`: K distinct experts per token, uniformly at random (the top-K of U(0, 1) noise from
    `key`).
  """
  G, S, K = shape_GSK
  if router == "balanced":
    index_SK = jnp.arange(S)[:, None] + jnp.arange(K)[None, :]
    return jnp.broadcast_to(index_SK % num_experts, (G, S, K)).astype(jnp.int32)
  if router == "random":
    noise_GSE = jax.random.uniform(key, (G, S, num_experts))
    return jax.lax.top_k(noise_GSE, K)[1].astype(jnp.int32)
  raise ValueError(f"forced router={router!r}; allowed: 'balanced' | 'random'.")


# ----------------------------------------------------------------------------------------------
# Auxiliary losses and statistics
# ----------------------------------------------------------------------------------------------


def routing_sums(r: Routing, valid_GS: jax.Array, *, balance_loss_choices: str = "first",
                 score: str = "softmax") -> dict[str, jax.Array]:
  """Sums and counts from which every loss and statistic is finalised (see `finalize_sums`).

  Per group g with n_g valid tokens: `f_ge` = fraction of the router's choices that pick expert
  e, before policy and capacity: `first` choices only (Switch), `all` K choices each counting 1/K
  (Megatron), or `any` of the top-K counting 1 each (flaxformer / T5X; K times `all`); `P_ge` =
  mean router probability of e (sigmoid scores are first normalised over the experts, as
  DeepSeek-V3's sequence-wise loss does). Switch loss of the group `E * sum_e f_ge P_ge` (1.0
  under uniform top-1 routing, K under `any`); GShard loss `(1/E) sum_e (c_ge / n_g) P_ge` with c
  counting first choices only (uniform: 1/E^2). Both are averaged over the groups that hold at
  least one valid token.
  """
  G, S, E = r.probs.shape
  K = r.expert.shape[-1]
  valid_GS = valid_GS.astype(bool)
  validf_GS = valid_GS.astype(jnp.float32)
  n_G = jnp.sum(validf_GS, axis=-1)
  has_tokens_G = n_G > 0
  safe_n_G = jnp.maximum(n_G, 1.0)

  probs_f32_GSE = r.probs.astype(jnp.float32)  # Loss sums in float32 whatever the router dtype.
  if score == "sigmoid":  # A distribution over experts, for P and the entropy.
    probs_f32_GSE = probs_f32_GSE / jnp.maximum(jnp.sum(probs_f32_GSE, -1, keepdims=True), 1e-30)
  probs_GSE = jnp.where(valid_GS[..., None], probs_f32_GSE, 0.0)
  mean_prob_GE = jnp.sum(probs_GSE, axis=1) / safe_n_G[:, None]  # Switch's P
  first_GSE = jax.nn.one_hot(r.router_expert[..., 0], E) * validf_GS[..., None]
  f_first_GE = jnp.sum(first_GSE, axis=1) / safe_n_G[:, None]
  if balance_loss_choices == "first":
    f_GE = f_first_GE
  else:
    all_GSE = jnp.sum(jax.nn.one_hot(r.router_expert, E), axis=-2) * validf_GS[..., None]
    per_choice = K if balance_loss_choices == "all" else 1
    f_GE = jnp.sum(all_GSE, axis=1) / (per_choice * safe_n_G[:, None])
  # f is a count: no gradient flows through it (Switch eq. 5); P carries the gradient.
  f_GE = jax.lax.stop_gradient(f_GE)
  f_first_GE = jax.lax.stop_gradient(f_first_GE)
  balance_G = E * jnp.sum(f_GE * mean_prob_GE, axis=-1)
  # The batch-scope losses' numerators: counts and probability mass of every token (finalised
  # after the sums are psum-ed over the mesh, so f and P are the whole batch's).
  n_G1 = n_G[:, None]
  gshard_G = jnp.mean(f_first_GE * mean_prob_GE, axis=-1)

  logz_GS = jax.nn.logsumexp(r.logits.astype(jnp.float32), axis=-1)
  entropy_GS = -jnp.sum(probs_f32_GSE * jnp.log(jnp.maximum(probs_f32_GSE, 1e-30)), axis=-1)
  lost_GSK = (r.wanted & ~r.kept) & valid_GS[..., None]
  skipped_GSK = ~r.wanted & valid_GS[..., None]
  unrouted_GS = ~jnp.any(r.kept, axis=-1) & valid_GS
  load_E = jnp.sum(jax.nn.one_hot(r.expert, E) * r.kept[..., None], axis=(0, 1, 2))

  def masked_sum(v_GS):
    return jnp.sum(jnp.where(valid_GS, v_GS, 0.0))

  return {
      "balance_loss": jnp.sum(jnp.where(has_tokens_G, balance_G, 0.0)),
      "f_count": jnp.sum(f_GE * n_G1, axis=0),
      "f_first_count": jnp.sum(f_first_GE * n_G1, axis=0),
      "prob_mass": jnp.sum(probs_GSE, axis=(0, 1)),
      "gshard_loss": jnp.sum(jnp.where(has_tokens_G, gshard_G, 0.0)),
      "groups_with_tokens": jnp.sum(has_tokens_G.astype(jnp.float32)),
      "z_loss": masked_sum(jnp.square(logz_GS)),
      "router_entropy": masked_sum(entropy_GS),
      "router_top1_prob": masked_sum(jnp.max(probs_f32_GSE, axis=-1)),
      "tokens": jnp.sum(n_G),
      "dropped_fraction": jnp.sum(lost_GSK.astype(jnp.float32), axis=(0, 1)),
      "skipped_fraction": jnp.sum(skipped_GSK.astype(jnp.float32), axis=(0, 1)),
      "unrouted_fraction": masked_sum(unrouted_GS.astype(jnp.float32)),
      "router_load": jnp.sum(first_GSE, axis=(0, 1)),
      "selection_count": jnp.sum(jax.nn.one_hot(r.router_expert, E)
                                 * validf_GS[..., None, None], axis=(0, 1, 2)),
      "expert_load": load_E,
  }


class StepBalance(NamedTuple):
  """A whole optimizer step's routing counts for the `batch`-scope balance losses under gradient
  accumulation (a routing pre-pass over every micro-batch counts them; see `moejax.train`).

  With A micro-batches and N valid tokens in the step, a micro-batch's losses are
  `E sum_e f_e P^m_e` and `(1/E) sum_e f1_e P^m_e` with the step's f (`f_E`, `f_first_E`) and
  `P^m_e = prob_mass^m_e / (N / A)`: their mean over the A micro-batches is exactly the loss of
  one forward pass over the whole step (values and gradients: f carries none).
  """
  f_E: jax.Array          # the step's f: counted choices per expert / the step's valid tokens
  f_first_E: jax.Array    # the same for first choices only (GShard's f)
  tokens_share: jax.Array  # N / A: each micro-batch's share of the step's valid tokens

  @classmethod
  def from_counts(cls, counts: dict[str, jax.Array], micro_batches: int) -> StepBalance:
    """From the step's summed `balance_counts` of one layer (`f_count`, `f_first_count`,
    `tokens`, as `routing_sums` names them)."""
    tokens = jnp.maximum(counts["tokens"], 1.0)
    return cls(jax.lax.stop_gradient(counts["f_count"] / tokens),
               jax.lax.stop_gradient(counts["f_first_count"] / tokens),
               jax.lax.stop_gradient(tokens / micro_batches))


BALANCE_COUNTS = ("f_count", "f_first_count", "tokens")  # what a StepBalance is counted from


def load_cv(selection_count_E: jax.Array) -> jax.Array:
  """Coefficient of variation (std / mean over experts) of the router's choices per expert:
  0 is perfect balance (and always 0 under expert choice, balanced by construction)."""
  count_E = selection_count_E.astype(jnp.float32)
  return jnp.std(count_E) / jnp.maximum(jnp.mean(count_E), 1e-9)


def finalize_sums(sums: dict[str, jax.Array], *, balance_loss_scope: str = "group",
                  step_balance: StepBalance | None = None) -> dict[str, jax.Array]:
  """Turns `routing_sums` (possibly psum-ed over a mesh) into losses and statistics.

  - `balance_loss`, `gshard_loss`: scope `group`: mean over groups with tokens of each group's
    loss (unweighted by coefficients); scope `batch`: the same formulas with f and P measured over
    all valid tokens of the sums (`E sum_e f_e P_e`, `(1/E) sum_e f1_e P_e`), or, given
    `step_balance`, with the whole step's f and this call's P over its share of the step's
    tokens (see `StepBalance`; only the `batch` scope takes it).
  - `z_loss`: mean over valid tokens of logsumexp(logits)^2 (ST-MoE eq. 5).
  - `router_entropy`: mean over valid tokens of the router distribution's entropy (nats).
  - `router_confidence`: mean over valid tokens of the router's top-1 probability (sigmoid
    scores normalised over the experts first): 1/E for a uniform router, 1 for a certain one.
  - `load_cv`: coefficient of variation (std / mean over experts) of `selection_count`, the
    router's top-K choices per expert before capacity (`load_cv`): 0 is perfect balance; always
    0 under expert choice, where every expert takes C tokens by construction.
  - `dropped_fraction` [K]: fraction of valid tokens whose j-th choice wanted a slot and found
    none (capacity overflow); `skipped_fraction` [K]: removed by the second-expert policy;
    `unrouted_fraction`: valid tokens with no expert at all (they ride the residual only).
  - `router_load` [E]: fraction of first choices per expert, before capacity (f of Switch).
  - `expert_load` [E]: fraction of computed assignments per expert, after capacity; sums to 1.
  - `expert_load_max`, `expert_load_min`: `E * max/min(expert_load)`: 1.0 is perfect balance.
  - `selection_count` [E]: how many of the router's top-K choices picked each expert (a count,
    not a fraction: summed over micro-batches it is the step's global count, which the
    auxiliary-loss-free bias update reads).
  """
  tokens = jnp.maximum(sums["tokens"], 1.0)
  E = sums["expert_load"].shape[-1]
  expert_load_E = sums["expert_load"] / jnp.maximum(jnp.sum(sums["expert_load"]), 1.0)
  groups = jnp.maximum(sums["groups_with_tokens"], 1.0)
  if balance_loss_scope == "batch" and step_balance is not None:
    mean_prob_E = sums["prob_mass"] / step_balance.tokens_share
    balance = E * jnp.sum(step_balance.f_E * mean_prob_E)
    gshard = jnp.mean(step_balance.f_first_E * mean_prob_E)
  elif balance_loss_scope == "batch":
    mean_prob_E = sums["prob_mass"] / tokens
    balance = E * jnp.sum(sums["f_count"] / tokens * mean_prob_E)
    gshard = jnp.mean(sums["f_first_count"] / tokens * mean_prob_E)
  elif step_balance is not None:
    raise ValueError(f"step_balance is for balance_loss_scope='batch'; got "
                     f"{balance_loss_scope!r}.")
  elif balance_loss_scope == "group":
    balance, gshard = sums["balance_loss"] / groups, sums["gshard_loss"] / groups
  else:
    raise ValueError(f"balance_loss_scope={balance_loss_scope!r}; allowed: "
                     f"{BALANCE_LOSS_SCOPES}.")
  return {
      "balance_loss": balance,
      "gshard_loss": gshard,
      "z_loss": sums["z_loss"] / tokens,
      "router_entropy": sums["router_entropy"] / tokens,
      "router_confidence": sums["router_top1_prob"] / tokens,
      "load_cv": load_cv(sums["selection_count"]),
      "dropped_fraction": sums["dropped_fraction"] / tokens,
      "skipped_fraction": sums["skipped_fraction"] / tokens,
      "unrouted_fraction": sums["unrouted_fraction"] / tokens,
      "router_load": sums["router_load"] / tokens,
      "expert_load": expert_load_E,
      "expert_load_max": E * jnp.max(expert_load_E),
      "expert_load_min": E * jnp.min(expert_load_E),
      "tokens": sums["tokens"],
      "selection_count": sums["selection_count"],
  }
