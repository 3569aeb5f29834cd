"""Using a trained run: experiments/evaluate.py reproduces the trainer's eval on any mesh and
measures other text; experiments/sample.py generates from a checkpoint; clear errors."""

import json
import math
import re
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import causal_leak as causal_leak_cli  # noqa: E402
import evaluate as evaluate_cli  # noqa: E402
import sample as sample_cli  # noqa: E402
from moejax import evaluation, train  # noqa: E402
from moejax.data.tokenizers import ByteTokenizer  # noqa: E402
from test_train import _config  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """8 steps on the (data=2, expert=4) mesh, eval at a capacity factor that drops."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(**{"model.moe.eval_capacity_factor": 0.5, "eval_steps": 2})
  final = train.train_and_evaluate(config, workdir)
  return workdir, final


def test_evaluate_reproduces_the_trainers_eval_on_another_mesh(run):
  workdir, final = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f if '"eval"' in line][-1]
  trainer_drop = np.mean([np.mean(v) for k, v in last.items()
                          if k.startswith("moe/layer") and k.endswith("/dropped_fraction")])
  for mesh_shape in (None, {"data": 8}):  # The run's (2, 4) mesh, then data-parallel only.
    result = evaluation.evaluate_run(workdir, capacity_factors=(0.5, math.inf),
                                     mesh_shape=mesh_shape)["results"]
    assert result["eval"]["ce"] == pytest.approx(final["ce"], rel=1e-5)
    assert result["nodrop"]["ce"] == pytest.approx(final["nodrop/ce"], rel=1e-5)
    assert result["eval"]["accuracy"] == pytest.approx(final["accuracy"], rel=1e-5)
    assert result["eval"]["drop"] == pytest.approx(trainer_drop, rel=1e-4) and trainer_drop > 0
    assert result["cf0.5"]["ce"] == pytest.approx(result["eval"]["ce"], rel=1e-6)
    assert result["nodrop"]["drop"] == 0.0


def test_evaluate_other_text_writes_table_json_and_curve(run, tmp_path, capfd):
  workdir, _ = run
  text = tmp_path / "other.txt"
  text.write_text("\n\n".join(f"paragraph {i}: the quick brown fox, ünïcode {i * i}"
                              for i in range(40)), encoding="utf-8")
  out = tmp_path / "eval"
  result = evaluate_cli.main([f"--workdir={workdir}", f"--data={text}",
                              "--capacity_factors=1,2,inf", f"--out={out}",
                              "--mesh=data=4,expert=2"])
  rows = result["results"]
  assert set(rows) == {"eval", "nodrop", "cf1", "cf2"}
  # Every byte of the 40 paragraphs is a target once (plus one EOS per paragraph, 0 bytes).
  body_bytes = sum(len(p.encode()) for p in text.read_text(encoding="utf-8").split("\n\n"))
  assert rows["nodrop"]["bytes"] == body_bytes
  assert rows["nodrop"]["tokens"] == body_bytes + 40
  r = rows["nodrop"]
  assert r["bits_per_byte"] == pytest.approx(r["ce"] * r["tokens"] / (r["bytes"] * math.log(2)))
  assert rows["cf1"]["drop"] >= rows["cf2"]["drop"] >= 0.0
  assert {p.name for p in out.iterdir()} == {"eval.md", "eval.json", "capacity_curve.png"}
  assert "| nodrop | inf |" in (out / "eval.md").read_text()
  # It says what it does (a progress line with ETA), and not TFDS's "Downloading and preparing
  # dataset Unknown size" for a local file.
  printed = capfd.readouterr()
  assert re.search(r"evaluate: \d+/\d+ \(100%\), ETA 0:00", printed.err), printed.err
  assert "Downloading and preparing" not in printed.out + printed.err


def test_byte_lengths_of_the_byte_tokenizer():
  lengths = evaluation.token_byte_lengths(ByteTokenizer(), 300)
  assert lengths[:3].tolist() == [0, 0, 0] and lengths[3:259].tolist() == [1] * 256
  assert lengths[259:].sum() == 0  # Embedding rows past the vocabulary are never targets.


def test_sample_cli_generates_from_the_checkpoint(run, capsys):
  workdir, _ = run
  argv = [f"--workdir={workdir}", "--prompt=ab", "--prompt=hello world", "--max_new_tokens=6",
          "--temperature=0"]
  texts = sample_cli.main(argv + ["--mesh=data=8"])
  assert len(texts) == 2 and "'hello world'" in capsys.readouterr().out
  assert sample_cli.main(argv) == texts  # Greedy: the same on the run's (2, 4) mesh.


@pytest.mark.parametrize("argv, error, match", [
    (["--prompt="], ValueError, "prompt 0"),
    (["--prompt=x", "--max_new_tokens=40"], ValueError, "seq_len=31"),
    (["--prompt=x", "--step=5"], FileNotFoundError,
     r"no checkpoint of step 5; saved steps: \[4, 8\]"),
    (["--prompt=x", "--mesh=data=3"], ValueError, "mesh"),
])
def test_sample_cli_errors_name_the_problem(run, argv, error, match, monkeypatch):
  def built(*args, **kwargs):
    raise AssertionError("the model was built before the bad argument was found")
  monkeypatch.setattr(train, "create_model_and_optimizer", built)
  with pytest.raises(error, match=match):
    sample_cli.main([f"--workdir={run[0]}", *argv])


def test_sample_cli_refuses_an_expert_choice_run_before_loading_it(run, tmp_path, monkeypatch):
  with open(os.path.join(run[0], "config.json")) as f:
    config = json.load(f)
  config["model"]["moe"].update(choice="expert", capacity_factor=1.0, eval_capacity_factor=1.0)
  (tmp_path / "config.json").write_text(json.dumps(config))
  def built(*args, **kwargs):
    raise AssertionError("the model was built before the bad argument was found")
  monkeypatch.setattr(train, "create_model_and_optimizer", built)
  with pytest.raises(ValueError, match="choice='expert'"):
    sample_cli.main([f"--workdir={tmp_path}", "--prompt=The"])


def test_a_workdir_without_a_checkpoint_is_a_clear_error(run, tmp_path):
  with open(os.path.join(run[0], "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    evaluation.evaluate_run(str(tmp_path))
  with pytest.raises(ValueError, match="capacity_factors"):
    evaluate_cli.main([f"--workdir={run[0]}", "--capacity_factors=0,1"])


def test_causal_leak_cli_at_the_train_capacity_factor_over_a_glob(run, tmp_path, capsys,
                                                                  monkeypatch):
  workdir, _ = run
  train_cf = train.load_run_config(workdir).model.moe.capacity_factor
  for seed in (0, 1):  # Two copies of the run: one arm of a study, two "seeds".
    shutil.copytree(workdir, tmp_path / "arm" / f"seed{seed}")
  released = []
  monkeypatch.setattr(causal_leak_cli.runner, "release_compiled_programs",
                      lambda: released.append(len(capsys.readouterr().out.split("# ")) - 1))
  results = causal_leak_cli.main([f"--workdir={tmp_path}/arm/seed*", "--capacity_factor=train",
                                  "--positions=3"])
  assert len(results) == 2 and released == [1, 1]  # After each run (its report just printed).
  r0, r1 = results.values()
  assert r0 == r1 and r0["capacity_factor"] == train_cf and r0["positions"] == 3
  assert r0["leak"] == pytest.approx(r0["causal_ce"] - r0["teacher_forced_ce"])
  assert f"| arm | 2 | {train_cf:g} | {r0['teacher_forced_ce']:.4f} |" in capsys.readouterr().out

  def built(*args, **kwargs):
    raise AssertionError("the model was built before the bad argument was found")
  monkeypatch.setattr(train, "create_model_and_optimizer", built)
  with pytest.raises(ValueError, match="--capacity_factor='half'; allowed: a number, or 'train'"):
    causal_leak_cli.main([f"--workdir={workdir}", "--capacity_factor=half"])
  with pytest.raises(FileNotFoundError, match="matches no directory"):
    causal_leak_cli.main([f"--workdir={workdir}-missing*"])
