"""The `config.data` section: every knob of the input pipeline, with its default.

One flat-ish ConfigDict with a sub-section per source / tokenizer. Every field is validated where
it is used, and errors name the field as `data.<section>.<field>`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SOURCES = ("builtin", "tfds", "text_files")
TOKENIZERS = ("byte", "sentencepiece")
DOC_SPLITS = ("paragraph", "line", "file")
DECODE_ERRORS = ("replace", "strict", "ignore", "backslashreplace")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the default `config.data` (built-in synthetic corpus, byte tokenizer)."""
  c = ml_collections.ConfigDict()
  # Where documents come from: 'builtin' (synthetic, offline), 'tfds' (any TFDS text dataset)
  # or 'text_files' (local files, converted once into a cached TFDS dataset).
  c.source = "builtin"
  # Split the trainer reads for training (TFDS split syntax such as 'train[:90%]' allowed for tfds).
  c.train_split = "train"
  # Split the trainer reads for evaluation ('test' for lm1b; 'validation' for builtin/text_files).
  c.eval_split = "validation"
  # Local directory for derived artefacts (text_files datasets, SentencePiece models);
  # '' means $MOEJAX_DATA_CACHE or ~/.cache/moejax/data.
  c.cache_dir = ""
  # Shuffle document order each epoch (a full permutation: sources are random access, so no
  # shuffle buffer is needed).
  c.shuffle = True
  # Tokenizer: 'byte' (UTF-8 bytes, no training, vocab 259) or 'sentencepiece' (trained on the
  # training split once and cached).
  c.tokenizer = "byte"
  # Cap on the unique training text, for data-size studies: the training split is cut to a fixed
  # random subset of its documents (`moejax.data.sources.cap_training_documents`: the same subset
  # for every run and seed, nested across caps: a smaller cap's documents are a prefix of a larger
  # one's), holding at least `train_max_bytes` bytes of UTF-8 text, or `train_max_docs`
  # documents. Evaluation splits are never capped, so capped and uncapped runs are evaluated on
  # the same held-out documents. None: the whole split. At most one of the two.
  c.train_max_bytes = config_dict.placeholder(int)
  c.train_max_docs = config_dict.placeholder(int)

  c.tfds = ml_collections.ConfigDict()
  # TFDS dataset name, optionally with config/version, e.g. 'lm1b', 'c4/en', 'wiki40b/en'.
  c.tfds.name = "lm1b"
  # TFDS data_dir holding the prepared dataset (local path or gs://...); '' = TFDS default.
  c.tfds.data_dir = ""
  # Feature key holding the document text.
  c.tfds.text_key = "text"
  # Integer feature (e.g. a ClassLabel) giving each document's domain, for routing analysis
  # (`batch['domain']`); '' = none (domain -1).
  c.tfds.domain_key = ""

  c.text_files = ctf = ml_collections.ConfigDict()
  # Comma-separated file paths or globs, e.g. 'corpus/*.txt,notes.txt' (relative
  # paths are resolved against the working directory). Each entry is one domain
  # (`batch['domain']` = its index; routing analysis names it after the file or glob).
  # A run makes them absolute when it starts (`resolve_paths`), so its saved config reads the
  # same files from any directory; `paths_as_typed` keeps what was written.
  ctf.paths = ""
  ctf.paths_as_typed = ""
  # How a file is cut into documents: 'paragraph' (blank-line separated), 'line' or 'file'.
  ctf.doc_split = "paragraph"
  # What to do with bytes that are not valid UTF-8 (Python codec error handler); 'replace'
  # turns each bad byte into U+FFFD, 'strict' raises ValueError naming the file and offset.
  ctf.decode_errors = "replace"
  # Fraction of documents held out as the 'validation' split (0 = no validation split).
  ctf.held_out_fraction = 0.05

  c.sentencepiece = csp = ml_collections.ConfigDict()
  # Vocabulary size to train (ids 0..3 are pad, bos, eos, unk).
  csp.vocab_size = 1024
  # SentencePiece model type: 'unigram' or 'bpe'.
  csp.model_type = "unigram"
  # Use an existing .model file instead of training one ('' = train and cache next to the data).
  csp.model_path = ""
  # At most this many training-split lines are sampled to train the model.
  csp.max_train_sentences = 200_000

  c.builtin = cb = ml_collections.ConfigDict()
  # Number of synthetic domains (1..8), see moejax.data.builtin.DOMAIN_NAMES.
  cb.num_domains = 8
  # Documents in the 'train' split.
  cb.num_docs = 20_000
  # Documents in the 'validation' split (disjoint random draws).
  cb.num_eval_docs = 1_000
  # Seed of the corpus itself (independent of the pipeline's shuffle seed).
  cb.seed = 0
  # Each document has between min_lines and max_lines task lines of its domain.
  cb.min_lines = 2
  # Upper bound of lines per document (inclusive).
  cb.max_lines = 8
  return c


def resolve_paths(data_config) -> None:
  """Makes `text_files.paths` absolute (against the working directory), in place, keeping the
  entries as written in `text_files.paths_as_typed` (once: a resolved config stays as it is)."""
  import os  # pylint: disable=import-outside-toplevel
  cfg = data_config.text_files
  if data_config.source != "text_files" or not cfg.paths:
    return
  entries = [p.strip() for p in cfg.paths.split(",") if p.strip()]
  resolved = ",".join(os.path.abspath(os.path.expanduser(p)) for p in entries)
  if resolved != cfg.paths:
    cfg.paths_as_typed = cfg.paths_as_typed or cfg.paths
    cfg.paths = resolved
