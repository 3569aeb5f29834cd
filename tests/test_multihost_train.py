"""Multi-host training: two processes x 4 CPU devices train like one process x 8, resume onto
the other process count, and stop together on a SIGTERM to one of them."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import processes
from moejax import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/tiny.py:runlocal", "--config.mesh.data=2", "--config.mesh.expert=4",
        "--config.num_train_steps=6", "--config.log_every=2", "--config.eval_every=6",
        "--config.checkpoint_every=3"]


def _launch(workdir, devices, extra=(), env=None):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.Popen([sys.executable, "-m", "moejax.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, env_of_process_1=None):
  port = processes.free_port()
  return [_launch(workdir, 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], env=env_of_process_1 if i else None)
          for i in range(2)]


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 6 steps by 2 processes x 4 devices and by 1 process x 8 (checkpoints at 3, 6)."""
  root = tmp_path_factory.mktemp("runs")
  processes.wait_all(_two_processes(root / "two"))
  processes.wait_all([_launch(root / "one", 8)])
  return root / "two", root / "one"


def test_two_processes_train_like_one(runs):
  multi, single = runs
  multi_records, single_records = _records(multi), _records(single)
  # Only process 0 writes: every (split, step) appears once.
  keys = [(r["split"], r["step"]) for r in multi_records]
  assert len(keys) == len(set(keys)) and ("eval", 6) in keys
  assert sorted(os.listdir(multi / "checkpoints")) == ["3", "6"]
  for a, b in zip(multi_records, single_records, strict=True):
    assert (a["split"], a["step"]) == (b["split"], b["step"])
    for name in ("loss", "ce", "moe/balance_loss", "nodrop/ce"):
      if name in b:
        assert abs(a[name] - b[name]) < 1e-5, (name, a, b)


def test_resume_onto_another_process_count(runs, tmp_path):
  """2 processes -> 1 and 1 -> 2 from the step-3 checkpoint: the checkpoint holds every process's
  data position, so the resumed run reads the batches the uninterrupted one read."""
  two, one = runs
  reference = _train_losses(two)
  for source, resume in ((two, lambda d: [_launch(d, 8)]), (one, _two_processes)):
    workdir = tmp_path / source.name
    shutil.copytree(source, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")  # As if killed after the step-3 checkpoint.
    processes.wait_all(resume(workdir))
    losses = _train_losses(workdir)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
      assert abs(losses[step] - loss) < 1e-5, (source.name, step, losses[step], loss)


def test_sigterm_to_one_process_saves_and_stops_both(runs, tmp_path):
  """Preemption of a 2-process job: process 1 alone gets SIGTERM after step 1; JAX's preemption
  sync point makes both processes save the same step and exit 0; resuming ends bit-identical
  to the uninterrupted job.

  The notice reaches process 0 through the coordination service asynchronously, so the agreed
  step is any step after 1 (the regular step-3 checkpoint may come first)."""
  workdir = tmp_path / "preempted"
  outs = processes.wait_all(_two_processes(workdir, {ckpt_lib.FAULT_SIGTERM_ENV: "1"}))
  assert "preempted: saved a checkpoint at step" in outs[0]
  steps = ckpt_lib.saved_steps(workdir / "checkpoints")
  step = max(steps)
  assert 1 <= step < 6 and f"at step {step} in" in outs[0], (steps, outs[0])
  assert set(steps) <= {3, step}, steps
  processes.wait_all(_two_processes(workdir))
  assert _train_losses(workdir) == _train_losses(runs[0])
