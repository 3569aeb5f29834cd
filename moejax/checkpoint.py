"""Checkpointing with orbax: periodic async saves, keep-last-N, resume, restore onto any mesh.

A checkpoint `workdir/checkpoints/<step>/` holds three items:

- `state`: the NNX state of (model, optimizer) — params, optimizer moments, optimizer step and the
  model's RNG streams — as a *flat* dict `{"0/blocks/1/ffn/w_up_EDF": array, ...}`. Flat string keys
  keep the on-disk layout independent of NNX's container types, and typed PRNG keys are stored
  as their raw `uint32` key data (and re-wrapped on restore).
- `data`: the input iterator's `get_state()` (JSON), so a resumed run reads exactly the batches
  the uninterrupted run would have read.
- `meta`: `{"step": ...}` plus whatever the caller adds (JSON).

Restoring onto a different mesh: restore takes the *current* state as the target and asks orbax
for each array with the target's sharding, so a checkpoint written with experts over 4 devices
loads onto 2 or 1 (orbax reads the slices each device needs).

Preemption (`PreemptionWatcher`): on SIGTERM, what Cloud TPU and most schedulers send before
they kill a job, the trainer finishes the current step, saves a checkpoint at that step, waits for
it and raises `Preempted` (`moejax.main` then exits 0). One process catches SIGTERM with a Python
handler; several processes use JAX's preemption sync service (started by
`jax.distributed.initialize`), which agrees on one step for all of them. A second SIGTERM changes
nothing; a SIGINT or SIGKILL during that save leaves the previous checkpoint as the latest.

Crash safety: orbax writes each step into `<step>.orbax-checkpoint-tmp-<ts>/` and renames it to
`<step>/` only when every item (and, multi-host, every process) has finished; a run killed mid-save
leaves only a tmp dir, which orbax ignores and `cleanup_tmp_directories` deletes on the
next start. So the last *completed* checkpoint is always the one resumed from.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_key(path) -> str:
  return "/".join(str(p) for p in path)


def flatten_state(state: nnx.State) -> dict[str, jax.Array]:
  """NNX state -> {"a/b/c": array}, PRNG keys as raw key data."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    value = var.get_value()
    out[_flat_key(path)] = jax.random.key_data(value) if _is_key(value) else value
  return out


def _abstract(x) -> jax.ShapeDtypeStruct:
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def unflatten_into(target: nnx.State, flat: dict[str, jax.Array]) -> nnx.State:
  """Returns a copy of `target` with values from `flat` (keys re-wrapped like the target's)."""
  items = []
  for path, var in nnx.to_flat_state(target):
    old, new = var.get_value(), flat[_flat_key(path)]
    if _is_key(old):
      new = jax.random.wrap_key_data(new, impl=jax.random.key_impl(old))
    items.append((path, var.replace(new)))
  return nnx.from_flat_state(items)


