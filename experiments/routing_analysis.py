"""What do the experts of a trained run learn? One command, a report with pictures.

    python experiments/routing_analysis.py --workdir=RUN --out=DIR \
        [--data=PATHS] [--tokens=131072] [--steps=all] [--mesh=data=-1,expert=1]
    python experiments/routing_analysis.py --traces=RUN/routing --out=DIR   # traces only

Restores RUN's checkpoints with the config the run wrote, reads `--tokens` real tokens of held-out
text (the run's eval split, or `--data`: comma-separated text files or globs, each one *domain*
named after it; the built-in corpus labels its own domains; a TFDS dataset via the run's
`data.tfds.domain_key`), routes them through every MoE layer and writes to DIR:

- `report.md`: per MoE layer, the tables and the pictures below, and what each finding says;
- `heatmap_layer{i}.png`: expert x domain lift p(expert | domain) / p(expert) (1 = chance);
- `information.png`: the share of H(expert) explained by domain, token, position bucket, previous
  token, and domain beyond the token (bias-corrected: shuffled-label baseline subtracted);
- `consecutive.png`: neighbours sharing the first choice / any top-k choice vs chance, per domain;
- `drops.png`: the fraction of routing choices dropped by position in the sequence and by domain,
  at the run's *training* capacity factor (eval mode: no jitter), where position priority bites;
- `stability.png`: per saved checkpoint, the fraction of tokens whose top-1 expert equals the
  final checkpoint's;
- `analysis.json`: every number.

Routing choices are the router's top-k before capacity (`router_topk`), so the specialisation
statistics do not depend on the capacity factor; drops come from the same pass.

`--tokens` (default 131,072 = 2^17): the bias-corrected shares change by less than ~0.01 between
halves of this sample for a byte vocabulary and E=8 (the report prints each share's split-half
spread, so a reader can see whether a sample was large enough); the analysis takes about a second
per MoE layer and checkpoint on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moejax import analysis, checkpoint, cli, sharding, study, train  # noqa: E402  pylint: disable=wrong-import-position
from moejax import data as data_lib  # noqa: E402  pylint: disable=wrong-import-position

POSITION_BUCKETS = 8
LABELS = (("domain", "domain"), ("token", "token"), ("position", "position bucket"),
          ("previous", "previous token"), ("domain|token", "domain beyond token"))


def data_config(run_config, paths: str | None):
  """The run's data config, or text files `paths` (one domain each) with the run's tokenizer."""
  config = run_config.data
  if not paths:
    return config
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(config.to_dict())
  if config.tokenizer == "sentencepiece" and not config.sentencepiece.model_path:
    # The run's trained model, not one trained on the new text.
    config.sentencepiece.model_path = data_lib.get_tokenizer(run_config.data).model_path
  config.source, config.text_files.paths, config.eval_split = "text_files", paths, "validation"
  return config


def read_batches(config, data_cfg, tokens: int) -> list[dict[str, np.ndarray]]:
  """Eval-split batches of the run's shape until they hold `tokens` real tokens."""
  it = data_lib.make_pipeline(data_cfg, seq_len=config.seq_len,
                              global_batch_size=config.batch_size, split=data_cfg.eval_split,
                              seed=0)
  batches, seen = [], 0
  for batch in it:
    batches.append({k: np.asarray(v) for k, v in batch.items()})
    seen += int(batch["mask"].sum())
    if seen >= tokens:
      break
  return batches


