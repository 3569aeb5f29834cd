"""Tokenizers with explicit special ids: pad 0, bos 1, eos 2 (both kinds), unk 3 (SentencePiece).

The model and loss assume `pad_id == 0`. A tokenizer is a small object with `pad_id`, `bos_id`,
`eos_id`, `vocab_size`, `encode(text) -> int32[n]` (no BOS/EOS; the pipeline adds them) and
`decode(ids) -> str` (special ids dropped).

- `ByteTokenizer`: UTF-8 bytes shifted by 3 (vocab 259), no dependency, no training. `str` input
  is UTF-8 encoded; `bytes` input is taken verbatim, so undecodable bytes keep their byte value.
  `decode` maps invalid UTF-8 back to U+FFFD.
- `SentencePieceTokenizer`: trained on the training split of the configured source (sampled
  lines, `data.sentencepiece.*`), written atomically to a cache file next to the data and reused.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
from absl import logging

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_BYTE_OFFSET = 3


def _as_bytes(text: str | bytes) -> bytes:
  if isinstance(text, bytes):
    return text
  if isinstance(text, np.bytes_):
    return bytes(text)
  return str(text).encode("utf-8", errors="surrogatepass")


class ByteTokenizer:
  """UTF-8 byte-level tokenizer: id = byte + 3; 0/1/2 are pad/bos/eos."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  vocab_size = 256 + _BYTE_OFFSET
  name = "byte"

  def encode(self, text: str | bytes) -> np.ndarray:
    return np.frombuffer(_as_bytes(text), dtype=np.uint8).astype(np.int32) + _BYTE_OFFSET

  def decode(self, ids: Iterable[int]) -> str:
    ids_n = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
    ids_n = ids_n[ids_n >= _BYTE_OFFSET] - _BYTE_OFFSET
    return ids_n.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """Wraps a SentencePiece model trained with pad=0, bos=1, eos=2, unk=3."""

  name = "sentencepiece"

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.pad_id, self.bos_id, self.eos_id = (self._sp.pad_id(), self._sp.bos_id(),
                                             self._sp.eos_id())
    if (self.pad_id, self.bos_id, self.eos_id) != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(
          f"data.sentencepiece.model_path={model_path!r}: the model has pad/bos/eos ids "
          f"{(self.pad_id, self.bos_id, self.eos_id)}, moejax needs {(PAD_ID, BOS_ID, EOS_ID)} "
          "(train with pad_id=0 bos_id=1 eos_id=2 unk_id=3).")
    self.vocab_size = self._sp.get_piece_size()

  def encode(self, text: str | bytes) -> np.ndarray:
    if not isinstance(text, str):
      text = _as_bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])


def _sample_lines(texts: Iterator[str | bytes], max_sentences: int, seed: int = 0) -> list[str]:
  """Non-empty lines of `texts`, reservoir-sampled down to `max_sentences` (deterministic)."""
  rng = random.Random(seed)
  lines: list[str] = []
  seen = 0
  for text in texts:
    if not isinstance(text, str):
      text = _as_bytes(text).decode("utf-8", errors="replace")
    for line in text.splitlines():
      line = line.strip()
      if not line:
        continue
      seen += 1
      if len(lines) < max_sentences:
        lines.append(line)
      else:
        j = rng.randrange(seen)
        if j < max_sentences:
          lines[j] = line
  return lines


def train_sentencepiece(texts: Iterator[str | bytes], model_path: str, vocab_size: int,
                        model_type: str = "unigram", max_sentences: int = 200_000) -> str:
  """Trains a SentencePiece model on `texts` and writes it atomically to `model_path`."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"data.sentencepiece.model_type={model_type!r}: allowed 'unigram', 'bpe'.")
  if vocab_size < 8:
    raise ValueError(f"data.sentencepiece.vocab_size={vocab_size}: must be >= 8.")
  lines = _sample_lines(texts, max_sentences)
  if not lines:
    raise ValueError("sentencepiece: the training split has no non-empty text to train on.")
  logging.info("training a %s SentencePiece model, vocabulary %d, on %d lines -> %s",
               model_type, vocab_size, len(lines), model_path)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, pad_id=PAD_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, unk_id=UNK_ID, hard_vocab_limit=False, byte_fallback=vocab_size >= 384,
        num_threads=1, minloglevel=2, max_sentence_length=1 << 16)
  except RuntimeError as e:
    raise ValueError(f"data.sentencepiece.vocab_size={vocab_size}: SentencePiece training "
                     f"failed: {e}") from e
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  return model_path


def sentencepiece_cache_name(source_key: str, vocab_size: int, model_type: str,
                             max_sentences: int) -> str:
  """File name of the cached model for a source fingerprint and the training options."""
  key = f"{source_key}|{vocab_size}|{model_type}|{max_sentences}|v1"
  return f"spm_{model_type}_{vocab_size}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.model"
