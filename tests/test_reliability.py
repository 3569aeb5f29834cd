"""A micro kill campaign: a run killed (SIGKILL) and preempted (SIGTERM) at random moments and
restarted each time ends bit-identical to an uninterrupted run (experiments/kill_campaign.py)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import kill_campaign  # noqa: E402


def test_killed_and_preempted_run_ends_bit_identical(tmp_path):
  summary = kill_campaign.run_campaign(str(tmp_path), kills=2, signals=["TERM", "KILL"],
                                       steps=12, seed=0, log=lambda _: None)
  assert summary["kills"] >= 1, summary  # The first signal lands before the run can finish.
  assert summary["events"][0]["signal"] == "TERM" and summary["events"][0]["exit_code"] == 0
  assert summary["metrics_identical"] and not summary["duplicated_steps"], summary
  assert not summary["missing_steps"] and summary["arrays"] > 0
  assert summary["arrays_differing"] == [], summary
  assert summary["ok"]
