"""experiments/sweep.py runs a config's sweep() and tabulates the final eval metrics."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(os.path.dirname(__file__), "sweep_config.py")


def test_sweep_runs_every_entry_and_seed(tmp_path, monkeypatch):
  from moejax.study import runner  # pylint: disable=import-outside-toplevel
  released, release = [], runner.release_compiled_programs
  monkeypatch.setattr(runner, "release_compiled_programs",
                      lambda: (released.append(len(list(tmp_path.glob("*/seed*")))), release()))
  records = sweep.run_sweep(f"{CONFIG}:runlocal", str(tmp_path), seeds=[0, 1])
  assert released == [1, 2, 3, 4]  # After each run: a sweep's executables do not pile up.
  assert [(r["overrides"]["model.moe.capacity_factor"], r["seed"]) for r in records] == [
      (0.5, 0), (0.5, 1), (2.0, 0), (2.0, 1)]
  # Seeds differ; the train capacity factor changes what the model learns.
  assert records[0]["ce"] != records[1]["ce"]
  assert records[0]["ce"] != records[2]["ce"]
  table = sweep.format_table(records)
  assert table.count("\n") == 3 and "model.moe.capacity_factor=0.5 | 2 |" in table
  assert "±" in table
  # A finished run is not trained again: the trainer resumes at the last step and only
  # re-evaluates, so no train record is added to its metrics.jsonl.
  def train_lines():
    return sum(line.count('"split": "train"') for path in tmp_path.glob("*/seed*/metrics.jsonl")
               for line in path.read_text().splitlines())
  before = train_lines()
  again = sweep.run_sweep(f"{CONFIG}:runlocal", str(tmp_path), seeds=[0, 1])
  assert train_lines() == before > 0
  assert [r["ce"] for r in again] == [r["ce"] for r in records]
