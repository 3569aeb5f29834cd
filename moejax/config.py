"""Config files and dotted overrides: loading `configs/*.py[:arg]`, and one walker over dotted keys.

A config is an `ml_collections.ConfigDict` returned by a config file's `get_config(arg)`. Every
command (the trainer, the evaluator, the study runner) loads files and applies overrides through
this module, so a misspelled field gets the same message everywhere: the dotted name the user
wrote, the field that is missing, and the fields that exist.

`data_overrides` turns a `--data` string ('builtin', a TFDS name, or text files) into the dotted
`data.*` overrides it stands for. `validate_config` checks a whole config before anything is
built: every ValueError names the field as the user writes it (`config.model.moe.top_k=3`), the
value and what is allowed (the model dataclasses check their own fields; their errors are
re-owned here, not re-worded).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from moejax.model import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(path: str):
  """Imports a config file with the repository root on sys.path (configs import configs.common)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(
      "moejax_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str):
  """The ConfigDict of `path[:arg]` (e.g. 'configs/switch.py:experts=8')."""
  path, _, arg = spec.partition(":")
  return load_config_module(path).get_config(arg or None)


def lookup(config, key: str, prefix: str = "config"):
  """(parent node, leaf name) of dotted `key`. A KeyError's message names the first missing field,
  the closest existing one or the fields there (`prefix` is how it spells the root)."""
  *parents, leaf = key.split(".")
  node = config
  for depth, part in enumerate([*parents, leaf]):
    if not hasattr(node, "keys") or part not in node:
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      where = ".".join([prefix, *key.split(".")[:depth]])
      close = difflib.get_close_matches(part, fields, n=1)
      raise KeyError(f"{where} has no field {part!r}"
                     + (f"; did you mean {where}.{close[0]}?" if close else f"; fields: {fields}"))
    if depth < len(parents):
      node = node[part]
  return node, leaf


def apply_overrides(config, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys in order; a callable value is called with the config first."""
  for key, value in overrides.items():
    value = value(config) if callable(value) else value
    try:
      node, leaf = lookup(config, key)
    except KeyError as e:
      raise KeyError(f"override {key!r}: {e.args[0]}") from None
    node[leaf] = value


def data_overrides(data: str, tokenizer: str = "byte") -> dict[str, Any]:
  """`--data`: 'builtin', a TFDS name ('lm1b', 'wiki40b/en'), or comma-separated text files
  (made absolute: a run's saved config reads the same files from any working directory)."""
  out: dict[str, Any] = {"data.tokenizer": tokenizer}
  if data == "builtin":
    out["data.source"] = "builtin"
  elif any(p.endswith(".txt") or os.path.exists(p) or "*" in p for p in data.split(",")):
    missing = [p for p in data.split(",") if "*" not in p and not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"--data: text files {missing} do not exist")
    out["data.source"] = "text_files"
    out["data.text_files.paths"] = ",".join(os.path.abspath(p) if "*" not in p else p
                                            for p in data.split(","))
  else:
    out.update({"data.source": "tfds", "data.tfds.name": data})
  return out


# --------------------------------------------------------------------------------------------------
# Validation of a whole config (the trainer's, the study runner's and the command line's).
# --------------------------------------------------------------------------------------------------

# `model.vocab_size=0`: the tokenizer's vocabulary rounded up to a multiple of this.
VOCAB_MULTIPLE = 128


def validate_config(config, num_devices: int | None = None) -> TransformerConfig:
  """Checks every field before anything is compiled; ValueError names field, value, allowed.
  Returns the model's `TransformerConfig` (vocab_size resolved)."""
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moejax import optim, sharding  # pylint: disable=import-outside-toplevel
  from moejax.model import TransformerConfig  # pylint: disable=import-outside-toplevel
  from moejax.moe_config import (  # pylint: disable=import-outside-toplevel
      FieldError, is_int, is_real)
  def fail(field, allowed):
    node, leaf = lookup(config, field)
    raise ValueError(f"config.{field}={node[leaf]!r}: allowed values are {allowed}.")

  # Token ids at or above the embedding size would read NaN rows (jnp.take fills out of range).
  if config.data.tokenizer == "sentencepiece" and not config.data.sentencepiece.model_path:
    tokenizer_vocab = config.data.sentencepiece.vocab_size  # trained later, to this size
  else:
    tokenizer_vocab = data_lib.get_tokenizer(config.data).vocab_size
  if config.data.source == "text_files":  # Missing files or empty globs fail now, not later.
    from moejax.data import sources  # pylint: disable=import-outside-toplevel
    sources.expand_paths(config.data.text_files.paths)
  model_fields = config.model.to_dict()
  if model_fields["vocab_size"] == 0:  # Follow the tokenizer, padded to a multiple of 128.
    model_fields["vocab_size"] = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  model_cfg = TransformerConfig(**model_fields)
  for field in ("seq_len", "batch_size", "grad_accum_steps", "num_train_steps", "log_every",
                "eval_every", "eval_steps", "checkpoint_every", "keep_checkpoints"):
    if not is_int(config[field]) or config[field] < 1:
      fail(field, "positive integers")
  for cf in config.get("eval_capacity_factors", ()):
    if not (is_real(cf) and cf > 0):
      fail("eval_capacity_factors", "tuples of numbers > 0 (inf = no drop)")
  if config.optim.name not in optim.OPTIMIZERS:
    fail("optim.name", optim.OPTIMIZERS)
  if config.optim.schedule not in optim.SCHEDULES:
    fail("optim.schedule", optim.SCHEDULES)
  if not config.optim.learning_rate > 0:
    fail("optim.learning_rate", "numbers > 0")
  if not 0 <= config.optim.warmup_steps:
    fail("optim.warmup_steps", "integers >= 0")
  if not 0 <= config.optim.end_lr_fraction <= 1:
    fail("optim.end_lr_fraction", "numbers in [0, 1]")
  if config.optim.grad_clip_norm < 0:
    fail("optim.grad_clip_norm", "numbers >= 0 (0 = no clipping)")
  if config.optim.weight_decay < 0:
    fail("optim.weight_decay", "numbers >= 0")
  for beta in ("b1", "b2"):
    if not 0 <= config.optim[beta] < 1:
      fail(f"optim.{beta}", "numbers in [0, 1)")
  if model_cfg.vocab_size < tokenizer_vocab:
    fail("model.vocab_size", f"0 (follow the tokenizer) or at least the tokenizer's vocabulary, "
         f"{tokenizer_vocab} (data.tokenizer={config.data.tokenizer!r})")
  trace_every = config.get("routing_trace_every", 0)
  if not is_int(trace_every) or trace_every < 0:
    fail("routing_trace_every", "integers >= 0 (0 = no routing traces)")
  if (trace_every and model_cfg.moe_layer_indices
      and model_cfg.moe_config().choice == "expert"):
    fail("routing_trace_every", "0 with model.moe.choice='expert' (traces record the experts "
         "each token chose; under expert choice the experts choose)")
  if config.batch_size % config.grad_accum_steps:
    fail("grad_accum_steps", f"divisors of batch_size={config.batch_size}")
  mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh),
                                           num_devices or jax.device_count())
  shards = sharding.num_batch_shards(mesh_shape)
  micro_batch = config.batch_size // config.grad_accum_steps
  if micro_batch % shards:
    fail("batch_size", f"multiples of grad_accum_steps x data x fsdp x expert = "
         f"{config.grad_accum_steps} x {shards} (mesh {mesh_shape})")
  _check_layout(model_cfg, mesh_shape, fail)
  if model_cfg.moe_layer_indices:
    moe = model_cfg.moe_config()
    if moe.router != "learned" and not config.get("benchmark", False):
      fail("model.moe.router", "'learned' for training; 'balanced' and 'random' force the "
           "experts for throughput benchmarks only (set config.benchmark=True)")
    try:
      group_size = moe.group_size_for(micro_batch, config.seq_len)
    except FieldError as e:
      raise e.under("config.model.moe") from None
    groups = micro_batch * config.seq_len // group_size
    problem = sharding.moe_layout_problem(moe.num_experts, groups, mesh_shape)
    if problem and problem[0].startswith("num_experts"):
      fail("model.moe.num_experts", f"multiples of mesh.expert={mesh_shape[sharding.EXPERT]}")
    if problem:
      fail("model.moe.group_size", f"sizes giving a number of routing groups per micro-batch "
           f"({groups} now) divisible by data x fsdp x expert = {shards}")
  return model_cfg


def _check_layout(model_cfg: TransformerConfig, mesh_shape: dict[str, int], fail) -> None:
  """Every parameter dimension that `sharding.LOGICAL_AXIS_RULES` splits over `fsdp` or `model`
  must divide by that axis: checked here, by config field, before anything is built."""
  from moejax import sharding  # pylint: disable=import-outside-toplevel
  fsdp, tp = mesh_shape[sharding.FSDP], mesh_shape[sharding.MODEL]
  checks = [("model.d_model", model_cfg.d_model, "fsdp", fsdp),  # `embed`
            ("model.num_heads", model_cfg.num_heads, "model", tp),
            ("model.num_kv_heads", model_cfg.kv_heads, "model", tp),
            ("model.vocab_size", model_cfg.vocab_size, "model", tp)]
  if len(model_cfg.moe_layer_indices) < model_cfg.num_layers:
    checks.append(("model.d_ff", model_cfg.d_ff, "model", tp))
  if model_cfg.moe_layer_indices:
    moe = model_cfg.moe_config()
    checks.append(("model.moe.d_ff", moe.d_ff, "model", tp))
    if moe.num_shared_experts:
      checks.append(("model.moe.shared_d_ff",
                     moe.num_shared_experts * (moe.shared_d_ff or moe.d_ff), "model", tp))
  for field, size, axis, ways in checks:
    if size % ways:
      what = (f"a value that, times num_shared_experts, is a multiple of mesh.{axis}={ways}"
              if field.endswith("shared_d_ff") else f"multiples of mesh.{axis}={ways}")
      if field == "model.vocab_size":
        what += " or 0 (the tokenizer's, rounded up to a multiple of 128)"
      fail(field, f"{what} (mesh.{axis} splits it: sharding.LOGICAL_AXIS_RULES); "
           f"now {size}")
