"""Throughput of the input pipeline alone (no model): tokens/s for the built-in corpus and a
local text file, byte and SentencePiece tokenizers, on the host CPU.

Usage: python experiments/bench_data.py [--seconds 5] [--seq_len 1024] [--batch 32]
Uses ../shared/data/tinyshakespeare.txt (relative to the repo) when present, else a generated file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from moejax import cli
import moejax.data as md

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")


def bench(name: str, data_config, seq_len: int, batch: int, seconds: float) -> None:
  t0 = time.perf_counter()
  tok = md.get_tokenizer(data_config)
  it = md.make_pipeline(data_config, seq_len=seq_len, global_batch_size=batch, split="train",
                        seed=0, process_index=0, process_count=1, tokenizer=tok)
  next(it)
  setup = time.perf_counter() - t0
  tokens, steps, t0 = 0, 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    tokens += int(next(it)["mask"].sum())
    steps += 1
  dt = time.perf_counter() - t0
  print(f"{name:<34} {tokens / dt:>12,.0f} tokens/s  {steps / dt:>8.1f} batches/s  "
        f"(setup {setup:.1f}s, vocab {tok.vocab_size}, {it.source.num_docs} docs)")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--seconds", type=float, default=5.0, help="how long to read batches")
  parser.add_argument("--seq_len", type=int, default=1024, help="tokens per row")
  parser.add_argument("--batch", type=int, default=32, help="rows per batch")
  args = parser.parse_args()
  cache = tempfile.mkdtemp(prefix="moejax_bench_")
  path = SHAKESPEARE
  if not os.path.isfile(path):
    path = os.path.join(cache, "generated.txt")
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is that for it as with was on be by".split())
    with open(path, "w") as f:
      for _ in range(5000):
        f.write(" ".join(rng.choice(words, size=rng.integers(5, 80))) + "\n\n")
  print(f"seq_len={args.seq_len} global_batch={args.batch} text file={os.path.relpath(path)}")
  for tokenizer in ("byte", "sentencepiece"):
    c = md.default_data_config()
    c.cache_dir, c.tokenizer = cache, tokenizer
    bench(f"builtin / {tokenizer}", c, args.seq_len, args.batch, args.seconds)
    c.source, c.text_files.paths = "text_files", path
    bench(f"text_files / {tokenizer}", c, args.seq_len, args.batch, args.seconds)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
