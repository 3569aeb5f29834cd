"""What do experts specialise in? Routing statistics from recorded router choices (numpy).

The published answers (OpenMoE, Mixtral, ST-MoE): experts specialise by *token identity* far more
than by topic or language; routing is decided early in training; consecutive tokens share an
expert more often than chance; with position-priority capacity, drops concentrate late in the
sequence. Everything here works on plain arrays of U real tokens (or [B, L] blocks), so it runs on
any model's routing; `experiments/routing_analysis.py` records a trained run and writes a report.

- Information: `mutual_information(counts)` (plug-in, bits), `conditional_mutual_information`,
  and `information_report`: I(expert; label) for any labels (domain, token, position bucket,
  previous token) and I(expert; domain | token), each with its *shuffled-label baseline* (the
  mean MI after permuting the label, within each token for the conditional one) subtracted. A
  plug-in MI is biased upward by about (cells - 1) / (2 U ln 2) bits, which for a 32k-token label
  and a few thousand tokens exceeds the real signal; the baseline removes that bias, so random
  routing reads ~0. Shares are divided by H(expert). A split-half difference gives the sampling
  spread. The baseline is the bias *under independence*: where routing strongly depends on a
  label with few tokens per label value it over-corrects, so a share is then a lower bound.
- `domain_expert_lift`: p(expert | domain) / p(expert), 1 = chance (the heatmap).
- `top_tokens`: per expert, the tokens it owns (highest p(expert | token) among frequent tokens).
- `consecutive_sharing`: how often tokens t and t+1 of one document share the first choice, or any
  of their top-k (Mixtral Table 5), against chance, overall and per domain.
- `drop_rates`: the fraction of routing choices without a slot, by position bucket and domain
  (record the layer at the training capacity factor).
- `agreement_with_final`: per checkpoint, the fraction of tokens whose top-1 expert equals the final
  checkpoint's (OpenMoE: routing is learned early).

Record the choices by calling the model with `moe_record_routing=True` (a layer:
`record_routing=True`) under `nnx.capture(f, nnx.Intermediate)`: the layer sows the router's
top-k experts before capacity ("router_topk") and whether each choice got a slot
("router_kept").
"""

from __future__ import annotations

import numpy as np


def contingency(x_U: np.ndarray, y_U: np.ndarray, num_x: int, num_y: int) -> np.ndarray:
  """Counts `[num_x, num_y]` of the pairs (x[u], y[u])."""
  counts = np.zeros((num_x, num_y), np.float64)
  np.add.at(counts, (np.asarray(x_U, np.int64), np.asarray(y_U, np.int64)), 1.0)
  return counts


def entropy(p: np.ndarray) -> float:
  """Entropy in bits of a (possibly unnormalised) distribution."""
  p = np.asarray(p, np.float64).ravel()
  p = p[p > 0] / p.sum()
  return float(-np.sum(p * np.log2(p)))


def mutual_information(counts: np.ndarray) -> float:
  """I(X; Y) in bits = H(X) + H(Y) - H(X, Y) (plug-in), from `counts` `[num_x, num_y]`."""
  counts = np.asarray(counts, np.float64)
  if counts.sum() == 0:
    return 0.0
  return max(entropy(counts.sum(1)) + entropy(counts.sum(0)) - entropy(counts), 0.0)


def _joint_entropy(*columns_U: np.ndarray) -> float:
  """H of the tuple of integer columns, in bits (plug-in, from the observed tuples)."""
  _, counts = np.unique(np.stack([np.asarray(c, np.int64) for c in columns_U]), axis=1,
                        return_counts=True)
  return entropy(counts)


def conditional_mutual_information(x_U, y_U, z_U) -> float:
  """I(X; Y | Z) in bits = H(X, Z) + H(Y, Z) - H(X, Y, Z) - H(Z) (plug-in)."""
  return max(_joint_entropy(x_U, z_U) + _joint_entropy(y_U, z_U) - _joint_entropy(x_U, y_U, z_U)
             - _joint_entropy(z_U), 0.0)


def _mi(experts_U, label_U, given_U) -> float:
  if given_U is None:
    return max(_joint_entropy(experts_U) + _joint_entropy(label_U)
               - _joint_entropy(experts_U, label_U), 0.0)
  return conditional_mutual_information(label_U, experts_U, given_U)


def _permute_within(label_U: np.ndarray, given_U: np.ndarray | None, rng) -> np.ndarray:
  """`label_U` shuffled, within each value of `given_U` when set (keeps p(label | given))."""
  if given_U is None:
    return rng.permutation(label_U)
  order = np.lexsort((rng.random(len(given_U)), given_U))  # random order inside each stratum
  by_given = np.argsort(given_U, kind="stable")
  out = np.empty_like(label_U)
  out[by_given] = label_U[order]
  return out


