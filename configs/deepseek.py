"""DeepSeek-MoE / DeepSeek-V3 routing at toy scale: fine-grained and shared experts, sigmoid
scores, auxiliary-loss-free balancing, group-limited routing.

    python -m moejax.main --config=configs/deepseek.py --workdir=/tmp/moejax_deepseek
    python -m moejax.main --config=configs/deepseek.py:runlocal --workdir=/tmp/moejax_ds_local

The dense.py model with layers 1 and 3 replaced by fine-grained experts: 32 routed experts of
width F/4 (4x the experts of switch.py at 1/4 the width), top-3 of them plus 1 always-on shared
expert of width F/4, so the active FFN width is 3 F/4 + F/4 = F and the FLOPs per token match
dense.py and switch.py (the router, D x 32, is the only extra). Routing as DeepSeek-V3: sigmoid
scores, gates normalised over the 3 selected experts (`gate="gshard"`) times
`routed_scaling_factor` 1.0 here (V3 uses 2.5 with 8 of 256 experts), 4 groups of 8 experts of
which each token may use 2, selection bias updated at rate 1e-3 per step (auxiliary-loss-free),
and the small sequence-wise balance loss (1e-4, `balance_loss_choices="all"`, one group per
sequence). Capacity factor 1.25 (V3 drops no tokens; eval also reports no-drop).

Not yet run on real text; `reproduce.py` can run it as an arm of any study.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, experts=32)
  c = common.base_config()
  c.model.moe_every = 2
  # Width F/4: top-3 routed + 1 shared expert = F active, whatever the number of experts.
  c.model.moe.update(num_experts=arg.experts, top_k=3, d_ff=c.model.d_ff // 4,
                     num_shared_experts=1, activation="relu",
                     choice="token", score="sigmoid", gate="gshard", routed_scaling_factor=1.0,
                     num_expert_groups=4, topk_groups=2, bias_update_rate=1e-3,
                     capacity_factor=1.25, eval_capacity_factor=2.0, balance_loss_weight=1e-4,
                     balance_loss_choices="all", z_loss_weight=0.0, router_init_scale=0.1)
  if arg.runlocal:
    c = common.shrink_for_local(c)
  return c
