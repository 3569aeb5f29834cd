"""Packing pipeline: documents -> fixed-length packed rows -> per-process batches -> global arrays.

Design (deterministic, checkpointable, process-count independent):

- The documents an epoch visits are a permutation of the source indices, drawn from
  (seed, epoch). Epochs are chained into one endless document sequence k = 0, 1, 2, ...
  (document k is `perm[k // N][k % N]`).
- Row r of the *global* batch is a stream that packs documents k = r, r + B, r + 2B, ... (B the
  global batch size) back to back: each document is tokenized as [BOS] tokens [EOS] and yields
  len - 1 (input, target) pairs; pairs are packed in order; a document that does not fit in the
  rest of the row continues in the same row of the next batch as a new segment (its positions
  restart at 0). No token is dropped or repeated; padding appears only at the end of a finite
  run (`num_epochs`), where a stream has run out of documents.
- Process p of P owns global rows [p B/P, (p+1) B/P) and reads only their documents, so the
  global batch is the same whatever P is, and each host reads 1/P of the data.
- The iterator position is, per global row, (next document k, pairs already consumed from it).
  `get_state()` returns the position of *every* global row as a small JSON-able dict (with
  several processes it gathers the other processes' rows: a collective, so every process calls
  it at the same step); `set_state()` restores this process's rows from it. Because row r's
  document stream does not depend on the number of processes, a state saved by P processes
  resumes on any P' that divides the global batch size: no document is skipped or repeated.

Batch: dict of int32 [rows, seq_len] numpy arrays (or global jax.Arrays sharded with
`moejax.sharding.batch_sharding` when a mesh is given): inputs, targets, mask (1 where the target
is a real token), segment_ids (1, 2, ... per segment in the row, 0 for padding), positions
(within the segment), domain (domain id of the document, -1 if unknown or padding).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moejax.data import sources as sources_lib

BATCH_KEYS = ("inputs", "targets", "mask", "segment_ids", "positions", "domain")
STATE_FORMAT = "moejax.data.packed/2"  # /1: one process's rows only (resumable when P = 1).


def _check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}: must be a positive integer.")
  return int(value)


class PackedIterator:
  """Iterator over packed batches of one split; see the module docstring for the layout."""

  def __init__(self, source: sources_lib.DocSource, tokenizer, *, seq_len: int,
               global_batch_size: int, seed: int, shuffle: bool = True,
               num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
               mesh=None):
    self.seq_len = _check_positive_int("seq_len", seq_len)
    self.global_batch_size = _check_positive_int("global_batch_size", global_batch_size)
    process_count = _check_positive_int("process_count", process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index}: must be in [0, {process_count}).")
    if self.global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                       f"process_count={process_count}: each process loads an equal share.")
    if num_epochs is not None:
      num_epochs = _check_positive_int("num_epochs", num_epochs)
    if mesh is not None:
      from moejax import sharding  # pylint: disable=import-outside-toplevel
      sharding.check_batch_divisible(self.global_batch_size, mesh, "global_batch_size")
    self.source, self.tokenizer, self.mesh = source, tokenizer, mesh
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.process_index, self.process_count = int(process_index), process_count
    self.local_batch_size = self.global_batch_size // process_count
    first_row = self.process_index * self.local_batch_size
    self._rows = np.arange(first_row, first_row + self.local_batch_size, dtype=np.int64)
    self._end_doc = None if num_epochs is None else num_epochs * source.num_docs
    self._perms: dict[int, np.ndarray] = {}
    self._tokens: dict[int, tuple[int, np.ndarray, int]] = {}  # row -> (k, tokens, domain)
    self._next_doc = self._rows.copy()
    self._offset = np.zeros_like(self._rows)
    self._step = 0

  # --- document sequence --------------------------------------------------------------------

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      n = self.source.num_docs
      if self.shuffle:
        perm = np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)
      else:
        perm = np.arange(n, dtype=np.int64)
      live = int(self._next_doc.min()) // n
      self._perms = {e: p for e, p in self._perms.items() if e >= live}
      self._perms[epoch] = perm
    return perm

  def _doc_tokens(self, row: int, k: int) -> tuple[np.ndarray, int]:
    cached = self._tokens.get(row)
    if cached is not None and cached[0] == k:
      return cached[1], cached[2]
    n = self.source.num_docs
    text, domain = self.source.get(int(self._perm(k // n)[k % n]))
    body = self.tokenizer.encode(text)
    tokens = np.empty(body.shape[0] + 2, dtype=np.int32)
    tokens[0], tokens[1:-1], tokens[-1] = self.tokenizer.bos_id, body, self.tokenizer.eos_id
    self._tokens[row] = (k, tokens, int(domain))
    return tokens, int(domain)

  # --- packing ------------------------------------------------------------------------------

  def _fill_row(self, i: int, out: dict[str, np.ndarray]) -> bool:
    """Packs local row `i` of `out` in place; returns whether it holds any token."""
    row, stride, seq_len = int(self._rows[i]), self.global_batch_size, self.seq_len
    k, offset = int(self._next_doc[i]), int(self._offset[i])
    pos, segment = 0, 0
    while pos < seq_len and (self._end_doc is None or k < self._end_doc):
      tokens, domain = self._doc_tokens(row, k)
      take = min(tokens.shape[0] - 1 - offset, seq_len - pos)
      segment += 1
      end = pos + take
      out["inputs"][i, pos:end] = tokens[offset:offset + take]
      out["targets"][i, pos:end] = tokens[offset + 1:offset + 1 + take]
      out["segment_ids"][i, pos:end] = segment
      out["positions"][i, pos:end] = np.arange(take, dtype=np.int32)
      out["domain"][i, pos:end] = domain
      pos, offset = end, offset + take
      if offset == tokens.shape[0] - 1:
        k, offset = k + stride, 0
        self._tokens.pop(row, None)
    self._next_doc[i], self._offset[i] = k, offset
    return pos > 0

  def next_local_batch(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch, as numpy int32 [local_batch, seq_len]."""
    shape = (self.local_batch_size, self.seq_len)
    out = {key: np.zeros(shape, dtype=np.int32) for key in BATCH_KEYS}
    out["domain"].fill(-1)
    any_tokens = False
    for i in range(self.local_batch_size):
      any_tokens |= self._fill_row(i, out)
    if not any_tokens:
      raise StopIteration
    out["mask"] = (out["segment_ids"] > 0).astype(np.int32)
    self._step += 1
    return out

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = self.next_local_batch()
    if self.mesh is None:
      return batch
    return make_global_batch(batch, self.mesh, self.global_batch_size)

  # --- checkpointing ------------------------------------------------------------------------

  def _identity(self) -> dict:
    return {"source": self.source.key, "seed": self.seed, "shuffle": self.shuffle,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
            "tokenizer": self.tokenizer.name, "vocab_size": int(self.tokenizer.vocab_size)}

  def get_state(self) -> dict:
    """The position of every global row (JSON-able); see the module docstring. With several
    processes this is a collective: every process must call it, at the same step."""
    local = np.stack([self._next_doc, self._offset]).astype(np.int64)  # [2, local rows]
    if self.process_count > 1:
      import jax  # pylint: disable=import-outside-toplevel
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if jax.process_count() != self.process_count:
        raise RuntimeError(f"get_state of process {self.process_index} of {self.process_count} "
                           f"gathers every process's rows, but JAX runs {jax.process_count()} "
                           "process(es); call it in each process of the job.")
      gathered = np.asarray(multihost_utils.process_allgather(local))  # [P, 2, local rows]
      local = np.concatenate(list(gathered), axis=1)
    return {"format": STATE_FORMAT, **self._identity(), "step": self._step,
            "next_doc": [int(k) for k in local[0]], "offset": [int(o) for o in local[1]]}

  def set_state(self, state: dict) -> None:
    """Restores this process's rows from a `get_state()` of any process count."""
    if state.get("format") == "moejax.data.packed/1":
      if state.get("process_count") != 1:  # It holds process 0's rows only.
        raise ValueError(
            f"data iterator state: written by process {state.get('process_index')} of "
            f"{state.get('process_count')} in the old format that kept one process's rows; it "
            "can only resume a single-process run of the same configuration.")
    elif state.get("format") != STATE_FORMAT:
      raise ValueError(f"data iterator state: format={state.get('format')!r}; allowed: "
                       f"{STATE_FORMAT!r} or 'moejax.data.packed/1'.")
    for key, value in self._identity().items():
      if state.get(key) != value:
        raise ValueError(f"data iterator state: {key}={state.get(key)!r} in the checkpoint but "
                         f"{value!r} in this pipeline; the state only resumes the same "
                         "configuration (source, seed, seq_len, global batch size, tokenizer).")
    next_doc = np.asarray(state["next_doc"], dtype=np.int64)
    offset = np.asarray(state["offset"], dtype=np.int64)
    B = self.global_batch_size
    if next_doc.shape != (B,) or offset.shape != (B,):
      raise ValueError(f"data iterator state: expected the {B} rows of the global batch, got "
                       f"{next_doc.size} next_doc / {offset.size} offset entries.")
    self._next_doc, self._offset = next_doc[self._rows].copy(), offset[self._rows].copy()
    self._step = int(state["step"])
    self._tokens.clear()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh,
                      global_batch_size: int) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays sharded over (data, expert)."""
  import jax  # pylint: disable=import-outside-toplevel
  from moejax import sharding  # pylint: disable=import-outside-toplevel
  spec = sharding.batch_sharding(mesh, 2)
  return {key: jax.make_array_from_process_local_data(
              spec, value, (global_batch_size,) + value.shape[1:])
          for key, value in local_batch.items()}
