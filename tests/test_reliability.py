"""A micro kill campaign: a run killed (SIGKILL) and preempted (SIGTERM) at random moments and
restarted each time ends bit-identical to an uninterrupted run (experiments/kill_campaign.py)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import kill_campaign  # noqa: E402


def test_killed_and_preempted_run_ends_bit_identical(tmp_path):
  summary = kill_campaign.run_campaign(str(tmp_path), kills=3, signals=["TERM", "KILL"],
                                       steps=12, seed=0, log=lambda _: None)
  assert summary["kills"] >= 1, summary  # The first signal lands before the run can finish.
  first = summary["events"][0]
  assert first["signal"] == "TERM" and first["exit_code"] == 0, first
  # SIGTERM: the step it was on is saved and the next attempt resumes there.
  assert first["preempted_at"] == first["last_step_logged"] == first["next_resumed_from"], first
  assert summary["sigterm_lost_steps"] == [], summary
  assert summary["metrics_identical"] and not summary["duplicated_steps"], summary
  assert not summary["missing_steps"] and summary["arrays"] > 0
  assert summary["arrays_differing"] == [], summary
  assert summary["ok"]


def _state(n):
  import jax
  from flax import nnx

  class Weights(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jax.random.normal(jax.random.key(0), (n,)))
  return nnx.state(Weights())


def test_a_deleted_checkpoint_directory_is_recreated_by_the_next_save(tmp_path):
  import shutil
  from moejax import checkpoint
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1, keep=2)
  ckpt.save(1, _state(4))
  ckpt.wait()
  shutil.rmtree(directory)  # A user or a cleanup job deletes it while the run goes on.
  ckpt.save(2, _state(4))
  ckpt.close()
  assert checkpoint.saved_steps(str(directory)) == [2]


def test_a_full_disk_names_the_last_complete_checkpoint(tmp_path):
  """A 256 KiB tmpfs: the second save (1 MB of random floats) cannot fit."""
  import subprocess
  import pytest
  from moejax import checkpoint
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                    capture_output=True, check=False).returncode:
    pytest.skip("mounting a small tmpfs needs privileges this machine does not give")
  try:
    ckpt = checkpoint.Checkpointer(str(disk / "checkpoints"), save_every=1, keep=3)
    ckpt.save(1, _state(16))
    ckpt.wait()
    with pytest.raises(OSError, match=r"the disk is full\. The last complete checkpoint is step 1"):
      ckpt.save(2, _state(250_000))
      ckpt.wait()
    assert checkpoint.saved_steps(str(disk / "checkpoints")) == [1]
  finally:
    subprocess.run(["umount", str(disk)], check=False)


def test_a_checkpoint_with_renamed_parameters_restores_under_the_new_names(tmp_path, monkeypatch):
  """Older moejax wrote attention keys as `wk_DKd`: such a checkpoint restores into `wk_DNd`."""
  import jax
  import numpy as np
  from flax import nnx
  from moejax import checkpoint

  class Attn(nnx.Module):
    def __init__(self, seed):
      self.wk_DNd = nnx.Param(jax.random.normal(jax.random.key(seed), (3, 2)))
      self.wq_DHd = nnx.Param(jax.random.normal(jax.random.key(seed + 1), (3, 2)))

  saved, target = nnx.state(Attn(0)), nnx.state(Attn(5))
  flatten = checkpoint.flatten_state
  monkeypatch.setattr(checkpoint, "flatten_state", lambda state: {
      name.replace("wk_DNd", "wk_DKd"): x for name, x in flatten(state).items()})
  ckpt = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
  ckpt.save(1, saved)
  monkeypatch.undo()
  restored, _, _ = ckpt.restore(target, 1)
  ckpt.close()
  for name in ("wk_DNd", "wq_DHd"):
    np.testing.assert_array_equal(restored[name].get_value(), saved[name].get_value())
  assert not np.array_equal(saved["wk_DNd"].get_value(), target["wk_DNd"].get_value())


def test_a_moe_run_saved_under_the_old_expert_names_resumes_exactly(tmp_path, monkeypatch):
  """Checkpoints written before the expert parameters took the dense MLP's naming (`wi`, `wo`,
  `router` -> `w_up_EDF`, `w_down_EFD`, `router_DE`; optimizer moments included) restore under
  the new names, and the resumed run ends where an uninterrupted one does."""
  import numpy as np
  sys.path.insert(0, ROOT)
  from configs import tiny
  from moejax import checkpoint, train

  def config(steps):
    c = tiny.get_config("runlocal")
    c.num_train_steps, c.checkpoint_every, c.eval_every, c.async_checkpoint = steps, 2, 2, False
    return c

  old_name = {new: old for old, new in checkpoint.RENAMED.items()}
  flatten = checkpoint.flatten_state

  def as_old_code_wrote_it(state):
    out = {}
    for name, x in flatten(state).items():
      head, sep, last = name.rpartition("/")
      out[head + sep + old_name.get(last, last)] = x
    return out

  with monkeypatch.context() as patch:  # The first 2 steps saved as the old code saved them.
    patch.setattr(checkpoint, "flatten_state", as_old_code_wrote_it)
    train.train_and_evaluate(config(2), str(tmp_path / "resumed"))
  metadata = (tmp_path / "resumed" / "checkpoints" / "2" / "state" / "_METADATA").read_text()
  assert "ffn/wi" in metadata and "w_up_EDF" not in metadata  # written under the old names
  resumed = train.train_and_evaluate(config(4), str(tmp_path / "resumed"))
  straight = train.train_and_evaluate(config(4), str(tmp_path / "straight"))
  for key in ("ce", "nodrop/ce"):
    np.testing.assert_array_equal(resumed[key], straight[key])
