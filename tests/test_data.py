"""Tests of moejax.data: sources, tokenizers, packing, resume, multi-process split, errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moejax.data as md
from moejax.data import builtin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**builtin_overrides):
  c = md.default_data_config()
  c.builtin.num_docs = 60
  c.builtin.num_eval_docs = 12
  for key, value in builtin_overrides.items():
    c.builtin[key] = value
  return c


def pipeline(c, **kwargs):
  defaults = dict(seq_len=32, global_batch_size=4, split="train", seed=0, process_index=0,
                  process_count=1)
  return md.make_pipeline(c, **{**defaults, **kwargs})


def take(it, n):
  return [next(it) for _ in range(n)]


def epoch(it):
  return list(it)


def reconstruct_documents(batches, bos_id):
  """Follows each global row across batches and re-assembles the packed documents."""
  docs, current = [], {}
  for batch in batches:
    for r in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        assert np.all(np.diff(idx) == 1), "segments must be contiguous"
        inputs, targets = batch["inputs"][r, idx], batch["targets"][r, idx]
        assert np.array_equal(batch["positions"][r, idx], np.arange(idx.size))
        assert np.array_equal(inputs[1:], targets[:-1]), "targets are the next inputs"
        if inputs[0] == bos_id:
          if r in current:
            docs.append(current.pop(r))
          current[r] = [int(inputs[0])]
        current[r].extend(int(t) for t in targets)
  docs.extend(current.values())
  return docs


def tokenized_documents(source, tokenizer):
  return [[tokenizer.bos_id] + tokenizer.encode(source.get(i)[0]).tolist() + [tokenizer.eos_id]
          for i in range(source.num_docs)]


def run_python(code, env=None):
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


# --- imports -------------------------------------------------------------------------------------


def test_moejax_imports_do_not_import_tensorflow():
  out = run_python("""
      import sys, moejax, moejax.sharding, moejax.data
      c = moejax.data.default_data_config()
      next(moejax.data.make_pipeline(c, seq_len=8, global_batch_size=2, split='train', seed=0,
                                     process_index=0, process_count=1))
      print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow',
                                                                  'tensorflow_datasets')))
  """)
  assert out.strip() == "[]"


# --- built-in corpus -----------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_seeded():
  docs = lambda seed: [builtin.make_document(seed, "train", i) for i in range(40)]
  assert docs(0) == docs(0)
  assert docs(0) != docs(1)
  assert builtin.make_document(0, "train", 3) != builtin.make_document(0, "validation", 3)
  c0, c1 = small_config(seed=0), small_config(seed=1)
  b0 = take(pipeline(c0), 3)
  b0_again = take(pipeline(small_config(seed=0)), 3)
  b1 = take(pipeline(c1), 3)
  for x, y in zip(b0, b0_again):
    for key in md.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(b0, b1))
  # The shuffle seed changes the order but not the corpus.
  assert not np.array_equal(take(pipeline(c0, seed=5), 1)[0]["inputs"], b0[0]["inputs"])


def test_builtin_domains_have_distinct_vocabularies():
  chars = {d: set() for d in range(len(builtin.DOMAIN_NAMES))}
  for i in range(400):
    text, domain = builtin.make_document(0, "train", i)
    assert domain == i % len(builtin.DOMAIN_NAMES)
    chars[domain] |= set(text) - set(" \n")
  assert chars[0] <= set("0123456789+-=")
  assert set("abcdefghijklm") & chars[1] and not set("nopqrstuvwxyz") & (chars[1] - set("copy"))
  assert chars[2] - set("REV=") <= set("ABCDEFGHIJKLM")
  assert chars[5] <= set("()[]{}<>")
  for a in range(8):
    for b in range(a + 1, 8):
      assert chars[a] != chars[b]


def test_domain_ids_follow_tokens():
  c = small_config(num_domains=3)
  for batch in take(pipeline(c), 4):
    domain, mask = batch["domain"], batch["mask"]
    assert np.all(domain[mask == 0] == -1)
    assert set(np.unique(domain[mask == 1])) <= {0, 1, 2}
    # One domain per segment.
    for r in range(domain.shape[0]):
      for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
        assert np.unique(domain[r][batch["segment_ids"][r] == s]).size == 1


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,batch", [(32, 4), (7, 3), (4096, 2)])
def test_packing_keeps_every_token_exactly_once(seq_len, batch):
  c = small_config()
  it = pipeline(c, seq_len=seq_len, global_batch_size=batch, num_epochs=1)
  batches = epoch(it)
  assert batches, "an epoch must not be empty"
  for b in batches:
    assert set(b) == set(md.BATCH_KEYS)
    for value in b.values():
      assert value.dtype == np.int32 and value.shape == (batch, seq_len)
    np.testing.assert_array_equal(b["mask"], b["segment_ids"] > 0)
    assert np.all(b["inputs"][b["mask"] == 0] == 0) and np.all(b["targets"][b["mask"] == 0] == 0)
  tok = md.get_tokenizer(c)
  expected = tokenized_documents(it.source, tok)
  got = reconstruct_documents(batches, tok.bos_id)
  assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
  if seq_len == 4096:  # longer than any document: several whole documents per row, one batch
    assert len(batches) == 1
  # Padding only once a row's stream has run out: at the end of the row, then whole rows.
  masks = np.stack([b["mask"] for b in batches])  # [steps, rows, seq_len]
  flat = masks.transpose(1, 0, 2).reshape(batch, -1)
  assert np.all(np.diff(flat, axis=1) <= 0)


def test_repeat_crosses_epochs_with_new_order():
  c = small_config()
  tok = md.get_tokenizer(c)
  source = md.get_source(c, "train")
  total = sum(len(d) - 1 for d in tokenized_documents(source, tok))
  it = pipeline(c, seq_len=64, global_batch_size=2)
  tokens = 0
  for _ in range(3 * total // (64 * 2) + 1):  # > 3 epochs, never padded
    b = next(it)
    assert b["mask"].all()
    tokens += b["mask"].sum()
  assert tokens > 3 * total


# --- resume and multi-process --------------------------------------------------------------------


def test_resume_from_state_sees_identical_batches():
  c = small_config()
  reference = take(pipeline(c, seq_len=24, global_batch_size=4), 12)
  it = pipeline(c, seq_len=24, global_batch_size=4)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  resumed = pipeline(c, seq_len=24, global_batch_size=4)
  resumed.set_state(state)
  for x, y in zip(take(resumed, 7), reference[5:]):
    for key in md.BATCH_KEYS:
      np.testing.assert_array_equal(x[key], y[key])
  other = pipeline(c, seq_len=25, global_batch_size=4)
  with pytest.raises(ValueError, match="seq_len"):
    other.set_state(state)


def test_process_split_is_disjoint_and_equals_single_process():
  c = small_config()
  single = take(pipeline(c, global_batch_size=4), 6)
  halves = [take(pipeline(c, global_batch_size=4, process_index=p, process_count=2), 6)
            for p in range(2)]
  for step, full in enumerate(single):
    for key in md.BATCH_KEYS:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), full[key])
  # Disjoint documents: the two processes reassemble different documents.
  tok = md.get_tokenizer(c)
  docs = [set(map(tuple, reconstruct_documents(h, tok.bos_id)[:-2])) for h in halves]
  assert docs[0] and docs[1] and not docs[0] & docs[1]


def test_a_single_process_state_resumes_on_two_processes():
  """The state holds every global row: two processes each take theirs and continue the stream."""
  c = small_config()
  reference = take(pipeline(c, global_batch_size=4), 9)
  it = pipeline(c, global_batch_size=4)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  assert len(state["next_doc"]) == 4
  halves = []
  for p in range(2):
    half = pipeline(c, global_batch_size=4, process_index=p, process_count=2)
    half.set_state(state)
    halves.append(take(half, 4))
  for step, full in enumerate(reference[5:]):
    for key in md.BATCH_KEYS:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), full[key])
  with pytest.raises(RuntimeError, match="call it in each process"):
    pipeline(c, global_batch_size=4, process_index=0, process_count=2).get_state()
  old = {**state, "format": "moejax.data.packed/1", "process_index": 0, "process_count": 2,
         "next_doc": state["next_doc"][:2], "offset": state["offset"][:2]}
  with pytest.raises(ValueError, match="old format that kept one process's rows"):
    pipeline(c, global_batch_size=4).set_state(old)


def test_global_batch_on_mesh():
  import jax
  from moejax import sharding
  mesh = sharding.make_mesh({"data": -1, "expert": 2})
  c = small_config()
  batch = next(pipeline(c, global_batch_size=8, mesh=mesh))
  local = next(pipeline(c, global_batch_size=8))
  for key in md.BATCH_KEYS:
    assert isinstance(batch[key], jax.Array)
    assert batch[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh, 2), 2)
    np.testing.assert_array_equal(np.asarray(batch[key]), local[key])
  with pytest.raises(ValueError, match="global_batch_size=4"):
    pipeline(c, global_batch_size=4, mesh=sharding.make_mesh({"data": 8}))


# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_specials_and_undecodable_bytes():
  tok = md.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  ids = tok.encode("héllo")
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == "héllo"
  raw = tok.encode(b"a\xffb")  # raw bytes keep their value
  np.testing.assert_array_equal(raw, [ord("a") + 3, 0xFF + 3, ord("b") + 3])
  assert tok.decode(raw) == "a\ufffdb"
  assert tok.decode([1] + list(ids) + [2, 0, 0]) == "héllo"


def test_sentencepiece_trained_once_and_cached(tmp_path):
  c = small_config()
  c.cache_dir = str(tmp_path)
  c.tokenizer = "sentencepiece"
  c.sentencepiece.vocab_size = 120
  tok = md.get_tokenizer(c)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert 4 < tok.vocab_size <= 120
  assert os.path.dirname(tok.model_path).startswith(str(tmp_path))
  mtime = os.path.getmtime(tok.model_path)
  again = md.get_tokenizer(c)
  assert again.model_path == tok.model_path and os.path.getmtime(again.model_path) == mtime
  text = builtin.make_document(0, "train", 5)[0].replace("\n", " ")
  ids = tok.encode(text)
  assert ids.min() > 2 and tok.decode(ids) == text
  b = next(pipeline(c, tokenizer=tok))
  assert b["inputs"].max() < tok.vocab_size and b["inputs"][0, 0] == tok.bos_id
  c.sentencepiece.model_path = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="model_path"):
    md.get_tokenizer(c)


# --- TFDS (mock) ---------------------------------------------------------------------------------


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds
  c = md.default_data_config()
  c.source, c.tfds.name = "tfds", "lm1b"
  with tfds.testing.mock_data(num_examples=24):
    it = pipeline(c, seq_len=16, global_batch_size=4, num_epochs=1)
    assert it.source.num_docs == 24
    batches = epoch(it)
    tok = md.ByteTokenizer()
    expected = tokenized_documents(it.source, tok)
    assert sorted(map(tuple, reconstruct_documents(batches, tok.bos_id))) == sorted(
        map(tuple, expected))
    assert all(np.all(b["domain"] == -1) for b in batches)
    c.tfds.text_key = "body"
    with pytest.raises(ValueError, match="text_key='body'"):
      pipeline(c)


def test_tfds_missing_dataset_and_data_dir(tmp_path):
  c = md.default_data_config()
  c.source, c.tfds.name, c.tfds.data_dir = "tfds", "lm1b", str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline(c)
  c.tfds.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    pipeline(c)


# --- local text files ----------------------------------------------------------------------------


def write_corpus(path, num_docs=40, seed=0):
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta"]
  paras = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(num_docs)]
  path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
  return paras


def test_text_files_build_then_read_in_fresh_processes(tmp_path):
  paras = write_corpus(tmp_path / "a.txt", 30) + write_corpus(tmp_path / "b.txt", 10, seed=1)
  cache = tmp_path / "cache"
  setup = textwrap.dedent(f"""
      import json, sys, moejax.data as md
      c = md.default_data_config()
      c.source, c.cache_dir = 'text_files', {str(cache)!r}
      c.text_files.paths = {str(tmp_path / '*.txt')!r}
      c.text_files.held_out_fraction = 0.25
  """)
  run_python(setup + "md.sources.build_text_files_dataset(c)\n")
  out = run_python(setup + textwrap.dedent("""
      tok = md.get_tokenizer(c)
      docs = {}
      for split in ('train', 'validation'):
        it = md.make_pipeline(c, seq_len=64, global_batch_size=2, split=split, seed=0,
                              num_epochs=1, process_index=0, process_count=1)
        docs[split] = [tok.decode(tok.encode(it.source.get(i)[0]))
                       for i in range(it.source.num_docs)]
        assert sum(b['mask'].sum() for b in it) > 0
      assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules), 'read imported TF'
      print(json.dumps(docs))
  """))
  docs = json.loads(out.strip().splitlines()[-1])
  assert len(docs["validation"]) == 10 and len(docs["train"]) == 30
  assert not set(docs["train"]) & set(docs["validation"])
  assert sorted(docs["train"] + docs["validation"]) == sorted(paras)


def test_text_files_label_each_document_with_its_path_or_glob(tmp_path):
  """Each comma-separated entry is a domain: a file's documents carry the index of the first entry
  that matches it, in the source and in every token of `batch['domain']`."""
  (tmp_path / "code").mkdir()
  prose = write_corpus(tmp_path / "prose.txt", 12)
  code = write_corpus(tmp_path / "code" / "a.py", 6, seed=1) + write_corpus(
      tmp_path / "code" / "b.py", 6, seed=2)
  c = md.default_data_config()
  c.source, c.cache_dir, c.text_files.held_out_fraction = "text_files", str(tmp_path / "c"), 0.0
  c.text_files.paths = f"{tmp_path / 'code' / '*.py'},{tmp_path / 'prose.txt'}"
  assert md.domain_names(c) == ["code/*.py", "prose"]
  c.text_files.paths = "data/wiki_*.txt,a/b.txt"
  assert md.domain_names(c) == ["wiki_*", "b"]
  c.text_files.paths = f"{tmp_path / 'code' / '*.py'},{tmp_path / 'prose.txt'}"
  it = pipeline(c, seq_len=64, num_epochs=1)
  by_text = {bytes(it.source.get(i)[0]).decode(): it.source.get(i)[1]
             for i in range(it.source.num_docs)}
  assert by_text == {**{d: 1 for d in prose}, **{d: 0 for d in code}}
  for batch in it:  # Every real token carries its document's domain; padding -1.
    assert set(np.unique(batch["domain"][batch["mask"] > 0])) <= {0, 1}
    assert (batch["domain"][batch["segment_ids"] == 0] == -1).all()


def test_text_files_concurrent_builds_are_atomic(tmp_path):
  """Two processes building the same dataset at once (two hosts of one run) both succeed, read
  the same documents, and leave no half-built directory behind."""
  paras = write_corpus(tmp_path / "a.txt", 200)
  cache = tmp_path / "cache"
  code = textwrap.dedent(f"""
      import json, moejax.data as md
      c = md.default_data_config()
      c.source, c.cache_dir = 'text_files', {str(cache)!r}
      c.text_files.paths = {str(tmp_path / 'a.txt')!r}
      path = md.sources.build_text_files_dataset(c)
      src = md.sources.get_source(c, 'train')
      docs = [src.get(i)[0] for i in range(src.num_docs)]
      print(json.dumps([path, sorted(d.decode() if isinstance(d, bytes) else d for d in docs)]))
  """)
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert outs[0] == outs[1] and len(outs[0][1]) == 190  # 5% of 200 held out.
  assert set(outs[0][1]) <= set(paras)
  leftovers = [d for d in os.listdir(cache / "text_files") if ".tmp-" in d]
  assert leftovers == []


def test_text_files_errors_and_undecodable_bytes(tmp_path):
  c = md.default_data_config()
  c.source, c.cache_dir = "text_files", str(tmp_path / "cache")
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"caf\xe9 au lait\n\nsecond doc\n\nthird\n\nfourth\n")
  c.text_files.paths = str(bad)
  c.text_files.decode_errors = "strict"
  with pytest.raises(ValueError, match="bad.txt is not valid UTF-8 at byte 3"):
    pipeline(c)
  c.text_files.decode_errors = "replace"
  texts = []
  for split in ("train", "validation"):
    source = md.get_source(c, split)
    texts += [source.get(i)[0].decode("utf-8") for i in range(source.num_docs)]
  assert sorted(texts) == sorted(["caf\ufffd au lait", "second doc", "third", "fourth"])
  with pytest.raises(ValueError, match="split='test' does not exist"):
    pipeline(c, split="test")
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n ")
  c.text_files.paths = str(empty)
  with pytest.raises(ValueError, match="empty.txt is empty"):
    pipeline(c)
  c.text_files.paths = str(tmp_path / "nothing*.txt")
  with pytest.raises(FileNotFoundError, match="matches no file"):
    pipeline(c)
  c.text_files.paths = ""
  with pytest.raises(ValueError, match="data.text_files.paths is empty"):
    pipeline(c)
  one = tmp_path / "one.txt"
  one.write_text("a single paragraph\n")
  c.text_files.paths = str(one)
  with pytest.raises(ValueError, match="too few to hold out"):
    pipeline(c)
  c.text_files.doc_split = "sentences"
  with pytest.raises(ValueError, match="doc_split='sentences'"):
    pipeline(c)


# --- other errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,kwargs,match", [
    ("source", "hdf5", {}, "data.source='hdf5' is not supported"),
    ("tokenizer", "wordpiece", {}, "data.tokenizer='wordpiece' is not supported"),
    (None, None, {"split": "test"}, "split='test'"),
    (None, None, {"seq_len": 0}, "seq_len=0"),
    (None, None, {"global_batch_size": 3, "process_count": 2}, "divisible by process_count"),
    (None, None, {"process_index": 2, "process_count": 2}, "process_index=2"),
    ("builtin.num_domains", 9, {}, "num_domains=9"),
    ("builtin.num_docs", 0, {}, "num_docs"),
])
def test_bad_configuration_raises(field, value, kwargs, match):
  c = small_config()
  if field:
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    pipeline(c, **kwargs)


# --- capped training text (data.train_max_bytes / data.train_max_docs) -------------------------


def test_capped_training_split_reads_only_its_documents_and_resumes_exactly():
  c = small_config()
  c.train_max_docs = 15
  capped = md.get_source(c, "train")
  full = md.get_source(small_config(), "train")
  assert capped.num_docs == 15 and capped.key != full.key
  kept = {capped.get(i)[0] for i in range(capped.num_docs)}
  assert kept < {full.get(i)[0] for i in range(full.num_docs)}
  # One epoch of the pipeline holds exactly the capped documents' tokens.
  it = pipeline(c, seq_len=32, global_batch_size=4, num_epochs=1)
  tok = md.get_tokenizer(c)
  got = reconstruct_documents(epoch(it), tok.bos_id)
  assert sorted(map(tuple, got)) == sorted(map(tuple, tokenized_documents(capped, tok)))
  # Evaluation is never capped.
  assert md.get_source(c, "validation").num_docs == c.builtin.num_eval_docs
  # Resume: identical batches; a checkpoint of another cap is refused.
  reference = take(pipeline(c, seq_len=24, global_batch_size=4), 10)
  it = pipeline(c, seq_len=24, global_batch_size=4)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline(c, seq_len=24, global_batch_size=4)
  resumed.set_state(state)
  for x, y in zip(take(resumed, 6), reference[4:]):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  c.train_max_docs = 16
  with pytest.raises(ValueError, match="train_max_docs=16"):
    pipeline(c, seq_len=24, global_batch_size=4).set_state(state)


def test_byte_caps_are_nested_fixed_subsets():
  def docs(**cap):
    c = small_config()
    c.update(cap)
    source = md.get_source(c, "train")
    return [source.get(i)[0] for i in range(source.num_docs)]
  small, large = docs(train_max_bytes=1_000), docs(train_max_bytes=3_000)
  assert set(small) < set(large) and small == docs(train_max_bytes=1_000)
  for texts, cap in ((small, 1_000), (large, 3_000)):
    sizes = [len(t.encode()) for t in texts]
    assert sum(sizes) >= cap > sum(sizes) - max(sizes)  # stops at the document crossing the cap


@pytest.mark.parametrize("cap, match", [
    (dict(train_max_bytes=0), r"data.train_max_bytes=0: allowed values are integers >= 1"),
    (dict(train_max_docs=0), r"data.train_max_docs=0: allowed"),
    (dict(train_max_docs=61), r"data.train_max_docs=61 exceeds the 60 documents"),
    (dict(train_max_bytes=10**9), r"data.train_max_bytes=1000000000 exceeds the \d+ bytes"),
    (dict(train_max_bytes=100, train_max_docs=5), "both set"),
])
def test_bad_training_caps_are_named(cap, match):
  c = small_config()
  c.update(cap)
  with pytest.raises(ValueError, match=match):
    md.get_source(c, "train")
