"""What do experts specialise in? Routing statistics from recorded router choices (numpy).

OpenMoE and Mixtral found that experts specialise by *token identity* far more than by
topic/domain, and that consecutive tokens share an expert more often than chance. These
functions measure both on any labelled routing record:

- `mutual_information(counts_XY)`: I(X; Y) in bits from a contingency table.
- `routing_report(experts_N, tokens_N, domains_N)`: for one MoE layer's top-1 choices,
  `I(domain; expert) / H(expert)` (share of the routing entropy the domain explains),
  `I(token; expert) / H(expert)`, and `I(domain; expert | token) / H(expert)`: what the domain
  explains *beyond* token identity (zero if routing is a function of the token alone).
- `consecutive_same_expert(experts_BL, mask_BL)`: how often token t and t+1 of the same document
  share their top-1 expert, against chance `sum_e load_e^2`.

Record the choices with `MoELayer.record_routing = True` and `nnx.capture(f, nnx.Intermediate)`
(the layer then sows the router's top-k experts, before capacity, as `nnx.Intermediate`
"router_topk"); `experiments/routing_analysis.py` does this for a trained run.
"""

from __future__ import annotations

import numpy as np


def contingency(x_N: np.ndarray, y_N: np.ndarray, num_x: int, num_y: int) -> np.ndarray:
  """Counts `[num_x, num_y]` of the pairs (x_n, y_n)."""
  counts = np.zeros((num_x, num_y), np.float64)
  np.add.at(counts, (np.asarray(x_N, np.int64), np.asarray(y_N, np.int64)), 1.0)
  return counts


def entropy(p: np.ndarray) -> float:
  """Entropy in bits of a (possibly unnormalised) distribution."""
  p = np.asarray(p, np.float64).ravel()
  p = p[p > 0] / p.sum()
  return float(-np.sum(p * np.log2(p)))


def mutual_information(counts_XY: np.ndarray) -> float:
  """I(X; Y) in bits = H(X) + H(Y) - H(X, Y)."""
  counts_XY = np.asarray(counts_XY, np.float64)
  if counts_XY.sum() == 0:
    return 0.0
  return max(entropy(counts_XY.sum(1)) + entropy(counts_XY.sum(0)) - entropy(counts_XY), 0.0)


def conditional_mutual_information(x_N, y_N, z_N) -> float:
  """I(X; Y | Z) in bits = sum_z p(z) I(X; Y | Z = z)."""
  x_N, y_N, z_N = (np.asarray(a, np.int64) for a in (x_N, y_N, z_N))
  total, n = 0.0, len(z_N)
  for z in np.unique(z_N):
    sel = z_N == z
    xs, ys = x_N[sel], y_N[sel]
    total += sel.sum() / n * mutual_information(contingency(xs, ys, xs.max() + 1, ys.max() + 1))
  return total


def routing_report(experts_N: np.ndarray, tokens_N: np.ndarray, domains_N: np.ndarray,
                   num_experts: int) -> dict[str, float]:
  """Specialisation of one layer's top-1 choices over N real tokens (see module docstring)."""
  experts_N, tokens_N, domains_N = (np.asarray(a, np.int64) for a in (experts_N, tokens_N,
                                                                        domains_N))
  h_expert = entropy(np.bincount(experts_N, minlength=num_experts))
  scale = 1.0 / h_expert if h_expert > 0 else 0.0
  by_domain = contingency(domains_N, experts_N, domains_N.max() + 1, num_experts)
  by_token = contingency(tokens_N, experts_N, tokens_N.max() + 1, num_experts)
  return {
      "tokens": float(len(experts_N)),
      "expert_entropy_bits": h_expert,
      "domain_share": mutual_information(by_domain) * scale,
      "token_share": mutual_information(by_token) * scale,
      "domain_given_token_share":
          conditional_mutual_information(domains_N, experts_N, tokens_N) * scale,
  }


def consecutive_same_expert(experts_BL: np.ndarray, mask_BL: np.ndarray,
                            segment_ids_BL: np.ndarray | None = None) -> tuple[float, float]:
  """(rate at which neighbours in one document share the top-1 expert, chance = sum load^2)."""
  experts_BL, mask_BL = np.asarray(experts_BL), np.asarray(mask_BL, bool)
  pair = mask_BL[:, 1:] & mask_BL[:, :-1]
  if segment_ids_BL is not None:
    segment_ids_BL = np.asarray(segment_ids_BL)
    pair &= segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]
  if not pair.any():
    return 0.0, 0.0
  same = (experts_BL[:, 1:] == experts_BL[:, :-1])[pair]
  load = np.bincount(experts_BL[mask_BL]) / mask_BL.sum()
  return float(same.mean()), float(np.sum(load**2))


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
