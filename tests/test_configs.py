"""Configs: every file loads and validates; bad values fail up front naming field and value."""

import glob
import importlib
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs` is a top-level package of the repository.

from moejax.model import count_params  # noqa: E402
from moejax.train import validate_config  # noqa: E402

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))


def _get(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_validates(name, arg):
  config = _get(name, arg)
  validate_config(config, num_devices=8)
  assert config.data.source == "builtin" and config.model.vocab_size >= 259


def test_family_is_flop_matched():
  flops = {n: count_params(validate_config(_get(n), 1), _get(n).seq_len).flops_per_token
           for n in ("dense", "switch", "gshard", "stmoe", "deepseek")}
  for name in ("switch", "gshard", "stmoe", "deepseek"):  # Only the router's D x E is extra.
    assert flops[name] == pytest.approx(flops["dense"], rel=0.01), flops


def test_arg_parsing_is_typed_and_strict():
  assert _get("switch", "experts=16").model.moe.num_experts == 16
  with pytest.raises(ValueError, match="allowed names"):
    _get("switch", "expert=16")


@pytest.mark.parametrize("field, value, message", [
    ("optim.name", "adam",
     r"config.optim.name='adam': allowed values are \('adafactor', 'adamw'\)"),
    ("optim.schedule", "linear", "config.optim.schedule='linear'"),
    ("model.num_kv_heads", 3, "config.model.num_kv_heads=3"),
    ("model.moe.top_k", 9, "config.model.moe.top_k=9"),
    ("model.moe.gate", "top", "config.model.moe.gate='top'"),
    ("batch_size", 12, "config.batch_size=12: allowed values are multiples of"),
    ("grad_accum_steps", 3, "config.grad_accum_steps=3"),
    ("model.moe.num_experts", 6, "config.model.moe.num_experts=6"),
    ("num_train_steps", 0, "config.num_train_steps=0"),
])
def test_bad_values_fail_naming_the_field(field, value, message):
  config = _get("tiny")
  config.mesh.expert = 4
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    validate_config(config, num_devices=8)


def test_command_line_overrides_and_typos():
  def parse(*args):
    argv = ["prog", f"--config={ROOT}/configs/tiny.py:runlocal", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)  # Overrides are read from argv directly.
    fv(argv)
    return fv.config

  assert parse("--config.model.moe.num_experts=16").model.moe.num_experts == 16
  assert parse("--config.model.moe.group_size=32").model.moe.group_size == 32
  with pytest.raises(Exception, match="num_expert"):
    parse("--config.model.moe.num_expert=16")  # Locked config: a typo is an error.


@pytest.mark.parametrize("tokenizer, vocab, expected", [
    ("byte", 0, 384),  # 259 byte ids, rounded up to a multiple of 128.
    ("sentencepiece", 0, 1024),  # data.sentencepiece.vocab_size = 1000.
    ("byte", 300, 300),  # An explicit size is kept.
])
def test_vocab_size_zero_follows_the_tokenizer(tokenizer, vocab, expected):
  config = _get("dense")
  config.data.tokenizer, config.data.sentencepiece.vocab_size = tokenizer, 1000
  config.model.vocab_size = vocab
  assert validate_config(config, num_devices=1).vocab_size == expected


def test_vocab_size_below_the_tokenizer_is_an_error():
  config = _get("dense")
  config.model.vocab_size = 200
  with pytest.raises(ValueError, match=r"config.model.vocab_size=200: .*at least the tokenizer's "
                                       r"vocabulary, 259"):
    validate_config(config, num_devices=1)


@pytest.mark.parametrize("field", ["num_train_steps", "model.d_model", "model.moe.d_ff"])
def test_booleans_are_not_sizes(field):
  config = _get("switch")
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = True
  with pytest.raises(ValueError, match=leaf):
    validate_config(config, num_devices=1)


def test_a_misspelled_override_gets_a_one_line_did_you_mean():
  from moejax import cli  # pylint: disable=import-outside-toplevel
  config = os.path.join(ROOT, "configs", "switch.py")
  msg = cli.unknown_override([f"--config={config}:experts=4", "--config.model.moe.num_expert=3"])
  assert msg == ("--config.model.moe.num_expert=3: config.model.moe has no field 'num_expert'; "
                 "did you mean config.model.moe.num_experts?")
  assert cli.unknown_override([f"--config={config}", "--config.seed=3"]) is None
