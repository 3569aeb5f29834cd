"""GShard (Lepikhin et al. 2020): top-2 routing with random second-expert dispatch.

    python -m moejax.main --config=configs/gshard.py --workdir=/tmp/moejax_gshard
    python -m moejax.main --config=configs/gshard.py:runlocal --workdir=/tmp/moejax_gshard_local

The dense.py model with layers 1 and 3 replaced by E=8 experts. Top-2 with experts of width
F/2=256, so active FFN FLOPs per token match dense.py. GShard gates (g1, g2 normalised over the two
selected), second expert used with probability 2*g2 in training (all in eval), capacity factor 1.25
(C = ceil(2 * 1.25 * S / E)), eval 2.0, GShard-form balance loss with weight 1e-2 * E^2 (its
uniform value is 1/E^2, so this equals Switch alpha=1e-2).

Expected on a 2-core CPU (1 device), measured: ~2.5 min (~13k tokens/s); eval CE 1.243 (step 200),
1.071 (400), 1.008 (600), no-drop the same to 1e-3 (dense.py: 0.998).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, experts=8)
  c = common.base_config()
  c.model.moe_every = 2
  c.model.moe.update(num_experts=arg.experts, top_k=2, d_ff=c.model.d_ff // 2,
                     activation="relu", gate="gshard", second_expert_policy="random",
                     capacity_factor=1.25, eval_capacity_factor=2.0, balance_loss_weight=0.0,
                     gshard_loss_weight=1e-2 * arg.experts ** 2, z_loss_weight=0.0)
  if arg.runlocal:
    c = common.shrink_for_local(c)
  return c
