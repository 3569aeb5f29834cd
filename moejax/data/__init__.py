"""moejax input pipeline: TFDS datasets, local text files and a built-in synthetic corpus.

Entry points for the trainer:

  tokenizer = get_tokenizer(config.data)
  it = make_pipeline(config.data, seq_len=..., global_batch_size=..., split=config.data.train_split,
                     seed=config.seed, mesh=mesh)
  batch = next(it)                 # dict of [B, seq_len] int32: see pipeline.BATCH_KEYS
  state = it.get_state(); it.set_state(state)   # JSON-able position, saved with the checkpoint

Importing this package imports neither TensorFlow nor tensorflow_datasets; TFDS is imported only
by the tfds / text_files sources, and its readers used here do not import TensorFlow.
See docs/data.md.
"""

from __future__ import annotations

import os

from moejax.data.config import SOURCES, TOKENIZERS, default_data_config
from moejax.data.pipeline import BATCH_KEYS, PackedIterator, make_global_batch
from moejax.data.sources import DocSource, domain_names, get_source
from moejax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "DocSource", "PackedIterator", "SOURCES", "SentencePieceTokenizer",
    "default_data_config", "domain_names", "get_source", "get_tokenizer", "make_global_batch", "make_pipeline",
]


def get_tokenizer(data_config):
  """The tokenizer of `data.tokenizer`; SentencePiece is trained on `data.train_split` once."""
  from moejax.data import sources as sources_lib  # pylint: disable=import-outside-toplevel
  from moejax.data import tokenizers as tok_lib  # pylint: disable=import-outside-toplevel
  if data_config.tokenizer not in TOKENIZERS:
    raise ValueError(f"data.tokenizer={data_config.tokenizer!r} is not supported; allowed values "
                     f"are {TOKENIZERS}.")
  if data_config.tokenizer == "byte":
    return ByteTokenizer()
  csp = data_config.sentencepiece
  if csp.model_path:
    path = os.path.expanduser(csp.model_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.sentencepiece.model_path={csp.model_path!r}: no such file.")
    return SentencePieceTokenizer(path)
  # Trained on the whole training split, never a capped one (data.train_max_*): runs with
  # different caps share one vocabulary, so their eval CE stays comparable.
  uncapped = data_config.copy_and_resolve_references()
  with uncapped.unlocked():
    uncapped.train_max_bytes = uncapped.train_max_docs = None
  source = sources_lib.get_source(uncapped, data_config.train_split)
  name = tok_lib.sentencepiece_cache_name(source.key, csp.vocab_size, csp.model_type,
                                          csp.max_train_sentences)
  path = os.path.join(sources_lib.tokenizer_cache_dir(data_config), name)
  if not os.path.isfile(path):
    texts = (source.get(i)[0] for i in range(source.num_docs))
    tok_lib.train_sentencepiece(texts, path, csp.vocab_size, csp.model_type,
                                csp.max_train_sentences)
  return SentencePieceTokenizer(path)


def make_pipeline(data_config, *, seq_len: int, global_batch_size: int, split: str, seed: int,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, mesh=None, tokenizer=None) -> PackedIterator:
  """The packed-batch iterator for `split` of `data.source` (see moejax.data.pipeline).

  Args:
    data_config: the `config.data` ConfigDict (`default_data_config()`).
    seq_len: tokens per row.
    global_batch_size: rows per global batch (all processes together).
    split: split name (TFDS slicing syntax allowed for tfds sources).
    seed: shuffle seed (document order per epoch).
    num_epochs: None repeats forever; n stops after n passes (last batch padded).
    process_index, process_count: this host's share; default `jax.process_index()/count()`.
    mesh: if given, batches are global jax.Arrays sharded by `moejax.sharding.batch_sharding`.
    tokenizer: reuse an already built tokenizer (default `get_tokenizer(data_config)`).
  Returns:
    A `PackedIterator` with `get_state()` / `set_state(state)`.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  source = get_source(data_config, split)
  tokenizer = get_tokenizer(data_config) if tokenizer is None else tokenizer
  return PackedIterator(source, tokenizer, seq_len=seq_len, global_batch_size=global_batch_size,
                        seed=seed, shuffle=data_config.shuffle, num_epochs=num_epochs,
                        process_index=process_index, process_count=process_count, mesh=mesh)
