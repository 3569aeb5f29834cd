"""A built-in, synthetic, multi-domain text corpus: no download, deterministic from a seed.

The corpus is SYNTHETIC. It exists so that tiny training runs, CI and tests work offline, and so
that expert specialisation can be measured against a known ground truth: every document belongs
to exactly one *domain*, each domain has its own small vocabulary and its own rule, and the
pipeline emits the domain id of every token (`batch['domain']`).

Document `i` of a split is generated from its own RNG, seeded by (corpus seed, split, i), so any
document can be produced in O(1) without generating the others (random access, like an
array_record file), and the corpus is identical on every host. Domain of document `i` is
`i % num_domains` (balanced). The domains (text lines, one example per line):

  0 arith    '37+58=95'                 digits and + - =
  1 copy     'copy abcd=abcd'           the letters a-m, copied
  2 reverse  'REV ABCD=DCBA'            the letters A-M, reversed
  3 sort     'sort qxn=nqx'             the letters n-z, sorted
  4 grammar  'the small cat sees a dog.' a tiny English grammar (subject verb object)
  5 dyck     '( [ { } ] ) < >'          balanced brackets
  6 kv       'Q=3;T=7;R=1?T:7'          key-value lookup, keys N-Z, values digits
  7 count    'three four five six'      counting in number words
"""

from __future__ import annotations

import random
from collections.abc import Callable

DOMAIN_NAMES = ("arith", "copy", "reverse", "sort", "grammar", "dyck", "kv", "count")
SPLITS = ("train", "validation")

_LOWER_AM = "abcdefghijklm"
_UPPER_AM = "ABCDEFGHIJKLM"
_LOWER_NZ = "nopqrstuvwxyz"
_UPPER_NZ = "NOPQRSTUVWXYZ"
_DETS = ("the", "a", "every", "some")
_ADJS = ("small", "red", "old", "quiet", "happy", "tall")
_NOUNS = ("cat", "dog", "bird", "farmer", "child", "river", "house", "tree")
_VERBS = ("sees", "likes", "follows", "finds", "helps", "watches")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen", "nineteen", "twenty")


def _arith(rng: random.Random) -> str:
  a, b = rng.randrange(1000), rng.randrange(1000)
  if rng.random() < 0.5:
    return f"{a}+{b}={a + b}"
  a, b = max(a, b), min(a, b)
  return f"{a}-{b}={a - b}"


def _letters(rng: random.Random, alphabet: str) -> str:
  return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 8)))


def _copy(rng: random.Random) -> str:
  s = _letters(rng, _LOWER_AM)
  return f"copy {s}={s}"


def _reverse(rng: random.Random) -> str:
  s = _letters(rng, _UPPER_AM)
  return f"REV {s}={s[::-1]}"


def _sort(rng: random.Random) -> str:
  s = _letters(rng, _LOWER_NZ)
  return f"sort {s}={''.join(sorted(s))}"


def _noun_phrase(rng: random.Random) -> str:
  words = [rng.choice(_DETS)]
  if rng.random() < 0.5:
    words.append(rng.choice(_ADJS))
  words.append(rng.choice(_NOUNS))
  return " ".join(words)


def _grammar(rng: random.Random) -> str:
  return f"{_noun_phrase(rng)} {rng.choice(_VERBS)} {_noun_phrase(rng)}."


def _dyck(rng: random.Random) -> str:
  pairs = ("()", "[]", "{}", "<>")
  out, stack = [], []
  for _ in range(rng.randint(2, 8)):
    while stack and rng.random() < 0.4:
      out.append(stack.pop())
    opener, closer = rng.choice(pairs)
    out.append(opener)
    stack.append(closer)
  out.extend(reversed(stack))
  return " ".join(out)


def _kv(rng: random.Random) -> str:
  keys = rng.sample(_UPPER_NZ, rng.randint(2, 5))
  values = [rng.randrange(10) for _ in keys]
  query = rng.randrange(len(keys))
  table = ";".join(f"{k}={v}" for k, v in zip(keys, values))
  return f"{table}?{keys[query]}:{values[query]}"


def _count(rng: random.Random) -> str:
  start = rng.randrange(len(_NUMBER_WORDS) - 3)
  stop = rng.randint(start + 2, min(start + 7, len(_NUMBER_WORDS)))
  return " ".join(_NUMBER_WORDS[start:stop])


_LINE_FNS: tuple[Callable[[random.Random], str], ...] = (
    _arith, _copy, _reverse, _sort, _grammar, _dyck, _kv, _count)


def check_builtin_config(num_domains: int, num_docs: int, min_lines: int, max_lines: int) -> None:
  """ValueError naming the `data.builtin.*` field that is out of range."""
  if not 1 <= num_domains <= len(DOMAIN_NAMES):
    raise ValueError(f"data.builtin.num_domains={num_domains}: must be in 1..{len(DOMAIN_NAMES)} "
                     f"(domains {DOMAIN_NAMES}).")
  if num_docs < 1:
    raise ValueError(f"data.builtin.num_docs (or num_eval_docs)={num_docs}: must be >= 1.")
  if not 1 <= min_lines <= max_lines:
    raise ValueError(f"data.builtin.min_lines={min_lines}, max_lines={max_lines}: need "
                     "1 <= min_lines <= max_lines.")


def make_document(seed: int, split: str, index: int, num_domains: int = len(DOMAIN_NAMES),
                  min_lines: int = 2, max_lines: int = 8) -> tuple[str, int]:
  """Returns (text, domain_id) of document `index` of `split`; a pure function of its arguments."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: the builtin corpus has splits {SPLITS}.")
  domain = index % num_domains
  # str seeds are hashed with SHA-512 by `random`, so this is stable across processes and runs.
  rng = random.Random(f"moejax-builtin/{seed}/{split}/{index}")
  line_fn = _LINE_FNS[domain]
  lines = [line_fn(rng) for _ in range(rng.randint(min_lines, max_lines))]
  return "\n".join(lines), domain
