"""Document sources: random-access sequences of (text, domain id), one per kind of data.

Every source is a `DocSource`: a length and `get(i) -> (text, domain)` (domain -1 when unknown).
Random access is what makes the pipeline simple: shuffling is a per-epoch permutation of indices,
and the checkpointable position is a few integers.

- builtin: the synthetic corpus of `moejax.data.builtin` (pure Python, no TF, no files).
- tfds: `tfds.data_source(name, split, data_dir)` reads a dataset prepared in the array_record
  format, without TensorFlow. Datasets prepared as tfrecord (the TFDS default, and most of
  gs://tensorflow-datasets) are refused with the conversion command to run once.
- text_files: local files are cut into documents, split into train / validation once, and written
  as an array_record TFDS dataset under `data.cache_dir` (keyed by a hash of the file contents and
  the options); afterwards they are read back like any TFDS dataset (`builder_from_directory`).
  Building and reading are both TF-free in tensorflow-datasets 4.9.10.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import glob
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from absl import logging

from moejax.data import builtin as builtin_lib
from moejax.data.config import DECODE_ERRORS, DOC_SPLITS, SOURCES

TEXT_FILES_VERSION = "1.1.0"  # 1.1.0: a `domain` feature (the pattern a file matched).
TEXT_FILES_SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class DocSource:
  """A random-access document collection; `key` identifies its contents (for caches/state)."""
  key: str
  num_docs: int
  get: Callable[[int], tuple[str | bytes, int]]


def resolve_cache_dir(data_config) -> str:
  """`data.cache_dir`, or $MOEJAX_DATA_CACHE, or ~/.cache/moejax/data; made absolute."""
  path = data_config.cache_dir or os.environ.get("MOEJAX_DATA_CACHE") or "~/.cache/moejax/data"
  return os.path.abspath(os.path.expanduser(path))


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not supported; allowed values are {allowed}.")


# --- builtin -------------------------------------------------------------------------------------


def builtin_source(data_config, split: str) -> DocSource:
  cb = data_config.builtin
  if split not in builtin_lib.SPLITS:
    raise ValueError(f"split={split!r} does not exist for data.source='builtin'; allowed splits "
                     f"are {builtin_lib.SPLITS}.")
  num_docs = cb.num_docs if split == "train" else cb.num_eval_docs
  builtin_lib.check_builtin_config(cb.num_domains, num_docs, cb.min_lines, cb.max_lines)
  args = (cb.seed, split)
  opts = dict(num_domains=cb.num_domains, min_lines=cb.min_lines, max_lines=cb.max_lines)

  def get(i: int) -> tuple[str, int]:
    return builtin_lib.make_document(*args, i, **opts)

  key = (f"builtin/seed={cb.seed}/domains={cb.num_domains}/lines={cb.min_lines}-{cb.max_lines}"
         f"/docs={cb.num_docs},{cb.num_eval_docs}")
  return DocSource(key=f"{key}/{split}", num_docs=num_docs, get=get)


# --- tfds ----------------------------------------------------------------------------------------


def _wrap_tfds_datasource(ds, key: str, text_key: str, field_name: str,
                          domain_key: str = "") -> DocSource:
  """`domain_key`: an integer feature (e.g. a ClassLabel) giving each document's domain."""
  num_docs = len(ds)
  if num_docs == 0:
    raise ValueError(f"{field_name}: the split {key!r} has no examples.")
  first = ds[0]
  for name, field in ((text_key, "data.tfds.text_key"), (domain_key, "data.tfds.domain_key")):
    if name and name not in first:
      raise ValueError(f"{field}={name!r} is not a feature of {key!r}; "
                       f"available keys are {sorted(first)}.")
  if domain_key and not np.issubdtype(np.asarray(first[domain_key]).dtype, np.integer):
    raise ValueError(f"data.tfds.domain_key={domain_key!r} is a "
                     f"{np.asarray(first[domain_key]).dtype} feature; allowed: an integer "
                     "feature (a ClassLabel or an id).")

  def get(i: int) -> tuple[str | bytes, int]:
    example = ds[int(i)]
    return example[text_key], int(example[domain_key]) if domain_key else -1

  return DocSource(key=key, num_docs=num_docs, get=get)