def information_report(experts_U: np.ndarray, label_U: np.ndarray,
                       given_U: np.ndarray | None = None, *, rounds: int = 4,
                       seed: int = 0) -> dict[str, float]:
  """I(expert; label [| given]) with its shuffled-label baseline, in bits and as a share of
  H(expert); `spread_share` is |share(first half) - share(second half)| (sampling noise)."""
  experts_U, label_U = np.asarray(experts_U, np.int64), np.asarray(label_U, np.int64)
  given_U = None if given_U is None else np.asarray(given_U, np.int64)
  rng = np.random.default_rng(seed)

  def corrected(idx):
    e, l, g = experts_U[idx], label_U[idx], None if given_U is None else given_U[idx]
    mi = _mi(e, l, g)
    baseline = float(np.mean([_mi(e, _permute_within(l, g, rng), g) for _ in range(rounds)]))
    return mi, baseline

  n = len(experts_U)
  h_expert = _joint_entropy(experts_U) if n else 0.0
  mi, baseline = corrected(np.arange(n))
  scale = 1.0 / h_expert if h_expert > 0 else 0.0
  # Contiguous halves: records are row-major, so each half holds other rows and documents.
  halves = ([corrected(np.arange(n)[:n // 2]), corrected(np.arange(n)[n // 2:])] if n >= 4
            else [(0, 0), (0, 0)])
  return {"mi_bits": mi, "baseline_bits": baseline, "excess_bits": mi - baseline,
          "share": (mi - baseline) * scale, "expert_entropy_bits": h_expert,
          "spread_share": abs((halves[0][0] - halves[0][1]) - (halves[1][0] - halves[1][1]))
                          * scale}


def routing_report(experts_U: np.ndarray, tokens_U: np.ndarray, domains_U: np.ndarray,
                   num_experts: int) -> dict[str, float]:
  """Bias-corrected shares of H(expert) explained by the domain, the token, and the domain
  beyond the token, for one layer's top-1 choices over U real tokens."""
  del num_experts  # Read from the data; kept for callers that pass it.
  out = {"tokens": float(len(experts_U))}
  for name, label, given in (("domain", domains_U, None), ("token", tokens_U, None),
                             ("domain_given_token", domains_U, tokens_U)):
    report = information_report(experts_U, label, given)
    out[f"{name}_share"] = report["share"]
    out["expert_entropy_bits"] = report["expert_entropy_bits"]
  return out


def domain_expert_lift(experts_U: np.ndarray, domains_U: np.ndarray, num_domains: int,
                       num_experts: int) -> np.ndarray:
  """`[num_domains, num_experts]`: p(expert | domain) / p(expert); 1 = chance, 0 = never."""
  counts = contingency(domains_U, experts_U, num_domains, num_experts)
  p_e = counts.sum(0) / max(counts.sum(), 1)
  p_e_given_d = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  return np.divide(p_e_given_d, p_e, out=np.zeros_like(p_e_given_d), where=p_e > 0)


def top_tokens(experts_U: np.ndarray, tokens_U: np.ndarray, num_experts: int, *, n: int = 8,
               min_count: int = 20) -> list[list[tuple[int, int, float]]]:
  """Per expert, up to `n` (token, times routed there, p(expert | token)) among tokens seen at
  least `min_count` times, highest p(expert | token) first: the tokens the expert owns."""
  tokens_U, experts_U = np.asarray(tokens_U, np.int64), np.asarray(experts_U, np.int64)
  counts = contingency(tokens_U, experts_U, tokens_U.max() + 1, num_experts)
  totals = counts.sum(1)
  frequent = np.flatnonzero(totals >= min_count)
  out = []
  for e in range(num_experts):
    share = counts[frequent, e] / totals[frequent]
    order = np.lexsort((-counts[frequent, e], -share))[:n]
    out.append([(int(frequent[i]), int(counts[frequent[i], e]), float(share[i]))
                for i in order if counts[frequent[i], e] > 0])
  return out


def _neighbour_pairs(valid_BL, segment_ids_BL):
  valid_BL = np.asarray(valid_BL, bool)
  pair = valid_BL[:, 1:] & valid_BL[:, :-1]
  if segment_ids_BL is not None:
    segment_ids_BL = np.asarray(segment_ids_BL)
    pair &= segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]
  return pair


def consecutive_same_expert(experts_BL: np.ndarray, mask_BL: np.ndarray,
                            segment_ids_BL: np.ndarray | None = None) -> tuple[float, float]:
  """(rate at which neighbours in one document share the top-1 expert, chance = sum load^2)."""
  experts_BL, mask_BL = np.asarray(experts_BL), np.asarray(mask_BL, bool)
  pair = _neighbour_pairs(mask_BL, segment_ids_BL)
  if not pair.any():
    return 0.0, 0.0
  same = (experts_BL[:, 1:] == experts_BL[:, :-1])[pair]
  load = np.bincount(experts_BL[mask_BL]) / mask_BL.sum()
  return float(same.mean()), float(np.sum(load**2))


def consecutive_sharing(topk_BLK: np.ndarray, valid_BL: np.ndarray, segment_ids_BL: np.ndarray,
                        domain_BL: np.ndarray | None = None, *, seed: int = 0
                        ) -> dict[str, dict[str, float]]:
  """Mixtral Table 5 for one layer: how often token t+1 of the same document has the same first
  choice as token t (`first`), or shares any of its top-k experts (`any`), with chance: the same
  rates for token t paired with a random real token instead. Keys: `all` (chance: any real token,
  Mixtral's) and each domain id present in `domain_BL` (pairs counted under token t's domain;
  chance: a random token *of that domain*, so that an expert owning a domain does not count as
  neighbours sharing it)."""
  topk_BLK = np.asarray(topk_BLK)
  valid_BL = np.asarray(valid_BL, bool)
  pair_BL = _neighbour_pairs(valid_BL, segment_ids_BL)
  # The pairs, as their tokens t (a token with a neighbour t+1), and every real token.
  left_UK, right_UK = topk_BLK[:, :-1][pair_BL], topk_BLK[:, 1:][pair_BL]
  real_UK = topk_BLK[valid_BL]
  rng = np.random.default_rng(seed)

  def random_partners(sel_U, pool_U):
    """A random token of `pool_U` (indices into real_UK) for each pair in `sel_U`."""
    return real_UK[pool_U[rng.integers(0, len(pool_U), int(sel_U.sum()))]]

  def rates(a_UK, b_UK):
    first = a_UK[:, 0] == b_UK[:, 0]
    any_ = (a_UK[:, :, None] == b_UK[:, None, :]).any((1, 2))
    return first, any_

  first, any_ = rates(left_UK, right_UK)
  groups = {"all": (np.ones(len(left_UK), bool), np.arange(len(real_UK)))}
  if domain_BL is not None:
    left_domain_U = np.asarray(domain_BL)[:, :-1][pair_BL]
    domain_U = np.asarray(domain_BL)[valid_BL]
    groups.update({int(d): (left_domain_U == d, np.flatnonzero(domain_U == d))
                   for d in np.unique(left_domain_U) if d >= 0})
  out = {}
  for name, (sel, pool) in groups.items():
    if sel.any():
      first_chance, any_chance = rates(left_UK[sel], random_partners(sel, pool))
      out[name] = {"pairs": int(sel.sum()), "first": float(first[sel].mean()),
                   "first_chance": float(first_chance.mean()),
                   "any": float(any_[sel].mean()), "any_chance": float(any_chance.mean())}
  return out


def drop_rates(kept_BLK: np.ndarray, valid_BL: np.ndarray, positions_BL: np.ndarray,
               domain_BL: np.ndarray | None = None, *, wanted_BLK: np.ndarray | None = None,
               num_buckets: int = 8, max_position: int | None = None) -> dict:
  """Fraction of the routing choices of real tokens that wanted a slot and found none:
  overall, per position bucket (`num_buckets` equal ranges of [0, max_position); None where a
  bucket is empty), and per domain id. `wanted_BLK` (default: every choice) leaves out the
  choices a second-expert policy removed."""
  kept_BLK, valid_BL = np.asarray(kept_BLK, bool), np.asarray(valid_BL, bool)
  positions_BL = np.asarray(positions_BL)
  wanted_BLK = np.ones_like(kept_BLK) if wanted_BLK is None else np.asarray(wanted_BLK, bool)
  lost_UK = (wanted_BLK & ~kept_BLK)[valid_BL]
  dropped_U = lost_UK.sum(-1) / np.maximum(wanted_BLK[valid_BL].sum(-1), 1)  # per token
  max_position = max_position or int(positions_BL.max()) + 1
  bucket_U = np.minimum(positions_BL[valid_BL] * num_buckets // max_position, num_buckets - 1)
  by_bucket = [float(dropped_U[bucket_U == b].mean()) if (bucket_U == b).any() else None
               for b in range(num_buckets)]
  out = {"all": float(dropped_U.mean()) if len(dropped_U) else 0.0, "by_position": by_bucket,
         "bucket_edges": [b * max_position // num_buckets for b in range(num_buckets + 1)]}
  if domain_BL is not None:
    domain_U = np.asarray(domain_BL)[valid_BL]
    out["by_domain"] = {int(d): float(dropped_U[domain_U == d].mean())
                        for d in np.unique(domain_U) if d >= 0}
  return out


def agreement_with_final(experts_by_step: dict[int, np.ndarray]) -> dict[int, float]:
  """For each step, the fraction of tokens whose top-1 expert equals the last step's."""
  final = experts_by_step[max(experts_by_step)]
  return {step: float(np.mean(np.asarray(e) == final)) for step, e in sorted(
      experts_by_step.items())}


def router_dtype_disagreement(x_BLD, w_DE, valid_BL) -> float:
  """Fraction of real tokens whose top-1 expert differs between a float32 router and a bfloat16
  router (matmul, softmax and top-1 all in bfloat16) on the same inputs (Switch Table 2)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moejax import routing  # pylint: disable=import-outside-toplevel
  top1 = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    probs_BLE = jax.nn.softmax(routing.router_logits(x_BLD, w_DE, dtype=dtype), axis=-1)
    top1[dtype] = jnp.argmax(probs_BLE, axis=-1)
  valid = np.asarray(valid_BL, bool)
  differ = np.asarray(top1[jnp.float32] != top1[jnp.bfloat16])
  return float(differ[valid].mean()) if valid.any() else 0.0


def trace_steps(trace_dir: str) -> list[int]:
  """The steps of the `step_<N>.npz` routing traces in `trace_dir`, sorted ([] when there are
  none or the folder does not exist)."""
  import os  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(trace_dir):
    return []
  return sorted(int(m.group(1)) for m in (re.fullmatch(r"step_(\d+)\.npz", name)
                                           for name in os.listdir(trace_dir)) if m)


def read_routing_traces(trace_dir: str) -> dict[int, dict[str, np.ndarray]]:
  """`{step: {"mask": [B, L] bool, "layer<i>": [B, L, K] experts}}` from the `step_<N>.npz`
  files a run with `config.routing_trace_every` wrote to `workdir/routing` (sorted by step)."""
  import os  # pylint: disable=import-outside-toplevel
  traces = {}
  for step in trace_steps(trace_dir):
    with np.load(os.path.join(trace_dir, f"step_{step}.npz")) as z:
      traces[step] = {k: z[k] for k in z.files}
  if not traces:
    raise FileNotFoundError(f"{trace_dir}: no step_<N>.npz routing traces (train with "
                            "--config.routing_trace_every=N)")
  return dict(sorted(traces.items()))


def routes_changed(before_BLK: np.ndarray, after_BLK: np.ndarray, mask_BL: np.ndarray) -> float:
  """The fraction of real tokens (`mask_BL`) whose set of experts differs between two traces of
  the same tokens (the order of a token's k choices does not count)."""
  changed_BL = (np.sort(before_BLK, -1) != np.sort(after_BLK, -1)).any(-1)
  return float(changed_BL[mask_BL.astype(bool)].mean())


def routing_stability(traces: dict[int, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
  """Per MoE layer, over consecutive traces of the same tokens: `steps` (the later step of each
  pair), `changed` (the fraction of real tokens whose set of experts changed since the previous
  trace; top-1 and any-of-k alike for k = 1) and `top1_changed` (first choice only), and
  `final_agreement` (the fraction whose first choice equals the last trace's)."""
  steps = list(traces)
  last = traces[steps[-1]]
  mask = last["mask"].astype(bool)
  out = {}
  for layer in sorted((k for k in last if k.startswith("layer")), key=lambda k: int(k[5:])):
    rec = {"steps": [], "changed": [], "top1_changed": [], "final_agreement": []}
    for prev, cur in zip(steps, steps[1:]):
      rec["steps"].append(cur)
      rec["changed"].append(routes_changed(traces[prev][layer], traces[cur][layer], mask))
      rec["top1_changed"].append(float(
          (traces[prev][layer][..., 0] != traces[cur][layer][..., 0])[mask].mean()))
    rec["final_agreement"] = [float((traces[s][layer][..., 0] == last[layer][..., 0])[mask].mean())
                              for s in steps]
    rec["trace_steps"] = steps
    out[layer] = rec
  return out