def record(model, mesh, batches, batch_size: int,
           capacity_factor: float | None) -> dict[int, dict]:
  """{layer: {"topk", "kept", "wanted": [N_rows, L, K]}} over `batches` (eval mode, at
  `capacity_factor`; None: the eval capacity)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  @nnx.jit
  def route(model, batch):
    forward = nnx.capture(lambda m: m(batch["inputs"], batch["positions"], batch["segment_ids"],
                                      batch["mask"], deterministic=True,
                                      moe_capacity_factor=capacity_factor,
                                      moe_record_routing=True), nnx.Intermediate)
    return forward(model)[1]

  out: dict[int, dict[str, list]] = {}
  with jax.set_mesh(mesh):
    for batch in batches:
      sown = route(model, data_lib.make_global_batch({k: batch[k] for k in train.BATCH_KEYS},
                                                      mesh, batch_size))
      for path, var in nnx.to_flat_state(sown):
        name = {"router_topk": "topk", "router_kept": "kept",
                "router_wanted": "wanted"}.get(str(path[-1]))
        if name:
          layer = next(int(p) for p in path if isinstance(p, int) or str(p).isdigit())
          out.setdefault(layer, {}).setdefault(name, []).append(
              np.asarray(jax.device_get(var.get_value()[0])))
  return {layer: {k: np.concatenate(v) for k, v in d.items()} for layer, d in out.items()}


def analyse_layer(rec: dict, batch: dict, num_experts: int, num_domains: int,
                  seq_len: int) -> dict:
  """Every statistic of one MoE layer (see moejax.analysis)."""
  valid = batch["mask"] > 0
  topk, kept = rec["topk"], rec["kept"]
  first_U = topk[..., 0][valid]
  tokens = batch["inputs"]
  previous = np.where(batch["segment_ids"][:, :-1] == batch["segment_ids"][:, 1:],
                      tokens[:, :-1], -1)
  previous = np.concatenate([np.full((len(tokens), 1), -1), previous], 1)
  domain = np.maximum(batch["domain"], 0)
  labels = {"domain": (domain[valid], None), "token": (tokens[valid], None),
            "position": (batch["positions"][valid] * POSITION_BUCKETS // seq_len, None),
            "previous": (previous[valid] + 1, None),
            "domain|token": (domain[valid], tokens[valid])}
  information = {name: analysis.information_report(first_U, label, given)
                 for name, (label, given) in labels.items()}
  return {
      "tokens": int(valid.sum()),
      "load": (np.bincount(first_U, minlength=num_experts) / len(first_U)).tolist(),
      "information": information,
      "lift": analysis.domain_expert_lift(first_U, domain[valid], num_domains,
                                          num_experts).tolist(),
      "top_tokens": analysis.top_tokens(first_U, tokens[valid], num_experts),
      "consecutive": analysis.consecutive_sharing(topk, valid, batch["segment_ids"],
                                                  batch["domain"]),
      "drops": analysis.drop_rates(kept, valid, batch["positions"], batch["domain"],
                                   wanted_BLK=rec["wanted"], num_buckets=POSITION_BUCKETS,
                                   max_position=seq_len),
  }


def plot_all(result: dict, out: str) -> list[str]:
  """The report's PNGs; returns their file names."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  layers, names = result["layers"], result["domain_names"]
  files = []
  for layer, r in layers.items():
    lift = np.asarray(r["lift"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * lift.shape[1], 0.8 + 0.5 * lift.shape[0]))
    image = ax.imshow(np.log2(np.maximum(lift, 1 / 16)), cmap="RdBu_r", vmin=-2, vmax=2,
                      aspect="auto")
    for (d, e), value in np.ndenumerate(lift):
      ax.text(e, d, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(lift.shape[1]))
    ax.set_yticks(range(lift.shape[0]), [n[:24] for n in names])
    ax.set_xlabel("expert (first choice)")
    ax.set_title(f"layer {layer}: p(expert | domain) / p(expert)")
    fig.colorbar(image, ax=ax, label="log2 lift")
    files.append(f"heatmap_layer{layer}.png")
    study.save_figure(fig, out, files[-1])

  fig, ax = plt.subplots(figsize=(7, 3.6))
  width = 0.8 / len(layers)
  for i, (layer, r) in enumerate(layers.items()):
    shares = [r["information"][k]["share"] for k, _ in LABELS]
    spread = [r["information"][k]["spread_share"] for k, _ in LABELS]
    ax.bar(np.arange(len(LABELS)) + i * width, shares, width, yerr=spread, capsize=2,
           label=f"layer {layer}")
  ax.set_xticks(np.arange(len(LABELS)) + width * (len(layers) - 1) / 2,
                [t for _, t in LABELS], fontsize=8)
  ax.set_ylabel("share of H(expert), bias-corrected")
  ax.set_title("What explains the first-choice expert (error bar: split-half spread)")
  ax.legend(fontsize=8)
  files.append("information.png")
  study.save_figure(fig, out, files[-1])

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
  groups = ["all", *[str(d) for d in range(len(names))]]
  labels = ["all", *[n[:16] for n in names]]
  width = 0.8 / len(layers)
  for ax, key in zip(axes, ("first", "any")):
    for i, (layer, r) in enumerate(layers.items()):
      c = r["consecutive"]
      present = [g for g in groups if g in c]
      x = np.array([groups.index(g) for g in present]) + i * width
      ax.bar(x, [c[g][key] for g in present], width, label=f"layer {layer}")
      ax.scatter(x, [c[g][f"{key}_chance"] for g in present], color="k", marker="_", s=120,
                 zorder=3, label="chance" if i == 0 else None)
    ax.set_xticks(np.arange(len(groups)) + width * (len(layers) - 1) / 2, labels, fontsize=7,
                  rotation=30)
    ax.set_title("same first choice" if key == "first" else "any shared top-k expert")
  axes[0].set_ylabel("fraction of neighbouring token pairs")
  axes[0].legend(fontsize=7)
  files.append("consecutive.png")
  study.save_figure(fig, out, files[-1])

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for layer, r in layers.items():
    d = r["drops"]
    edges = d["bucket_edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    axes[0].plot(centres, [np.nan if v is None else v for v in d["by_position"]], marker="o",
                 label=f"layer {layer}")
    by_domain = d.get("by_domain", {})
    axes[1].plot(range(len(names)), [by_domain.get(str(i), np.nan) for i in range(len(names))],
                 marker="o", label=f"layer {layer}")
  for ax in axes:
    ax.set_ylim(bottom=0)
  axes[0].set_xlabel("position in the sequence")
  axes[0].set_ylabel("fraction of choices dropped")
  axes[0].set_title(f"drops at the training CF {result['train_capacity_factor']:g}")
  axes[1].set_xticks(range(len(names)), [n[:16] for n in names], fontsize=7, rotation=30)
  axes[1].set_title("drops by domain")
  axes[0].legend(fontsize=8)
  files.append("drops.png")
  study.save_figure(fig, out, files[-1])

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for layer, agreement in result["stability"].items():
    steps = sorted(agreement)
    ax.plot(steps, [agreement[s] for s in steps], marker="o", label=f"layer {layer}")
  ax.axhline(1 / result["num_experts"], color="grey", ls=":", label="chance (1/E)")
  ax.set_xlabel("training step of the checkpoint")
  ax.set_ylabel("top-1 equal to the final checkpoint's")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8)
  ax.set_title("When is routing decided?")
  files.append("stability.png")
  study.save_figure(fig, out, files[-1])
  return files