def tfds_source(data_config, split: str) -> DocSource:
  """A TFDS dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  cfg = data_config.tfds
  if not cfg.name:
    raise ValueError("data.tfds.name is empty; set it to a TFDS dataset name such as 'lm1b'.")
  data_dir = cfg.data_dir or None
  try:
    ds = tfds.data_source(cfg.name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(cfg.name.split("/")[0], tfds.list_builders(), n=3)
    raise ValueError(f"data.tfds.name={cfg.name!r}: no such TFDS dataset; allowed: a registered "
                     "dataset name (`tfds.list_builders()`)"
                     + (f"; close names: {close}" if close else "") + ".") from e
  except NotImplementedError as e:
    # `data_source` refuses non-array_record formats; tell apart "absent" from "wrong format".
    builder = tfds.builder(cfg.name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"data.tfds.name={cfg.name!r} is not prepared in data.tfds.data_dir={cfg.data_dir!r} "
          f"(looked in {builder.data_dir}). Prepare it once with network access: "
          f"`tfds build {cfg.name} --data_dir=DIR --file_format=array_record`.") from e
    raise ValueError(
        f"data.tfds.name={cfg.name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format}; the TF-free reader needs array_record. Convert it once: "
        f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record`.") from e
  except ValueError as e:
    if "split" in str(e).lower():
      raise ValueError(f"split={split!r} does not exist for data.tfds.name={cfg.name!r}: "
                       f"{e}") from e
    raise
  key = f"tfds/{cfg.name}/{os.path.abspath(cfg.data_dir) if cfg.data_dir else ''}/{split}"
  return _wrap_tfds_datasource(ds, key, cfg.text_key, f"data.tfds.name={cfg.name!r}",
                              cfg.get("domain_key", ""))


# --- text files ----------------------------------------------------------------------------------


def _patterns(paths: str | list[str] | tuple[str, ...]) -> list[str]:
  patterns = [p.strip() for p in (paths.split(",") if isinstance(paths, str) else paths)]
  patterns = [p for p in patterns if p]
  if not patterns:
    raise ValueError("data.text_files.paths is empty; give comma-separated file paths or globs, "
                     "e.g. 'corpus/*.txt,notes.txt'.")
  return patterns


def files_by_pattern(paths: str | list[str] | tuple[str, ...]) -> list[list[str]]:
  """The sorted absolute files each comma-separated path or glob matches (each must match)."""
  out = []
  for pattern in _patterns(paths):
    expanded = os.path.expanduser(pattern)
    matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
    matches = [os.path.abspath(m) for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"data.text_files.paths: {pattern!r} matches no file "
                              f"(working directory {os.getcwd()}).")
    out.append(matches)
  return out


def expand_paths(paths: str | list[str] | tuple[str, ...]) -> list[str]:
  """Comma-separated (or listed) paths/globs -> sorted unique absolute file paths."""
  return sorted({f for files in files_by_pattern(paths) for f in files})


def file_domains(paths: str | list[str] | tuple[str, ...]) -> dict[str, int]:
  """Each file's domain: the index of the first comma-separated path or glob that matches it."""
  out: dict[str, int] = {}
  for domain, files in enumerate(files_by_pattern(paths)):
    for f in files:
      out.setdefault(f, domain)
  return out


def text_files_domain_names(paths: str | list[str] | tuple[str, ...]) -> list[str]:
  """A name per domain: the file name without extension (`wikitext2_*` for a glob), or
  `dir/*.py` where that name would be only wildcards."""
  names = []
  for pattern in _patterns(paths):
    name = os.path.splitext(os.path.basename(pattern))[0]
    if not name.strip("*?[]"):
      name = os.path.join(os.path.basename(os.path.dirname(pattern)), os.path.basename(pattern))
    names.append(name)
  return names


def split_documents(text: str, doc_split: str) -> list[str]:
  """Cuts one file's text into non-empty documents ('paragraph' | 'line' | 'file')."""
  if doc_split == "file":
    docs = [text]
  elif doc_split == "line":
    docs = text.splitlines()
  else:
    docs = re.split(r"\n[ \t\r\f\v]*\n", text)
  return [d.strip("\n") for d in docs if d.strip()]


def read_documents(path: str, doc_split: str, decode_errors: str) -> list[str]:
  with open(path, "rb") as f:
    raw = f.read()
  nul = raw.find(b"\0", 0, 8192)  # Git's test: text has no NUL byte; binaries nearly always do.
  if nul >= 0:
    raise ValueError(f"data.text_files.paths: {path} looks binary (a NUL byte at offset {nul}); "
                     "allowed: text files (UTF-8; other encodings per "
                     "data.text_files.decode_errors).")
  try:
    text = raw.decode("utf-8", errors=decode_errors)
  except UnicodeDecodeError as e:
    raise ValueError(f"data.text_files.paths: {path} is not valid UTF-8 at byte {e.start} "
                     f"and data.text_files.decode_errors='strict'; use 'replace' to map bad "
                     "bytes to U+FFFD.") from e
  docs = split_documents(text, doc_split)
  if not docs:
    raise ValueError(f"data.text_files.paths: {path} is empty (no non-whitespace text).")
  return docs


