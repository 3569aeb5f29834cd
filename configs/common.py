"""Shared defaults for every config in `configs/`, and big_vision-style `arg` parsing.

A config file does

    from configs import common
    def get_config(arg=None):
      arg = common.parse_arg(arg, runlocal=False, experts=8)
      config = common.base_config()
      ...

so `--config=configs/switch.py:runlocal,experts=16` works, and `--config.optim.learning_rate=3e-4`
overrides any field afterwards (the config is locked by `config_flags`: a typo is an error).
Config files are loaded from the repository root (`python -m moejax.main` puts it on sys.path).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from moejax.data.config import default_data_config
from moejax.moe import MoEConfig

# MoEConfig fields whose default is None: give them a typed placeholder so that
# `--config.model.moe.group_size=64` parses (ConfigDict cannot infer a type from None).
_MOE_PLACEHOLDERS = {"expert_capacity": int, "group_size": int, "num_groups": int,
                     "shared_d_ff": int, "receive_buffer_factor": float}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,experts=16' -> ConfigDict(runlocal=True, experts=16, ...) typed by `defaults`.

  A bare name sets a boolean to True; `name=value` is converted to the type of its default.
  Unknown names raise ValueError listing the allowed ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"config arg {name!r}: allowed names are {sorted(defaults)}.")
    kind = type(defaults[name])
    if kind is bool:
      parsed = value.lower() in ("", "1", "true", "yes")
    else:
      parsed = kind(value)
    out[name] = parsed
  return out


def moe_config_dict(**overrides) -> ml_collections.ConfigDict:
  """Every MoEConfig field with its default (so every knob can be overridden on the CLI)."""
  c = ml_collections.ConfigDict()
  for field in dataclasses.fields(MoEConfig):
    if field.name in _MOE_PLACEHOLDERS:
      c[field.name] = config_dict.placeholder(_MOE_PLACEHOLDERS[field.name])
    else:
      c[field.name] = field.default
  c.update(overrides)
  return c


def base_config() -> ml_collections.ConfigDict:
  """The defaults every experiment starts from (a small dense LM on the built-in corpus)."""
  c = ml_collections.ConfigDict()
  # Seed for params, routing noise and data order. Same seed + same device count = same run.
  c.seed = 0
  # A throughput benchmark, not a model: allows model.moe.router='balanced' / 'random' (experts
  # forced without the learned router), which training refuses otherwise.
  c.benchmark = False
  # Mesh axis sizes; -1 = the rest of the devices (moejax/sharding.py): `data` replicates the
  # parameters, `fsdp` shards them and their optimizer state (ZeRO-3), `expert` shards the
  # experts (all_to_all), `model` splits heads, MLP / expert width and vocabulary (tensor
  # parallelism). The batch is split over data x fsdp x expert.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "model": 1})

  c.model = m = ml_collections.ConfigDict()
  # Vocabulary size: >= the tokenizer's (byte tokenizer: 259), or 0 = the tokenizer's rounded up to
  # a multiple of 128 (e.g. for SentencePiece: --config.data.tokenizer=sentencepiece
  # --config.model.vocab_size=0).
  m.vocab_size = 259
  # Model width D.
  m.d_model = 128
  # Number of transformer blocks.
  m.num_layers = 4
  # Query heads H.
  m.num_heads = 4
  # Key/value heads N (0 = H: multi-head; smaller: grouped-query attention).
  m.num_kv_heads = 0
  # Head dim (0 = d_model // num_heads).
  m.head_dim = 0
  # Dense MLP width F.
  m.d_ff = 512
  # Dense MLP activation: swiglu | geglu | gelu | relu.
  m.activation = "relu"
  # Share the input embedding with the LM head.
  m.tie_embeddings = True
  # MoE placement: 0 = dense, 1 = every layer, 2 = every other layer (Switch / GShard), ...
  m.moe_every = 0
  # Explicit MoE layer indices (overrides moe_every), e.g. (1, 3).
  m.moe_layers = ()
  # Activation dtype: float32 | bfloat16 (params stay in param_dtype; the router in float32).
  m.dtype = "float32"
  # Parameter dtype.
  m.param_dtype = "float32"
  # RoPE base.
  m.rope_theta = 10_000.0
  # RMSNorm epsilon.
  m.norm_eps = 1e-6
  # Attention kernel: 'einsum' (explicit softmax) or 'dot_product' (jax.nn.dot_product_attention:
  # XLA here, cuDNN on GPUs where the mask allows; same numbers to float tolerance).
  m.attention = "einsum"
  # Rematerialisation of each block in the backward pass (moejax.model.REMATS): 'none' keeps every
  # activation; 'full' keeps only block inputs (least memory, one more forward of compute);
  # 'dots' / 'dots_no_batch' keep matmul outputs and recompute the cheap elementwise rest.
  m.remat = "none"
  # Scan over the layers (weights stacked per repeating unit: moe_every blocks) instead of an
  # unrolled loop: compile time independent of depth; the same numbers as unrolled. Checkpoints
  # of one layout do not load into the other (a clear error says so).
  m.scan_layers = False
  # The MoE layer (moejax.moe.MoEConfig); used only when some layer is MoE.
  m.moe = moe_config_dict()

  # Input pipeline (moejax.data): built-in synthetic multi-domain corpus, byte tokenizer.
  c.data = default_data_config()
  c.data.builtin.num_docs = 4000
  # Tokens per training sequence L.
  c.seq_len = 128
  # Global batch size B (sequences per optimizer step, over all devices).
  c.batch_size = 16
  # Split each batch into this many micro-batches and sum their gradients (same result, less
  # memory).
  c.grad_accum_steps = 1
  # Optimizer steps.
  c.num_train_steps = 600

  c.optim = o = ml_collections.ConfigDict()
  # adafactor (T5 / Switch) | adamw.
  o.name = "adamw"
  # Peak learning rate.
  o.learning_rate = 3e-3
  # Linear warmup steps.
  o.warmup_steps = 60
  # Decay after warmup: rsqrt | cosine | constant.
  o.schedule = "cosine"
  # Cosine decays to learning_rate * end_lr_fraction.
  o.end_lr_fraction = 0.1
  # AdamW betas.
  o.b1 = 0.9
  o.b2 = 0.95
  # Decoupled weight decay (AdamW: matrices only; Adafactor: all).
  o.weight_decay = 0.0
  # Clip gradients to this global L2 norm (0 = off).
  o.grad_clip_norm = 1.0

  # Console / TensorBoard / JSONL every this many steps.
  c.log_every = 20
  # Evaluate every this many steps (and at the end).
  c.eval_every = 200
  # Batches per evaluation (the same batches each time: the eval iterator restarts).
  c.eval_steps = 8
  # Also evaluate with capacity factor = inf (no token dropped): the number to compare runs by.
  c.eval_no_drop = True
  # At the last step, also evaluate at each of these capacity factors, logged as `cf{x}/ce` etc.
  # (the eval-capacity curve of ST-MoE Table 8), e.g. (0.5, 1.0, 2.0, float("inf")).
  c.eval_capacity_factors = ()
  # Every this many steps (and at the end), write each MoE layer's experts for every token of
  # the first eval batch (no-drop, eval mode) to workdir/routing/step_<N>.npz; 0 = never.
  # `experiments/routing_analysis.py --traces=WORKDIR/routing` plots how routing settles.
  c.routing_trace_every = 0
  # Save a checkpoint every this many steps (and at the end).
  c.checkpoint_every = 200
  # Keep the last N checkpoints.
  c.keep_checkpoints = 3
  # Save asynchronously (training continues while orbax writes).
  c.async_checkpoint = True
  return c


def shrink_for_local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`runlocal`: the same experiment at smoke-test size (well under a minute on a 2-core CPU)."""
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 2
  c.model.d_ff = 64
  c.model.moe.d_ff = max(64 // c.model.moe.top_k, 1)
  c.seq_len, c.batch_size, c.num_train_steps = 32, 8, 20
  c.optim.warmup_steps = 5
  c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 5, 10, 2, 10
  c.data.builtin.num_docs, c.data.builtin.num_eval_docs = 500, 50
  return c
