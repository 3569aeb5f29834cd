"""Evaluate a checkpoint on any text: loss, perplexity, bits per byte, and the eval-capacity curve.

    result = evaluate_run(workdir, data="my_text.txt", capacity_factors=(0.5, 1, 1.25, 2, inf))
    print(format_table(result)); plot_capacity_curve(result, "cf_curve.png")

`experiments/evaluate.py` is the command line. What it computes, per capacity factor (`eval`: the
run's own eval capacity factor; `nodrop`: unlimited capacity; `cf{x}`: every factor asked for):

- `ce`: mean cross-entropy (nats) over the real target tokens, the trainer's formula (masked sum
  over all batches / number of targets), so on the run's own eval batches it reproduces the
  trainer's `ce` and `nodrop/ce` (`tests/test_evaluation.py`); `perplexity = exp(ce)`;
- `bits_per_byte`: the summed CE over targets / (ln 2 * UTF-8 bytes of the target tokens), the
  tokenizer-independent number (EOS targets count in the loss and have 0 bytes);
- `accuracy` (top-1), `drop` (fraction of router choices that found no slot, mean over MoE layers
  and choices, token-weighted over batches) and `unrouted` (tokens that got no expert at all);
- `tokens`, `bytes`: how much text was evaluated.

Which text: the run's own eval split and its `eval_steps` batches by default (exactly the
trainer's evaluation); `data=` (text files, a TFDS name or `builtin`, as in
`experiments/reproduce.py --data`) evaluates other text with the run's own tokenizer: text files
as a whole (no held-out split), a TFDS dataset's `split`; other text is read once, all of it
(`num_batches` caps it), the last batch padded.

The capacity factor acts per routing group (the run's `group_size` / `num_groups`, or one group
per sequence) of each eval batch, as in the trainer's eval: results depend on the batch size and
sequence length, which are the run's.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import cli
from moejax import model as model_lib

DEFAULT_CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0, math.inf)


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes of each token id `[vocab_size]` (0 for pad/bos/eos/unk and ids past the
  tokenizer's vocabulary): 1 per byte token; a SentencePiece piece's text with the word-start
  marker as a space, a byte-fallback piece `<0xAB>` as 1."""
  lengths = np.zeros((vocab_size,), np.int64)
  if tokenizer.name == "byte":
    lengths[3:min(vocab_size, tokenizer.vocab_size)] = 1
    return lengths
  sp = tokenizer._sp  # pylint: disable=protected-access
  for i in range(min(vocab_size, sp.get_piece_size())):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    piece = sp.id_to_piece(i)
    lengths[i] = 1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
  return lengths


def eval_data_config(config, data: str | None, split: str | None):
  """The data config and split to evaluate: the run's own, or `data` with the run's tokenizer."""
  data_config = config.data.copy_and_resolve_references()
  if data is None:
    return data_config, split or config.data.eval_split
  from moejax import config as config_lib  # pylint: disable=import-outside-toplevel
  with data_config.unlocked():
    overrides = config_lib.data_overrides(data, config.data.tokenizer)
    for key, value in overrides.items():  # Errors name the field as `config.data.<field>`.
      node, leaf = config_lib.lookup(data_config, key.removeprefix("data."), "config.data")
      node[leaf] = value
    if data_config.source == "text_files":  # The whole files: nothing held out.
      data_config.text_files.held_out_fraction = 0.0
      return data_config, "train"
  return data_config, split or config.data.eval_split