def _token_text(tokenizer, token: int) -> str:
  text = tokenizer.decode([token]) if token > 0 else "<pad/bos>"
  return repr(text)[1:-1].replace("|", "\\|").replace("`", "'") or "''"


def write_report(result: dict, tokenizer, out: str, command: str) -> None:
  names, layers = result["domain_names"], result["layers"]
  lines = [f"# Routing analysis of `{result['workdir']}` (step {result['step']})", "",
           f"{result['tokens']:,} held-out tokens of {len(names)} domains "
           f"({', '.join(names)}); E={result['num_experts']}, top-{result['top_k']}, "
           f"first-choice statistics unless named. Regenerate:", "", f"    {command}", "",
           "## What explains the expert?", "",
           "Share of H(expert) explained by each label, after subtracting the shuffled-label "
           "baseline (bits the sample alone would show); +- is the split-half spread.", "",
           "| layer | H(expert) bits | " + " | ".join(t for _, t in LABELS) + " |",
           "|---|---|" + "---|" * len(LABELS)]
  for layer, r in layers.items():
    info = r["information"]
    lines.append(f"| {layer} | {info['token']['expert_entropy_bits']:.2f} | " + " | ".join(
        f"{info[k]['share']:.3f} +- {info[k]['spread_share']:.3f}" for k, _ in LABELS) + " |")
  lines += ["", "![information](information.png)", "", "## Experts and domains", ""]
  for layer in layers:
    lines += [f"![layer {layer}](heatmap_layer{layer}.png)", ""]
  lines += ["## Top tokens per expert", "",
            "Tokens seen at least 20 times, by the share of their routing that goes to the "
            "expert (last MoE layer).", "", "| expert | load | tokens (share routed here) |",
            "|---|---|---|"]
  last = layers[max(layers, key=int)]
  for e, tops in enumerate(last["top_tokens"]):
    lines.append(f"| {e} | {last['load'][e]:.3f} | " + ", ".join(
        f"`{_token_text(tokenizer, t)}` ({share:.2f})" for t, _, share in tops) + " |")
  lines += ["", "## Consecutive tokens", "",
            "| layer | domain | pairs | same first choice | chance | any shared top-k | chance |",
            "|---|---|---|---|---|---|---|"]
  for layer, r in layers.items():
    for key, c in r["consecutive"].items():
      name = "all" if key == "all" else names[int(key)]
      lines.append(f"| {layer} | {name} | {c['pairs']:,} | {c['first']:.3f} | "
                   f"{c['first_chance']:.3f} | {c['any']:.3f} | {c['any_chance']:.3f} |")
  lines += ["", "![consecutive](consecutive.png)", "", "## Drops by position and domain", "",
            f"At the training capacity factor {result['train_capacity_factor']:g} "
            f"(priority `{result['priority']}`).", "",
            "| layer | all | " + " | ".join(
                f"pos {a}-{b - 1}" for a, b in zip(last["drops"]["bucket_edges"][:-1],
                                                   last["drops"]["bucket_edges"][1:])) + " |",
            "|---|---|" + "---|" * POSITION_BUCKETS]
  for layer, r in layers.items():
    d = r["drops"]
    lines.append(f"| {layer} | {d['all']:.4f} | " + " | ".join(
        "-" if v is None else f"{v:.4f}" for v in d["by_position"]) + " |")
  lines += ["", "![drops](drops.png)", "", "## When is routing decided?", "",
            "| layer | " + " | ".join(f"step {s}" for s in result["steps"]) + " |",
            "|---|" + "---|" * len(result["steps"])]
  for layer, agreement in result["stability"].items():
    lines.append(f"| {layer} | " + " | ".join(
        f"{agreement[s]:.3f}" for s in result["steps"]) + " |")
  lines += ["", "![stability](stability.png)", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))


