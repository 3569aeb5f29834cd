"""A ~1B-active-parameter MoE for accelerator throughput checks (experiments/device_check.sh).

    python experiments/bench_train.py --config=configs/gpu_1b.py --steps=10
    python experiments/bench_train.py --config=configs/gpu_1b.py:dropless --steps=10

D=2048, 20 layers, 16 heads (head dim 128), SwiGLU; every other layer MoE with 8 experts, top-2,
expert width 2752 (half the dense width 5504, so a token's active FFN FLOPs match a dense layer's),
GShard gates, CF 1.25 (`:dropless`: grouped matmuls, no capacity). bfloat16 activations, float32
parameters and AdamW moments, sequence 2048, batch 8. Parameters: about 1.0B active per token,
2.0B total (`count_params`); state (params + moments + gradients) about 32 GB: one 80 GB GPU.

Not a model to train on a CPU (one step would take minutes); `:runlocal` shrinks it to a smoke
test of the same structure.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, dropless=False)
  c = common.base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.d_ff = 2048, 20, 16, 5504
  m.activation = "swiglu"
  m.dtype = "bfloat16"
  m.moe_every = 2
  m.moe.update(num_experts=8, top_k=2, d_ff=2752, activation="swiglu", gate="gshard",
               balance_loss_weight=1e-2, z_loss_weight=1e-3)
  if arg.dropless:
    m.moe.dispatch = "dropless"
  c.seq_len, c.batch_size, c.num_train_steps = 2048, 8, 1000
  if arg.runlocal:
    c = common.shrink_for_local(c)
  return c