def read_batches(config, data_config, split: str, num_batches: int | None, tokenizer
                 ) -> list[dict[str, np.ndarray]]:
  """`num_batches` batches of `split` (None: one pass over all of it), the run's batch shape."""
  from moejax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  it = data_lib.make_pipeline(data_config, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, split=split, seed=0,
                              num_epochs=None if num_batches else 1, tokenizer=tokenizer)
  batches = itertools.islice(it, num_batches) if num_batches else it
  return [{k: np.asarray(b[k]) for k in train.BATCH_KEYS} for b in batches]


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity_factor"))
def _eval_sums(state, batch, bytes_V, *, graphdef, capacity_factor) -> dict[str, jax.Array]:
  model = nnx.merge(graphdef, state)
  logits_BLV, moe_aux = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                              batch["mask"], deterministic=True,
                              moe_capacity_factor=capacity_factor)
  mask_BL = batch["mask"].astype(jnp.float32)
  ce_sum, correct = model_lib.masked_ce_sums(logits_BLV, batch["targets"], mask_BL)
  sums = {"ce_sum": ce_sum, "correct": correct, "targets": jnp.sum(mask_BL),
          "bytes": jnp.sum(bytes_V[batch["targets"]] * mask_BL)}
  if moe_aux:  # Token-weighted over batches: sum (fraction * tokens), divided at the end.
    drop = jnp.mean(jnp.stack([jnp.mean(a.metrics["dropped_fraction"]) for a in moe_aux.values()]))
    unrouted = jnp.mean(jnp.stack([a.metrics["unrouted_fraction"] for a in moe_aux.values()]))
    sums.update(drop=drop * jnp.sum(mask_BL), unrouted=unrouted * jnp.sum(mask_BL))
  return sums


def evaluate(model: nnx.Module, batches: Sequence[dict[str, Any]], mesh: jax.sharding.Mesh,
             bytes_V: np.ndarray, capacity_factors: Sequence[float] = (),
             progress: bool = False) -> dict[str, dict[str, float]]:
  """`{label: metrics}` for `eval` (the model's eval capacity factor) and, for a MoE model,
  `nodrop` and `cf{x}` for each of `capacity_factors` (math.inf is `nodrop`), all in eval mode
  (call arguments: the model is not changed). `progress`: a progress line with ETA on stderr
  (`moejax.cli.Progress`)."""
  from moejax import data as data_lib  # pylint: disable=import-outside-toplevel
  variants: dict[str, float | None] = {"eval": None}
  if model.moe_layers():
    variants["nodrop"] = math.inf
    variants.update({f"cf{float(cf):g}": float(cf) for cf in capacity_factors
                     if math.isfinite(cf)})
  results = {}
  with jax.set_mesh(mesh):
    device_batches = [data_lib.make_global_batch(b, mesh, len(b["inputs"])) for b in batches]
    bytes_V = jnp.asarray(bytes_V, jnp.float32)  # Once, not per batch.
    moe_cfg = model.moe_layers()[0].cfg if model.moe_layers() else None
    meter = cli.Progress(len(variants) * len(device_batches), "evaluate") if progress else None
    graphdef, state = nnx.split(model)
    for v, (label, cf) in enumerate(variants.items()):
      totals = None
      for b, batch in enumerate(device_batches):
        sums = _eval_sums(state, batch, bytes_V, graphdef=graphdef, capacity_factor=cf)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if meter is not None:
          jax.block_until_ready(totals)
          meter.update(v * len(device_batches) + b + 1)
      totals = {k: float(v) for k, v in jax.device_get(totals).items()}
      n = max(totals["targets"], 1.0)
      results[label] = {
          "capacity_factor": (cf if cf is not None else
                              moe_cfg.eval_capacity_factor if moe_cfg else math.inf),
          "ce": totals["ce_sum"] / n, "perplexity": math.exp(min(totals["ce_sum"] / n, 50.0)),
          "bits_per_byte": totals["ce_sum"] / (math.log(2) * max(totals["bytes"], 1.0)),
          "accuracy": totals["correct"] / n,
          "drop": totals.get("drop", 0.0) / n, "unrouted": totals.get("unrouted", 0.0) / n,
          "tokens": int(totals["targets"]), "bytes": int(totals["bytes"])}
  return results