def run(workdir: str, out: str, *, paths: str | None = None, tokens: int = 131_072,
        steps: str = "all", mesh: str = "data=-1,expert=1", command: str = "") -> dict:
  """Analyses `workdir` into `out` (see the module docstring); returns analysis.json's dict."""
  config = train.load_run_config(workdir)
  saved = checkpoint.saved_steps(os.path.join(workdir, "checkpoints"))
  if not saved:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to analyse")
  chosen = saved if steps == "all" else [saved[-1]] if steps == "last" else sorted(
      int(s) for s in steps.split(","))
  missing = sorted(set(chosen) - set(saved))
  if missing:
    raise ValueError(f"--steps={steps!r}: no checkpoint of steps {missing}; saved: {saved}")
  data_cfg = data_config(config, paths)
  names = data_lib.domain_names(data_cfg) or ["(unlabelled)"]
  tokenizer = data_lib.get_tokenizer(data_cfg)
  batches = read_batches(config, data_cfg, tokens)
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  moe = config.model.moe
  top1_by_layer: dict[int, dict[int, np.ndarray]] = {}
  final = None
  meter = cli.Progress(len(chosen), "routing analysis: checkpoints", every_s=0.0)
  for i, step in enumerate(chosen):
    model, mesh_, restored = train.load_model(config, workdir, step,
                                              mesh_shape=sharding.parse_mesh(mesh))
    # Drops at the training capacity (an explicit expert_capacity applies as it is).
    rec = record(model, mesh_, batches, config.batch_size,
                 None if moe.get("expert_capacity") else float(moe.capacity_factor))
    for layer, r in rec.items():
      top1_by_layer.setdefault(layer, {})[restored] = r["topk"][..., 0][batch["mask"] > 0]
    final = (restored, rec)
    meter.update(i + 1)
  step, rec = final
  layers = {layer: analyse_layer(r, batch, moe.num_experts, len(names), config.seq_len)
            for layer, r in sorted(rec.items())}
  result = {
      "workdir": workdir, "step": step, "steps": chosen, "tokens": int(batch["mask"].sum()),
      "domain_names": names, "num_experts": moe.num_experts, "top_k": moe.top_k,
      "train_capacity_factor": float(moe.capacity_factor), "priority": moe.priority,
      "layers": layers,
      "stability": {layer: analysis.agreement_with_final(by_step)
                    for layer, by_step in sorted(top1_by_layer.items())},
  }
  os.makedirs(out, exist_ok=True)
  result = json.loads(json.dumps(result, default=_jsonable))  # int keys -> str, arrays -> lists
  with open(os.path.join(out, "analysis.json"), "w") as f:
    json.dump(result, f, indent=1, allow_nan=False)
  result["layers"] = {int(k): v for k, v in result["layers"].items()}
  result["stability"] = {int(k): {int(s): a for s, a in v.items()}
                         for k, v in result["stability"].items()}
  plot_all(result, out)
  write_report(result, tokenizer, out, command or f"python experiments/routing_analysis.py "
               f"--workdir={workdir} --out={out}")
  return result


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return None if math.isnan(x) else float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(type(x))


