"""Run identity: the key under which a study records a run, the same wherever its data lives.

`config_key(config)` hashes the resolved config (model, optimizer, data, seed, steps) with every
*where* replaced by a *what*:
- text files (`data.text_files.paths`) by their identity: for each file (globs expanded, sorted by
  name) its base name, size in bytes and the first 16 hex digits of its SHA-256. Moving the corpus
  keeps every key; editing a file changes them.
- a SentencePiece model file (`data.sentencepiece.model_path`) likewise;
- `data.cache_dir`, `data.tfds.data_dir` and `data.text_files.paths_as_typed` are dropped: where
  derived data or a prepared TFDS dataset is stored does not change it (a TFDS dataset is
  identified by `data.tfds.name` as written; write `name:version` to pin a version).
Every key of every data source changed with this (December 2026); `experiments/
migrate_study_keys.py` re-keys a workdir written before.
Config fields added after results were committed, at the default they were added with, are left
out of the hash (`KEY_NEUTRAL_DEFAULTS`), so adding a field does not orphan earlier runs.

`data_identity(paths)` is the same identity as a string, stored in `study.json` so that a workdir
refuses to mix runs on two different corpora while accepting the same corpus at another path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

# Config fields added after results were committed, with the default they were added with. A
# field at that default leaves the key unchanged (every earlier run had that behaviour); set away
# from it, it joins the key as usual.
KEY_NEUTRAL_DEFAULTS = {
    ("model", "attention"): "einsum", ("data", "tfds", "domain_key"): "",
    ("mesh", "fsdp"): 1, ("mesh", "model"): 1, ("model", "remat"): "none",
    ("model", "scan_layers"): False,
    **{("model", "moe", name): default for name, default in (
        ("choice", "token"), ("score", "softmax"), ("routed_scaling_factor", 1.0),
        ("num_expert_groups", 1), ("topk_groups", 1), ("bias_update_rate", 0.0),
        ("num_shared_experts", 0), ("shared_d_ff", None), ("balance_loss_scope", "group"),
        ("grouped_matmul", "auto"), ("ep_transport", "auto"), ("receive_buffer_factor", None),
        ("router", "learned"))},
    ("benchmark",): False, ("routing_trace_every",): 0,
    ("data", "train_max_bytes"): None, ("data", "train_max_docs"): None,
}
# Where things are stored, not what they are: never part of a key.
LOCATION_FIELDS = (("data", "cache_dir"), ("data", "tfds", "data_dir"),
                   ("data", "text_files", "paths_as_typed"))


@functools.lru_cache(maxsize=64)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
  del mtime_ns  # Part of the cache key only: an edited file is hashed again.
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return f"{os.path.basename(path)}:{size}:{digest.hexdigest()[:16]}"


def file_identity(path: str) -> str:
  """'name.txt:<bytes>:<sha256 prefix>' of one file."""
  st = os.stat(path)
  return _file_identity(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def data_identity(paths: str) -> str:
  """The identity of comma-separated text files or globs, matched as the data pipeline matches
  them (`moejax.data.sources.files_by_pattern`); a glob's files are listed by their identities,
  sorted, so neither directory names nor listing order enter it. A pattern that matches no file
  is an error: a key must not depend on a missing file."""
  from moejax.data import sources  # pylint: disable=import-outside-toplevel
  return ",".join("+".join(sorted(file_identity(f) for f in files))
                  for files in sources.files_by_pattern(paths))


def _pop(tree: dict, path: tuple[str, ...]) -> None:
  node = tree
  for part in path[:-1]:
    node = node.get(part, {}) if isinstance(node, dict) else {}
  if isinstance(node, dict):
    node.pop(path[-1], None)


def _neutral_tree(config) -> dict:
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  for path, default in KEY_NEUTRAL_DEFAULTS.items():
    node = tree
    for part in path[:-1]:
      node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and node.get(path[-1], default) == default:
      node.pop(path[-1], None)
  return tree


def _hash(tree: dict) -> str:
  return hashlib.sha256(json.dumps(tree, sort_keys=True, indent=None).encode()).hexdigest()[:16]


def config_key(config) -> str:
  """A hash of everything that determines a run (resolved config, seed and data identity)."""
  tree = _neutral_tree(config)
  data = tree.get("data", {})
  if data.get("source") == "text_files" and data.get("text_files", {}).get("paths"):
    data["text_files"]["paths"] = data_identity(data["text_files"]["paths"])
  if data.get("sentencepiece", {}).get("model_path"):
    data["sentencepiece"]["model_path"] = file_identity(data["sentencepiece"]["model_path"])
  for path in LOCATION_FIELDS:
    _pop(tree, path)
  return _hash(tree)


def path_config_key(config) -> str:
  """The key before December 2026: the same hash with data paths as written (absolute). Used only
  by `experiments/migrate_study_keys.py` to recognise committed records."""
  tree = _neutral_tree(config)
  _pop(tree, ("data", "text_files", "paths_as_typed"))  # Added after these keys; never in them.
  return _hash(tree)
