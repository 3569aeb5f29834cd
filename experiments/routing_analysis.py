"""What did the experts of a trained run specialise in: domain, token identity, neighbours?

    python -m moejax.main --config=configs/tiny.py --workdir=/tmp/moejax_tiny
    python experiments/routing_analysis.py --config=configs/tiny.py --workdir=/tmp/moejax_tiny

Restores the latest checkpoint of WORKDIR (trained with the same --config), routes --batches
eval batches of the built-in corpus (which labels every token with its domain) and prints, per
MoE layer, for the router's top-1 choices (before capacity):

- `domain`: I(domain; expert) / H(expert) -- share of the routing entropy explained by the domain;
- `token`: I(token; expert) / H(expert) -- explained by the token's identity;
- `domain|token`: I(domain; expert | token) / H(expert) -- what the domain adds beyond the token
  (OpenMoE / Mixtral: small; experts specialise by token far more than by topic);
- `same next`: how often consecutive tokens of a document share the expert, vs `chance`
  (sum of squared loads; Mixtral layer 15: 24-28% vs 12.5%);
- the domain x expert table of the last MoE layer (rows: share of the domain's tokens per expert).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position  (config loading)

from moejax import analysis, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from moejax.moe import MoELayer  # pylint: disable=g-import-not-at-top,wrong-import-position


def record_routing(config, workdir: str, num_batches: int):
  """Top-1 choices per MoE layer over eval batches: ({layer: experts_BL}, batch arrays)."""
  from moejax import data as data_lib  # pylint: disable=import-outside-toplevel
  model, mesh, step = train.load_model(config, workdir)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, MoELayer):
      node.record_routing = True

  @nnx.jit
  def route(model, batch):
    forward = nnx.capture(lambda m: m(batch["inputs"], batch["positions"], batch["segment_ids"],
                                      batch["mask"]), nnx.Intermediate)
    _, sown = forward(model)
    return sown

  it = data_lib.make_pipeline(config.data, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, split=config.data.eval_split,
                              seed=0)
  experts, batches = {}, []
  with jax.set_mesh(mesh):
    for _ in range(num_batches):
      batch = next(it)
      sown = route(model, data_lib.make_global_batch({k: batch[k] for k in train.BATCH_KEYS},
                                                      mesh, config.batch_size))
      for path, var in nnx.to_flat_state(sown):
        if path[-1] != "router_topk":
          continue
        layer = next(int(p) for p in path if isinstance(p, int) or str(p).isdigit())
        topk_BLK = np.asarray(var.get_value()[0])
        experts.setdefault(layer, []).append(topk_BLK[..., 0])
      batches.append(batch)
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return {layer: np.concatenate(v) for layer, v in experts.items()}, stacked, step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:arg], as trained")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=8)
  args = parser.parse_args()
  path, _, arg = args.config.partition(":")
  config = sweep.load_config_module(path).get_config(arg or None)
  if config.data.source != "builtin":
    sys.exit("routing_analysis needs data.source='builtin' (it labels tokens with domains).")
  experts_by_layer, batch, step = record_routing(config, args.workdir, args.batches)
  num_experts = config.model.moe.num_experts
  mask = batch["inputs"] != 0  # real input tokens (padding id 0)
  print(f"# {args.workdir} step {step}: {int(mask.sum())} tokens, E={num_experts}, top-1 choices")
  print(f"{'layer':>5} {'H(expert)':>9} {'domain':>7} {'token':>7} {'domain|token':>12} "
        f"{'same next':>9} {'chance':>7}")
  for layer, experts_BL in sorted(experts_by_layer.items()):
    report = analysis.routing_report(experts_BL[mask], batch["inputs"][mask],
                                     np.maximum(batch["domain"][mask], 0), num_experts)
    same, chance = analysis.consecutive_same_expert(experts_BL, mask, batch["segment_ids"])
    print(f"{layer:>5} {report['expert_entropy_bits']:>9.2f} {report['domain_share']:>7.3f} "
          f"{report['token_share']:>7.3f} {report['domain_given_token_share']:>12.3f} "
          f"{same:>9.3f} {chance:>7.3f}")
  last = max(experts_by_layer)
  domains = np.maximum(batch["domain"][mask], 0)
  table = analysis.contingency(domains, experts_by_layer[last][mask], domains.max() + 1,
                               num_experts)
  table /= np.maximum(table.sum(1, keepdims=True), 1)
  from moejax.data import builtin  # pylint: disable=import-outside-toplevel
  print(f"\nlayer {last}: share of each domain's tokens routed to each expert")
  print(f"{'domain':>8} " + " ".join(f"{e:>5}" for e in range(num_experts)))
  for d, row in enumerate(table):
    name = builtin.DOMAIN_NAMES[d] if d < len(builtin.DOMAIN_NAMES) else str(d)
    print(f"{name:>8} " + " ".join(f"{v:>5.2f}" for v in row))


if __name__ == "__main__":
  main()