def traces_report(trace_dir: str, out_dir: str) -> str:
  """`--traces`: routing stability over training from a run's routing traces alone (no
  checkpoint): `trace_stability.png` and `trace_stability.json` in `out_dir`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  stability = analysis.routing_stability(analysis.read_routing_traces(trace_dir))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "trace_stability.json"), "w") as f:
    json.dump(stability, f, indent=1)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for layer, rec in stability.items():
    left.plot(rec["steps"], rec["changed"], marker=".", label=f"{layer}: experts changed")
    left.plot(rec["steps"], rec["top1_changed"], linestyle="--", label=f"{layer}: top-1 changed")
    right.plot(rec["trace_steps"], rec["final_agreement"], marker=".", label=layer)
  left.set(xlabel="training step", ylabel="fraction of traced tokens",
           title="routing changed since the previous trace")
  right.set(xlabel="training step", ylabel="fraction of traced tokens", ylim=(0, 1.02),
            title="top-1 expert equals the final trace's")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"routing traces: {trace_dir}", fontsize=9)
  fig.tight_layout()
  path = os.path.join(out_dir, "trace_stability.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--traces", default=None,
                      help="a run's routing traces (WORKDIR/routing, written with "
                           "--config.routing_trace_every=N): plot routing stability over "
                           "training from them alone, no checkpoint needed")
  parser.add_argument("--workdir", default=None, help="a run's directory (its config.json)")
  parser.add_argument("--out", required=True, help="where report.md, PNGs, analysis.json go")
  parser.add_argument("--data", default=None,
                      help="comma-separated text files / globs, one domain each (default: the "
                           "run's own eval split)")
  parser.add_argument("--tokens", type=int, default=131_072, help="eval tokens to route")
  parser.add_argument("--steps", default="all", help="all | last | comma-separated steps")
  parser.add_argument("--mesh", default="data=-1,expert=1",
                      help="mesh axis sizes for restoring, e.g. data=-1,expert=1")
  args = parser.parse_args()
  cli.require(("matplotlib",), "studies", "routing_analysis.py (its plots)")
  if args.traces:
    try:
      print(f"wrote {traces_report(args.traces, args.out)}")
    except FileNotFoundError as e:
      cli.user_error(f"--traces={args.traces}: {e}")
    return
  if not args.workdir:
    cli.user_error("--workdir is required (or --traces=WORKDIR/routing)")
  if args.tokens < 1:
    cli.user_error(f"--tokens={args.tokens}: allowed: a positive number of tokens")
  run(args.workdir, args.out, paths=args.data, tokens=args.tokens, steps=args.steps,
      mesh=args.mesh, command=" ".join(["python", *sys.argv]))
  print(f"wrote {args.out}/report.md")


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
