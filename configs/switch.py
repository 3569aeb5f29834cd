"""Switch Transformer (Fedus et al. 2021): top-1 routing, MoE in every other FFN layer.

    python -m moejax.main --config=configs/switch.py --workdir=/tmp/moejax_switch
    python -m moejax.main --config=configs/switch.py:experts=16 --workdir=/tmp/moejax_switch16
    python -m moejax.main --config=configs/switch.py:runlocal --workdir=/tmp/moejax_switch_local

The dense.py model with layers 1 and 3 replaced by E experts of the same width F=512 (so FLOPs per
token match dense.py): raw softmax-probability gate, capacity factor 1.25 (eval 2.0, plus a no-drop
eval), position priority, Switch load-balance loss alpha=1e-2, router input jitter 1e-2, router
init scale 0.1, float32 router (selective precision).

Claim to check (Switch Table 1 at toy scale): at equal FLOPs, top-1 MoE reaches a lower eval loss
than dense.py.
Expected on a 2-core CPU (1 device), measured: ~3-5 min (~9k tokens/s); eval CE 1.268 (step 200),
1.100 (400), 1.020 (600), no-drop the same to 1e-3. At this toy budget (1.2M tokens) it does not
yet beat dense.py (0.998): see docs/training.md.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, experts=8)
  c = common.base_config()
  c.model.moe_every = 2
  c.model.moe.update(num_experts=arg.experts, top_k=1, d_ff=c.model.d_ff, activation="relu",
                     gate="softmax", capacity_factor=1.25, eval_capacity_factor=2.0,
                     balance_loss_weight=1e-2, z_loss_weight=0.0, router_jitter=1e-2,
                     router_init_scale=0.1)
  if arg.runlocal:
    c = common.shrink_for_local(c)
  return c


def sweep():
  """Capacity-factor sweep of Switch Table 1 (train CF; eval CF stays 2.0 plus no-drop)."""
  return [{"model.moe.capacity_factor": cf} for cf in (1.0, 1.25, 2.0)]