def evaluate_run(workdir: str, *, step: int | None = None, data: str | None = None,
                 split: str | None = None, num_batches: int | None = None,
                 capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
                 mesh_shape: dict[str, int] | None = None, progress: bool = False
                 ) -> dict[str, Any]:
  """Restores a run's checkpoint and evaluates it (see the module docstring). `num_batches`:
  default the run's `eval_steps` on its own data, all of the text otherwise. `progress`: say
  what it is doing on stderr (reading, then a progress line with ETA)."""
  from moejax import data as data_lib  # pylint: disable=import-outside-toplevel
  from moejax import train  # pylint: disable=import-outside-toplevel
  config = train.load_run_config(workdir)
  model, mesh, restored_step = train.load_model(config, workdir, step, mesh_shape=mesh_shape)
  data_config, split = eval_data_config(config, data, split)
  if num_batches is None and data is None:
    num_batches = config.eval_steps
  tokenizer = data_lib.get_tokenizer(config.data)  # The run's, whatever text is evaluated.
  if progress:
    print(f"evaluate: step {restored_step} of {workdir}; reading {data or 'its eval split'}",
          file=sys.stderr, flush=True)
  batches = read_batches(config, data_config, split, num_batches, tokenizer)
  bytes_V = token_byte_lengths(tokenizer, model.cfg.vocab_size)
  results = evaluate(model, batches, mesh, bytes_V, capacity_factors, progress=progress)
  return {"workdir": os.path.abspath(workdir), "step": restored_step,
          "data": data or "the run's own", "split": split, "batches": len(batches),
          "mesh": dict(mesh.shape), "results": results}


def format_table(result: dict[str, Any]) -> str:
  """A markdown table of `evaluate_run`'s result, one row per capacity factor."""
  lines = [f"{result['workdir']} step {result['step']}, data: {result['data']} "
           f"(split {result['split']}, {result['batches']} batches)", "",
           "| eval | capacity factor | CE (nats) | perplexity | bits/byte | accuracy | drop | "
           "tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  rows = sorted(result["results"].items(),
                key=lambda kv: (kv[0] != "eval", kv[1]["capacity_factor"]))
  for label, r in rows:
    lines.append(f"| {label} | {r['capacity_factor']:g} | {r['ce']:.4f} | {r['perplexity']:.3f} | "
                 f"{r['bits_per_byte']:.4f} | {r['accuracy']:.4f} | {r['drop']:.4f} | "
                 f"{r['tokens']:,} |")
  return "\n".join(lines) + "\n"


def plot_capacity_curve(result: dict[str, Any], path: str) -> None:
  """Eval CE and drop fraction against the eval capacity factor (ST-MoE Table 8 for one run);
  the no-drop CE as a dashed line."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  points = sorted((r["capacity_factor"], r["ce"], r["drop"])
                  for label, r in result["results"].items()
                  if label != "nodrop" and math.isfinite(r["capacity_factor"]))
  fig, (ax_ce, ax_drop) = plt.subplots(1, 2, figsize=(9, 3.5))
  if points:
    cf, ce, drop = zip(*points)
    ax_ce.plot(cf, ce, "o-", label="eval at this CF")
    ax_drop.plot(cf, drop, "o-", color="C1")
    for ax in (ax_ce, ax_drop):
      ax.set_xscale("log", base=2)
      ax.set_xticks(cf, [f"{c:g}" for c in cf])
      ax.minorticks_off()
  if "nodrop" in result["results"]:
    ax_ce.axhline(result["results"]["nodrop"]["ce"], color="k", ls="--", label="no drop")
  for ax, ylabel in ((ax_ce, "eval CE (nats)"), (ax_drop, "dropped fraction of choices")):
    ax.set_xlabel("eval capacity factor")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  ax_ce.legend()
  fig.suptitle(f"{os.path.basename(result['workdir'].rstrip('/'))} step {result['step']}: "
               f"{result['data']}, {result['results']['eval']['tokens']:,} tokens", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
