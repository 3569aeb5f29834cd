"""Config files and dotted overrides: loading `configs/*.py[:arg]`, and one walker over dotted keys.

A config is an `ml_collections.ConfigDict` returned by a config file's `get_config(arg)`. Every
command (the trainer, the evaluator, the study runner) loads files and applies overrides through
this module, so a misspelled field gets the same message everywhere: the dotted name the user
wrote, the field that is missing, and the fields that exist.

`data_overrides` turns a `--data` string ('builtin', a TFDS name, or text files) into the dotted
`data.*` overrides it stands for.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping
from typing import Any

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
