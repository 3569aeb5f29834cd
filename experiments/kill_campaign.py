"""Kill a training run at random moments, restart it each time, and check nothing was lost.

    python experiments/kill_campaign.py --workdir=/tmp/kills [--kills=10] [--signals=KILL,TERM]
        [--steps=60] [--seed=0]

1. Trains a small config (`configs/tiny.py:runlocal`, `--steps` steps, a checkpoint every 3
   steps, async saves, an eval every 10) without interruption: the reference.
2. Trains the same config in another workdir, and `--kills` times: waits until the process has
   logged its first training step (start-up and compilation done), draws a target step uniformly
   from that step and the 2 x steps / kills - 1 after it (never the last step: the run must still be
   going), waits until the log shows it, and sends the next signal of `--signals` (cycled) after a
   further delay drawn uniformly over the reference's mean wall time per step (evals and saves
   included): on average a kill every steps / kills steps, landing during steps, async saves and
   evals (the final eval and save too, when the delay runs past the last step); then restarts the
   same command. Targets are steps, not seconds, so a restart that runs faster than the reference
   (its compilations found in JAX's cache) is still interrupted. SIGKILL tests crash safety, SIGTERM
   the preemption path (finish the step, save, exit 0). Finally it runs the command once more to the
   end.
3. Compares the two runs: every parameter and optimizer array of the final checkpoint
   (bit-identical expected), and every metric of every logged train and eval step (`metrics.jsonl`,
   bit-identical, no step missing or duplicated; timing fields excluded).

Prints one line per kill (signal, the last step logged before it, whether a checkpoint save was in
flight, the step a SIGTERM saved) and the comparison, including whether every SIGTERM saved the
step it was on and the next attempt resumed there (no lost step). Exit status 1 if anything
differs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from moejax import cli  # light: imports no JAX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_sec", "step_time_s")
PREEMPTED = r"preempted: saved a checkpoint at step (\d+)"
RESUMED = r"resumed from .* at step (\d+)"


def command(workdir: str, steps: int) -> list[str]:
  return [sys.executable, "-m", "moejax.main", "--config=configs/tiny.py:runlocal",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}", "--config.log_every=1",
          "--config.eval_every=10", "--config.checkpoint_every=3", "--config.keep_checkpoints=2",
          "--config.async_checkpoint=True"]


def _launch(workdir: str, steps: int, log_path: str) -> subprocess.Popen:
  log = open(log_path, "a")  # pylint: disable=consider-using-with
  return subprocess.Popen(command(workdir, steps), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _steps_logged(log_path: str, since: int) -> list[int]:
  with open(log_path, errors="replace") as f:
    f.seek(since)
    return [int(m) for m in re.findall(r"\[train\] step (\d+):", f.read())]


def _found(pattern: str, log_path: str, since: int) -> int | None:
  """The integer the first match of `pattern` in the log after byte `since` captures."""
  with open(log_path, errors="replace") as f:
    f.seek(since)
    match = re.search(pattern, f.read())
  return int(match.group(1)) if match else None


def _wait_for_step(proc: subprocess.Popen, log_path: str, since: int, step: int = 0,
                   timeout: float = 600) -> bool:
  """Waits until the process has logged training step `step` or a later one (default: any step)
  or has exited; True if it logged it. A process that does neither in `timeout` s is killed."""
  start = time.time()
  while proc.poll() is None and max(_steps_logged(log_path, since), default=-1) < step:
    if time.time() - start > timeout:
      proc.kill()
      raise TimeoutError(f"training step {step or 'any'} not logged in {timeout} s; see "
                         f"{log_path}")
    time.sleep(0.05)
  return max(_steps_logged(log_path, since), default=-1) >= step


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _final_arrays(workdir: str) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from moejax import checkpoint  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, "checkpoints")
  step = checkpoint.saved_steps(directory)[-1]
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(os.path.join(directory, str(step), "state"))
  return {k: np.asarray(v) for k, v in state.items()}


def run_campaign(workdir: str, *, kills: int, signals: list[str], steps: int, seed: int,
                 log=print) -> dict:
  """Runs the campaign (see the module docstring); returns its summary."""
  rng = random.Random(seed)
  reference, killed = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
  for d in (reference, killed):
    os.makedirs(d, exist_ok=True)
  ref_log, killed_log = os.path.join(workdir, "reference.log"), os.path.join(workdir, "killed.log")
  # 1. The reference, timing its training phase (first logged step to exit).
  proc = _launch(reference, steps, ref_log)
  _wait_for_step(proc, ref_log, 0)
  started = time.time()
  if proc.wait() != 0:
    raise RuntimeError(f"the reference run failed; see {ref_log}")
  train_time = time.time() - started
  log(f"reference: {steps} steps, {train_time:.1f} s after the first step")

  # 2. The killed run.
  events = []
  for i in range(kills):
    since = os.path.getsize(killed_log) if os.path.exists(killed_log) else 0
    proc = _launch(killed, steps, killed_log)
    if not _wait_for_step(proc, killed_log, since):
      break  # Finished (or failed) before logging a step: nothing left to kill.
    first = _steps_logged(killed_log, since)[0]
    if first >= steps:  # Its first logged step is the last: nothing left to interrupt.
      if proc.wait(timeout=600) != 0:  # The final run below must not share the workdir with it.
        raise RuntimeError(f"the run failed after resuming at step {first}; see {killed_log}")
      log(f"kill {i + 1}: the run resumed at its last step, {first}")
      break
    # On average steps / kills steps per attempt, so the kills spread over the whole run.
    target = rng.randint(first, min(steps - 1, first + max(1, round(2 * steps / kills)) - 1))
    _wait_for_step(proc, killed_log, since, target)
    time.sleep(rng.uniform(0, train_time / steps))
    if proc.poll() is not None:
      log(f"kill {i + 1}: the run finished before the signal")
      break
    name = signals[i % len(signals)]
    in_flight = bool(glob.glob(os.path.join(killed, "checkpoints", "*.orbax-checkpoint-tmp*")))
    proc.send_signal(getattr(signal, f"SIG{name}"))
    code = proc.wait(timeout=600)
    logged = _steps_logged(killed_log, since)
    event = {"signal": name, "first_step": first, "last_step_logged": max(logged),
             "save_in_flight": in_flight, "exit_code": code,
             "preempted_at": _found(PREEMPTED, killed_log, since)}
    if events:  # This attempt's resume step belongs to the previous kill.
      events[-1]["next_resumed_from"] = _found(RESUMED, killed_log, since) or 0
    events.append(event)
    log(f"kill {i + 1}: SIG{name} after step {event['last_step_logged']} (this attempt started "
        f"at step {first}), save in flight: {in_flight}, exit code {code}"
        + (f", saved at step {event['preempted_at']}" if event["preempted_at"] else ""))
  since = os.path.getsize(killed_log)
  proc = _launch(killed, steps, killed_log)
  if proc.wait() != 0:
    raise RuntimeError(f"the final restart failed; see {killed_log}")
  if events:
    events[-1]["next_resumed_from"] = _found(RESUMED, killed_log, since) or 0

  # 3. Compare.
  ref_records, killed_records = _records(reference), _records(killed)
  keys = [(r["split"], r["step"]) for r in killed_records]
  ref_arrays, killed_arrays = _final_arrays(reference), _final_arrays(killed)
  differing = sorted(k for k in ref_arrays if k not in killed_arrays
                     or ref_arrays[k].tobytes() != killed_arrays[k].tobytes())
  # SIGTERM loses no step: the run saves the step it was on (its last logged one) and the next
  # attempt resumes there, so it goes on at that step + 1.
  terms = [e for e in events if e["signal"] == "TERM"]
  lost = [e for e in terms if not (e["preempted_at"] is None and e["last_step_logged"] == steps)
          and not e["preempted_at"] == e["last_step_logged"] == e["next_resumed_from"]]
  summary = {
      "kills": len(events), "events": events,
      "sigterm_exit_codes": sorted({e["exit_code"] for e in terms}),
      "sigterm_lost_steps": lost,
      "metrics_identical": ref_records == killed_records,
      "duplicated_steps": len(keys) - len(set(keys)),
      "missing_steps": sorted(set((r["split"], r["step"]) for r in ref_records) - set(keys)),
      "arrays": len(ref_arrays), "arrays_differing": differing,
  }
  summary["ok"] = (summary["metrics_identical"] and not differing
                   and not summary["duplicated_steps"] and not summary["missing_steps"]
                   and not lost and all(e["exit_code"] == 0 for e in terms))
  log(f"metrics.jsonl identical: {summary['metrics_identical']} (duplicated steps "
      f"{summary['duplicated_steps']}, missing {summary['missing_steps']}); final checkpoint: "
      f"{len(differing)} of {len(ref_arrays)} arrays differ; SIGTERM exit codes "
      f"{summary['sigterm_exit_codes']}; SIGTERMs resumed at the saved step: "
      f"{len(terms) - len(lost)} of {len(terms)}")
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a new, empty directory for the campaign runs")
  parser.add_argument("--kills", type=int, default=10, help="kills of the interrupted run")
  parser.add_argument("--signals", default="KILL,TERM",
                      help="comma-separated signals to send: KILL, TERM")
  parser.add_argument("--steps", type=int, default=60, help="training steps of each run")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
  args = parser.parse_args()
  signals = [s.strip().upper().removeprefix("SIG") for s in args.signals.split(",") if s.strip()]
  bad = [s for s in signals if s not in ("KILL", "TERM", "INT")]
  if bad or not signals:
    cli.user_error(f"--signals={args.signals!r}: allowed a comma-separated list of KILL, TERM, "
             "INT")
  if os.path.exists(args.workdir) and os.listdir(args.workdir):
    cli.user_error(f"--workdir={args.workdir!r} is not empty; the campaign needs fresh runs")
  summary = run_campaign(args.workdir, kills=args.kills, signals=signals, steps=args.steps,
                         seed=args.seed)
  sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