def _fingerprint(files: list[str], cfg) -> str:
  h = hashlib.sha256()
  h.update(f"{TEXT_FILES_VERSION}|{cfg.doc_split}|{cfg.decode_errors}|"
           f"{float(cfg.held_out_fraction)!r}".encode())
  domains = file_domains(cfg.paths)
  for path in files:
    h.update(f"{path}\0{domains[path]}\0".encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:16]


def held_out_split(num_docs: int, fraction: float) -> np.ndarray:
  """bool[num_docs], True for held-out documents: a fixed random ceil(fraction * n) of them."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"data.text_files.held_out_fraction={fraction}: must be in [0, 1).")
  held = np.zeros(num_docs, dtype=bool)
  if fraction == 0:
    return held
  num_held = int(np.ceil(fraction * num_docs))
  if num_docs - num_held < 1:
    raise ValueError(f"data.text_files: only {num_docs} document(s), too few to hold out "
                     f"{fraction:.0%} and keep a training split; add text or change "
                     "data.text_files.doc_split (e.g. 'line').")
  held[np.random.default_rng(0).permutation(num_docs)[:num_held]] = True
  return held


@functools.cache
def _make_builder_class():
  """Defines the TFDS builder lazily (TFDS is imported only on this path)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class MoejaxTextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text documents -> 'train' / 'validation' array_record splits."""
    VERSION = tfds.core.Version(TEXT_FILES_VERSION)
    # No checksums file to look up (nothing is downloaded). This also sidesteps TFDS 4.9.10's
    # code_path lookup, which needs the optional `importlib_resources` for builders in packages.
    code_path = None

    def __init__(self, *, docs: list[str], domains: list[int], held: np.ndarray, **kwargs):
      self._docs, self._domains, self._held = docs, domains, held
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description="Local text files converted by moejax.data.",
          features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                               "doc_index": np.int64, "domain": np.int64}))

    def _split_generators(self, dl_manager):
      del dl_manager
      splits = {"train": self._generate_examples(False)}
      if self._held.any():
        splits["validation"] = self._generate_examples(True)
      return splits

    def _generate_examples(self, held: bool):
      for i in np.flatnonzero(self._held == held):
        yield int(i), {"text": self._docs[i], "doc_index": int(i),
                       "domain": int(self._domains[i])}

  return MoejaxTextFiles


def build_text_files_dataset(data_config) -> str:
  """Builds (once) the cached TFDS dataset of `data.text_files`; returns its directory."""
  cfg = data_config.text_files
  _check_choice("data.text_files.doc_split", cfg.doc_split, DOC_SPLITS)
  _check_choice("data.text_files.decode_errors", cfg.decode_errors, DECODE_ERRORS)
  files = expand_paths(cfg.paths)
  fingerprint = _fingerprint(files, cfg)
  root = os.path.join(resolve_cache_dir(data_config), "text_files", fingerprint)
  dataset_dir = os.path.join(root, "moejax_text_files", TEXT_FILES_VERSION)
  if os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    return dataset_dir
  domain_of = file_domains(cfg.paths)
  docs, domains = [], []
  for path in files:
    file_docs = read_documents(path, cfg.doc_split, cfg.decode_errors)
    docs.extend(file_docs)
    domains.extend([domain_of[path]] * len(file_docs))
  held = held_out_split(len(docs), float(cfg.held_out_fraction))
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  # Build in a private directory and rename it into place: several processes (hosts of one run,
  # or runs sharing the cache) may build at once; the first rename wins, the others discard
  # theirs, and no reader ever sees a half-written dataset.
  os.makedirs(os.path.dirname(root), exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=os.path.dirname(root))
  logging.info("building the text_files dataset of %d documents from %s into %s (once)",
               len(docs), cfg.paths, root)
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
  tqdm_utils.disable_progress_bar()  # Escape-coded progress bars garble logs and CI output.
  try:
    builder = _make_builder_class()(docs=docs, domains=domains, held=held, data_dir=tmp_root,
                                    file_format="array_record")
    # TFDS prints "Downloading and preparing dataset Unknown size ...": wrong for local files.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    with open(os.path.join(tmp_root, "sources.txt"), "w") as f:  # human-readable provenance
      f.write("\n".join(files) + "\n")
    os.chmod(tmp_root, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users.
    if os.path.isdir(root) and not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
      shutil.rmtree(root, ignore_errors=True)  # A half-built root left by an older, non-atomic build.
    os.rename(tmp_root, root)
  except OSError:
    if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
      raise  # Not a lost race: a real error.
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return dataset_dir


def text_files_source(data_config, split: str) -> DocSource:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  dataset_dir = build_text_files_dataset(data_config)
  builder = tfds.builder_from_directory(dataset_dir)
  available = list(builder.info.splits.keys())
  if split.split("[")[0] not in available:
    raise ValueError(f"split={split!r} does not exist for data.source='text_files'; available "
                     f"splits are {available} (validation needs "
                     "data.text_files.held_out_fraction > 0).")
  ds = builder.as_data_source(split=split)
  return _wrap_tfds_datasource(ds, f"text_files/{dataset_dir}/{split}", "text",
                               f"data.text_files.paths={data_config.text_files.paths!r}",
                               "domain")


def get_source(data_config, split: str) -> DocSource:
  """The `DocSource` of `data.source` for `split`; the training split capped by
  `data.train_max_bytes` / `data.train_max_docs` (`cap_training_documents`)."""
  _check_choice("data.source", data_config.source, SOURCES)
  if data_config.source == "builtin":
    source = builtin_source(data_config, split)
  elif data_config.source == "tfds":
    source = tfds_source(data_config, split)
  else:
    source = text_files_source(data_config, split)
  if split == data_config.train_split:
    source = cap_training_documents(source, data_config.get("train_max_bytes"),
                                    data_config.get("train_max_docs"))
  return source


CAP_SEED = 20_260_101  # The cap's document order: fixed, independent of every run's seed.


def cap_training_documents(source: DocSource, max_bytes: int | None,
                           max_docs: int | None) -> DocSource:
  """`source` cut to a fixed random subset of its documents: the first documents of one
  permutation (seeded by `CAP_SEED`) until they hold `max_bytes` bytes of UTF-8 text (the
  document that crosses the cap is kept whole) or number `max_docs`. Subsets are nested: a
  smaller cap's documents are a prefix of a larger one's. The kept documents are read in the
  source's order (the pipeline shuffles them per epoch with the run's seed). The key names the
  cap, so a checkpoint of one cap does not resume under another. Cost: a permutation of all
  documents and, for a byte cap, reading documents one by one up to the cap, at every pipeline
  start: fine for corpora of up to a few million documents; the order comes from NumPy's
  `default_rng` (PCG64), stable across the NumPy versions we support."""
  if max_bytes is None and max_docs is None:
    return source
  if max_bytes is not None and max_docs is not None:
    raise ValueError(f"data.train_max_bytes={max_bytes} and data.train_max_docs={max_docs} are "
                     "both set; allowed: at most one (None: the whole training split).")
  field, cap = (("train_max_bytes", max_bytes) if max_bytes is not None
                else ("train_max_docs", max_docs))
  if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
    raise ValueError(f"data.{field}={cap!r}: allowed values are integers >= 1, or None for the "
                     "whole training split.")
  order = np.random.default_rng(CAP_SEED).permutation(source.num_docs)
  if field == "train_max_docs":
    if cap > source.num_docs:
      raise ValueError(f"data.train_max_docs={cap} exceeds the {source.num_docs} documents of "
                       f"the training split ({source.key}); allowed: 1..{source.num_docs}, or "
                       "None for all of them.")
    kept = order[:cap]
  else:
    total, n = 0, 0
    while total < cap and n < source.num_docs:
      text = source.get(int(order[n]))[0]
      total += len(text.encode("utf-8") if isinstance(text, str) else text)
      n += 1
    if total < cap:
      raise ValueError(f"data.train_max_bytes={cap} exceeds the {total} bytes of the training "
                       f"split ({source.key}); allowed: at most {total}, or None for all of it.")
    kept = order[:n]
  kept = np.sort(kept)
  return DocSource(key=f"{source.key}|{field}={cap}", num_docs=len(kept),
                   get=lambda i: source.get(int(kept[i])))


def domain_names(data_config) -> list[str]:
  """The name of each domain id `batch['domain']` carries ([] when the source has none)."""
  _check_choice("data.source", data_config.source, SOURCES)
  if data_config.source == "builtin":
    return list(builtin_lib.DOMAIN_NAMES[:data_config.builtin.num_domains])
  if data_config.source == "text_files":
    return text_files_domain_names(data_config.text_files.paths)
  key = data_config.tfds.get("domain_key", "")
  if not key:
    return []
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  feature = tfds.builder(data_config.tfds.name,
                         data_dir=data_config.tfds.data_dir or None).info.features[key]
  if hasattr(feature, "names"):  # A ClassLabel.
    return list(feature.names)
  raise ValueError(f"data.tfds.domain_key={key!r} has no names (not a ClassLabel); ids are "
                   "reported as numbers.")


def tokenizer_cache_dir(data_config) -> str:
  """Where a trained SentencePiece model is cached: next to the data when it is local."""
  if data_config.source == "text_files":
    return os.path.dirname(build_text_files_dataset(data_config))
  return os.path.join(resolve_cache_dir(data_config), "sentencepiece")
