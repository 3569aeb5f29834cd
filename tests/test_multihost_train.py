"""Multi-host training: two processes x 4 CPU devices train exactly like one process x 8."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/tiny.py:runlocal", "--config.mesh.data=2", "--config.mesh.expert=4",
        "--config.num_train_steps=6", "--config.log_every=2", "--config.eval_every=6",
        "--config.checkpoint_every=3"]


def _launch(workdir, devices, extra=()):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "moejax.main", *ARGS, f"--workdir={workdir}",
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_like_one(tmp_path):
  port = processes.free_port()
  multi = tmp_path / "multi"
  procs = [_launch(multi, 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}"]) for i in range(2)]
  single = tmp_path / "single"
  processes.wait_all(procs)
  processes.wait_all([_launch(single, 8)])

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


def _two_processes(workdir, extra=()):
  port = processes.free_port()
  return [_launch(workdir, 4, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}", *extra]) for i in range(2)]


def _train_losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if r["split"] == "train"}


def _rewind_to_step_3(workdir):
  """As if the run had been killed after its step-3 checkpoint."""
  shutil.rmtree(workdir / "checkpoints" / "6")


def test_resume_onto_another_process_count(tmp_path):
  """2 processes -> 1 and 1 -> 2: the checkpoint holds every process's data position, so the
  resumed run reads the batches the uninterrupted one read (its losses match it)."""
  two, one = tmp_path / "two", tmp_path / "one"
  processes.wait_all(_two_processes(two))
  processes.wait_all([_launch(one, 8)])
  reference = _train_losses(two)
  for workdir, resume in ((two, lambda: [_launch(two, 8)]), (one, lambda: _two_processes(one))):
    _rewind_to_step_3(workdir)
    processes.wait_all(resume())
    losses = _train_losses(workdir)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
      assert abs(losses[step] - loss) < 1e-5, (workdir.name, step, losses[step], loss)


def test_sigterm_to_one_process_saves_and_stops_both(tmp_path):
  """Preemption of a multi-process job: SIGTERM reaches one process; JAX's preemption sync point
  makes both save the same step and exit 0; the resumed job ends like an uninterrupted one."""
  extra = ["--config.num_train_steps=60", "--config.log_every=1", "--config.checkpoint_every=100"]
  reference, preempted = tmp_path / "reference", tmp_path / "preempted"
  processes.wait_all(_two_processes(reference, extra))
  procs = _two_processes(preempted, extra)
  deadline = time.time() + 300
  while not (preempted / "metrics.jsonl").exists() or '"step": 3,' not in (
      preempted / "metrics.jsonl").read_text():
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = processes.wait_all(procs)
  assert "preempted: saved a checkpoint at step" in outs[0]
  (step,) = [int(s) for s in os.listdir(preempted / "checkpoints") if s.isdigit()]
  assert 3 <= step < 60
  processes.wait_all(_two_processes(preempted, extra))
  assert _train_losses(preempted) == _train_losses(reference)
