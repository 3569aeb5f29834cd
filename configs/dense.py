"""Dense baseline of the Switch / GShard / ST-MoE family (T5-style FFN, ReLU, F = 4D).

    python -m moejax.main --config=configs/dense.py --workdir=/tmp/moejax_dense
    python -m moejax.main --config=configs/dense.py:runlocal --workdir=/tmp/moejax_dense_local

D=128, 4 layers, 4 heads, F=512, seq 128, batch 16, AdamW 3e-3 cosine, 600 steps on the built-in
corpus. The MoE configs (switch.py, gshard.py, stmoe.py) keep everything else identical and are
FLOP-matched to this model (same active FFN FLOPs per token; only the router is extra).

Expected on a 2-core CPU (1 device), measured: ~4 min (~13k tokens/s); eval CE 1.256 (step
200), 1.070 (400), 0.998 nats/byte (600).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  c = common.base_config()
  if arg.runlocal:
    c = common.shrink_for_local(c)
  return c


def sweep():
  """Learning-rate sweep (a list of overrides; run each with --config.<key>=<value>)."""
  return [{"optim.learning_rate": lr} for lr in (1e-3, 3e-3, 1e-2)]