def saved_steps(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory` (without creating it)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


# The files every complete save has (the items' metadata); a step directory missing one is a save
# cut short, which `Checkpointer.restore` reports (and `train.finished_run` does not trust).
ITEM_FILES = ("state/_METADATA", "data/metadata", "meta/metadata", "_CHECKPOINT_METADATA")


def looks_complete(step_dir: str) -> bool:
  """Whether a step directory holds every item's metadata file (cheap; reads nothing)."""
  return all(os.path.exists(os.path.join(step_dir, f)) for f in ITEM_FILES)


# Parameters renamed since checkpoints were first written (last path component, old -> new): a
# checkpoint of an older moejax restores under the new names.
RENAMED = {"wk_DKd": "wk_DNd", "wv_DKd": "wv_DNd",  # moejax before commit e9b1e34
           # Expert parameters named like the dense MLP's (December 2026, issue 29).
           "router": "router_DE", "wi": "w_up_EDF", "wi_gate": "w_gate_EDF", "wo": "w_down_EFD",
           "shared_wi": "shared_w_up_EDF", "shared_wi_gate": "shared_w_gate_EDF",
           "shared_wo": "shared_w_down_EFD"}


def _stored_names(names, stored) -> dict[str, str]:
  """Each of `names` -> its name in a checkpoint holding `stored` (its old name if it was renamed
  and only the old name is there)."""
  old_of = {new: old for old, new in RENAMED.items()}
  out = {}
  for name in names:
    head, sep, last = name.rpartition("/")
    old = head + sep + old_of[last] if last in old_of else None
    out[name] = old if name not in stored and old in stored else name
  return out


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for (NNX state, data state, metadata)."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: nnx.State, data_state: Any = None,
           meta: dict[str, Any] | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due (or `force`); returns whether it saves. A failed
    save (this one, or the previous async one) raises OSError naming the last complete one."""
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(flatten_state(state)),
          data=ocp.args.JsonSave(data_state if data_state is not None else {}),
          meta=ocp.args.JsonSave({"step": int(step), **(meta or {})})), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def _save_failed(self, error: Exception) -> OSError:
    """What the user needs when a save fails (disk full, permissions): the last good step."""
    text = str(error)
    full = "No space left" in text or "RESOURCE_EXHAUSTED" in text
    last = saved_steps(self.directory)
    return OSError(
        f"saving a checkpoint in {self.directory} failed: "
        + ("the disk is full" if full else f"{type(error).__name__}: {text.splitlines()[0][:300]}")
        + ". The last complete checkpoint is " + (f"step {last[-1]}" if last else "none")
        + "; fix the cause and rerun the same command to resume from it.")

  def restore(self, target: nnx.State, step: int | None = None
              ) -> tuple[nnx.State, Any, dict[str, Any]]:
    """Restores `step` (default latest) into arrays sharded like `target`'s."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(_abstract, flatten_state(target))
    stored_name = self.check_restorable(step, {name: x.shape for name, x in abstract.items()})
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore({stored_name[n]: x for n, x in abstract.items()}),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (FileNotFoundError, json.JSONDecodeError) as e:  # Missing or cut-short files.
      raise self._unreadable(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    state = {name: restored["state"][stored_name[name]] for name in abstract}
    return unflatten_into(target, state), restored["data"], restored["meta"]

  def restore_data(self, step: int) -> tuple[Any, dict[str, Any]]:
    """Only the JSON items of `step`: (data iterator state, meta). Cheap; no arrays are read."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except (FileNotFoundError, json.JSONDecodeError) as e:  # Missing or cut-short files.
      raise self._unreadable(step, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return restored["data"], restored["meta"]

  def _unreadable(self, step: int, why: str) -> ValueError:
    """A checkpoint directory that is not a complete save (e.g. a copy cut short)."""
    earlier = [s for s in saved_steps(self.directory) if s < step]
    path = os.path.join(self.directory, str(step))
    return ValueError(
        f"checkpoint {path} is incomplete or corrupt ({why}); complete saves are renamed into "
        "place atomically, so something else (a copy cut short, a full disk, a manual edit) made "
        "it. " + (f"Move it away (e.g. `mv {path} {path}.broken`) to resume from step "
                  f"{earlier[-1]}." if earlier else "No earlier checkpoint exists; move it away "
                  "to start from scratch."))

  def check_restorable(self, step: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Before anything is compiled: every item of `step` is there, and its arrays have the names
    and shapes of `shapes` (the model's flat state). Clear errors, not orbax tracebacks. Returns
    each name's name in the checkpoint (older moejax versions wrote some under `RENAMED` names)."""
    path = os.path.join(self.directory, str(step))
    for item, required in (("state", "_METADATA"), ("data", "metadata"), ("meta", "metadata")):
      if not os.path.exists(os.path.join(path, item, required)):
        raise self._unreadable(step, f"{item}/{required} is missing")
    reader = ocp.StandardCheckpointer()
    try:
      metadata = reader.metadata(os.path.join(path, "state"))
      stored = dict(getattr(metadata, "item_metadata", metadata))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, f"state metadata: {type(e).__name__}: {e}") from e
    finally:
      reader.close()
    stored_name = _stored_names(shapes, stored)
    shapes = {stored_name[name]: shape for name, shape in shapes.items()}
    missing = sorted(set(shapes) - set(stored))
    extra = sorted(set(stored) - set(shapes))
    for name in sorted(set(shapes) & set(stored)):
      shape = tuple(getattr(stored[name], "shape", ()) or ())
      if shape != tuple(shapes[name]):
        raise ValueError(f"checkpoint {path} does not fit this model: parameter {name!r} has "
                         f"shape {shape} in the checkpoint and {tuple(shapes[name])} in the model "
                         "(another config wrote this checkpoint; use another workdir).")
    if missing or extra:
      scanned = lambda names: any("/units/" in f"/{name}" for name in names)
      why = ("one side has scanned layers (`units/...`, model.scan_layers=True) and the other "
             "not (`blocks/...`): restore with the model.scan_layers the run was trained with"
             if scanned(missing) != scanned(extra) else "another config, or a moejax version "
             "with other parameter names, wrote this checkpoint; use another workdir")
      raise ValueError(f"checkpoint {path} does not fit this model: "
                       f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                       f"{extra[:3]}{'...' if len(extra) > 3 else ''} ({why}).")
    return stored_name

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()


class Preempted(Exception):
  """Training stopped at `step` on a preemption notice, after saving a checkpoint there."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved a checkpoint at step {step} in {directory}; rerun the same "
                     "command to resume")
    self.step = step


# Fault injection for tests and the kill campaign: the process sends itself SIGTERM after this step.
FAULT_SIGTERM_ENV = "MOEJAX_FAULT_SIGTERM_AT_STEP"


class PreemptionWatcher:
  """`with PreemptionWatcher() as watcher: ... if watcher.reached(step): save and stop`.

  Call `reached(step)` after every training step on every process (multi-process: it is JAX's
  `reached_preemption_sync_point`, which needs every process to call it at every step).
  """

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.signalled = False
    self._previous = None
    self._fault_step = int(os.environ.get(FAULT_SIGTERM_ENV, "-1"))

  def __enter__(self) -> PreemptionWatcher:
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if not self.signalled:
      logging.warning("SIGTERM: finishing the current step, then saving a checkpoint and exiting")
    self.signalled = True

  def reached(self, step: int) -> bool:
    if step == self._fault_step:
      os.kill(os.getpid(), signal.SIGTERM)
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled
