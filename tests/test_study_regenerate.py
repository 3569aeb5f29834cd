"""Science anyone can regenerate: run keys that name data by content, not path; the one-time
migration of committed keys; committed tables that `--report_only` rewrites byte for byte from a
copy of the results anywhere."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from moejax import config as config_lib  # noqa: E402
from moejax import study  # noqa: E402
import micro_study  # noqa: E402  (tests/)
from moejax.study import keys  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
TEXT = "The first paragraph of a corpus.\n\nA second one, longer than the first.\n"


def _write(path, text=TEXT):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _config(data):
  c = config_lib.load_config("configs/dense.py:runlocal")
  config_lib.apply_overrides(c, config_lib.data_overrides(data))
  return c


def test_key_names_text_files_by_name_size_and_hash_not_path(tmp_path):
  a = _write(tmp_path / "here" / "corpus.txt")
  b = _write(tmp_path / "there" / "deeper" / "corpus.txt")
  assert keys.config_key(_config(a)) == keys.config_key(_config(b))
  assert keys.path_config_key(_config(a)) != keys.path_config_key(_config(b))
  assert keys.data_identity(a).startswith(f"corpus.txt:{len(TEXT)}:")
  # Where derived data or TFDS datasets are stored is not part of a run.
  moved = _config(a)
  moved.data.cache_dir, moved.data.tfds.data_dir = "/elsewhere", "gs://bucket/tfds"
  assert keys.config_key(moved) == keys.config_key(_config(a))
  # Another name, or edited content, is other data.
  renamed = _write(tmp_path / "x" / "other.txt")
  assert keys.config_key(_config(renamed)) != keys.config_key(_config(a))
  _write(b, TEXT + "\nA third paragraph.\n")
  assert keys.config_key(_config(b)) != keys.config_key(_config(a))
  # A glob is its matches, sorted by name.
  _write(tmp_path / "g" / "2.txt", "two")
  _write(tmp_path / "g" / "1.txt", "one")
  ident = keys.data_identity(str(tmp_path / "g" / "*.txt"))
  assert ident.startswith("1.txt:3:") and "+2.txt:3:" in ident
  with pytest.raises(FileNotFoundError, match="matches no file"):
    keys.data_identity(str(tmp_path / "nothing" / "*.txt"))


def _fake_train(calls):
  return micro_study.fake_train(calls)


def _study(name="s"):
  arms = tuple(study.Arm(f"lr {lr}", "configs/dense.py:runlocal", {"optim.learning_rate": lr})
               for lr in (1e-3, 2e-3))
  return study.Study(name=name, paper="", claim="", seeds=(0, 1, 2), scales={"cpu": {}},
                     arms=arms, claims=(study.Better("lower lr", "lr 0.001", "lr 0.002"),))


def test_a_study_moved_with_its_data_resumes_and_reports_identically(tmp_path, monkeypatch):
  calls = []
  monkeypatch.chdir(tmp_path)
  data_a = _write(tmp_path / "a" / "data" / "corpus.txt")
  os.makedirs("a/results")
  study.run_study(_study(), "a/results", data=data_a, train_fn=_fake_train(calls),
                  log=lambda _: None)
  assert len(calls) == 6
  table_a, _ = study.report(_study(), "a/results", plots=False)
  # The same results and data under other paths (another machine, another clone).
  shutil.copytree(tmp_path / "a", tmp_path / "b" / "elsewhere")
  shutil.rmtree(tmp_path / "a")
  monkeypatch.chdir(tmp_path / "b")
  data_b = "elsewhere/data/corpus.txt"
  records = study.run_study(_study(), "elsewhere/results", data=data_b,
                            train_fn=_fake_train(calls), log=lambda _: None)
  assert len(calls) == 6 and len(records) == 12  # nothing trained again
  table_b, _ = study.report(_study(), "elsewhere/results", plots=False)
  assert table_b == table_a.replace("--workdir=a/results", "--workdir=elsewhere/results")
  assert "--data=../shared/data/corpus.txt" in table_b and "`corpus.txt:" in table_b
  # Other content under the same name is refused, not mixed in.
  _write(data_b, TEXT + "edited\n")
  with pytest.raises(ValueError, match="other settings"):
    study.run_study(_study(), "elsewhere/results", data=data_b, train_fn=_fake_train(calls),
                    log=lambda _: None)


def _as_before_migration(study_dir, data, source_data):
  """Rewrites a study written by today's code as the code before the migration wrote it: path
  keys, and (text files) the data named by the path given. Returns {path key: identity key}."""
  text = (study_dir / "results.jsonl").read_text()
  mapping = {}
  for arm in _study().arms:
    for seed in _study().seeds:
      config = study.arm_config(_study(), arm, seed, "cpu", config_lib.data_overrides(data))
      old_key, new_key = keys.path_config_key(config), keys.config_key(config)
      assert old_key != new_key and new_key in text
      text = text.replace(new_key, old_key)
      mapping[old_key] = new_key
  (study_dir / "results.jsonl").write_text(text)
  (study_dir / "study.json").write_text(json.dumps(
      {"study": "s", "scale": "cpu", "data": source_data, "tokenizer": "byte"}, indent=2))
  return mapping


@pytest.mark.parametrize("source", ["text", "builtin"])
def test_migration_rekeys_path_keyed_results_and_interrupted_runs(source, tmp_path, monkeypatch):
  import migrate_study_keys  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  data = _write(tmp_path / "data" / "corpus.txt") if source == "text" else "builtin"
  study.run_study(_study(), "results", data=data, train_fn=_fake_train([]), log=lambda _: None)
  study_dir = tmp_path / "results" / "s"
  current = {f: (study_dir / f).read_text() for f in ("results.jsonl", "study.json")}
  mapping = _as_before_migration(study_dir, data, data)
  old_key = next(iter(mapping))
  run_key = study_dir / "runs" / "lr_0.001" / "seed0" / "config_key"
  run_key.write_text(old_key)  # an interrupted run's directory, keyed the old way
  old = {f: (study_dir / f).read_text() for f in ("results.jsonl", "study.json")}

  # A record the study cannot reproduce (here: an edited scale) is reported; nothing is written.
  edited = study.Study(**{**_study().__dict__, "scales": {"cpu": {"num_train_steps": 7}}})
  problems = migrate_study_keys.migrate(edited, str(study_dir))
  assert len(problems) == 6 and "is not this study's config" in problems[0]
  assert {f: (study_dir / f).read_text() for f in old} == old and run_key.read_text() == old_key

  assert migrate_study_keys.migrate(_study(), str(study_dir)) == []
  assert (study_dir / "results.jsonl").read_text() == current["results.jsonl"]
  assert json.loads((study_dir / "study.json").read_text()) == json.loads(current["study.json"])
  assert run_key.read_text() == mapping[old_key]
  # A second run changes nothing; nor does finishing an interrupted one (keys half rewritten).
  assert migrate_study_keys.migrate(_study(), str(study_dir)) == []
  assert (study_dir / "results.jsonl").read_text() == current["results.jsonl"]
  half = old["results.jsonl"].split("\n")
  half = "\n".join(current["results.jsonl"].split("\n")[:3] + half[3:])
  (study_dir / "results.jsonl").write_text(half)
  (study_dir / "study.json").write_text(old["study.json"])
  assert migrate_study_keys.migrate(_study(), str(study_dir)) == []
  assert (study_dir / "results.jsonl").read_text() == current["results.jsonl"]


def _committed_studies():
  return sorted(name for name in os.listdir(RESULTS)
                if os.path.exists(os.path.join(RESULTS, name, "table.md"))
                and os.path.exists(os.path.join(ROOT, "experiments", "studies", f"{name}.py")))


def _copy_results(dest):
  """results.jsonl and study.json of every committed study (no tables, plots or runs)."""
  for name in os.listdir(RESULTS):
    for file in ("results.jsonl", "study.json"):
      src = os.path.join(RESULTS, name, file)
      if os.path.exists(src):
        os.makedirs(os.path.join(dest, name), exist_ok=True)
        shutil.copy(src, os.path.join(dest, name, file))


def test_every_committed_table_regenerates_byte_for_byte(tmp_path, monkeypatch):
  from reproduce import load_study  # pylint: disable=import-outside-toplevel
  _copy_results(tmp_path / "experiments" / "results")
  monkeypatch.chdir(tmp_path)
  names = _committed_studies()
  assert len(names) >= 10
  for name in names:
    table, _ = study.report(load_study(name), "experiments/results", plots=False)
    with open(os.path.join(RESULTS, name, "table.md")) as f:
      assert table == f.read(), f"{name}: table.md is not what its results.jsonl gives"


def test_report_only_from_another_clone_with_data_elsewhere(tmp_path):
  """The command written in a table, run from a directory that is not this checkout, with the
  corpus under another path, rewrites the table byte for byte."""
  name = "balance_loss"
  _copy_results(tmp_path / "experiments" / "results")
  command = open(os.path.join(RESULTS, name, "table.md")).read().split("```\n")[-2].strip()
  assert command.startswith(f"python experiments/reproduce.py --study={name} ")
  args = [a for a in command.split()[2:] if not a.startswith("--data=")]
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "reproduce.py"), *args,
                        "--report_only"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(RESULTS, name, "table.md")) as f:
    assert (tmp_path / "experiments" / "results" / name / "table.md").read_text() == f.read()
  assert (tmp_path / "experiments" / "results" / name / "forest.png").exists()


def test_the_results_page_is_what_the_tables_give(tmp_path):
  """docs/results.md is generated: rerunning its command on the committed tables and results
  gives the committed page (a table updated without the page fails here)."""
  results = tmp_path / "experiments" / "results"
  _copy_results(results)
  for name in os.listdir(RESULTS):
    if os.path.exists(os.path.join(RESULTS, name, "table.md")):
      (results / name).mkdir(exist_ok=True)
      shutil.copy(os.path.join(RESULTS, name, "table.md"), results / name / "table.md")
  (tmp_path / "docs").mkdir()
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "results_page.py"),
                        "--workdir=experiments/results", "--out=docs/results.md"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(os.path.join(ROOT, "docs", "results.md")) as f:
    assert (tmp_path / "docs" / "results.md").read_text() == f.read()
