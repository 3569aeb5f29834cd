"""A study's outputs: `table.md` (per-arm values, verdicts, the command that regenerates it),
`curves.png`, the study's key plots and `forest.png` (each claim's paired effect with its
interval, coloured by verdict). Matplotlib is imported only when plotting (headless `Agg`).

Nothing written depends on where the data or the clone lives: the data are named by file name,
size and hash (`study.json`), and the regenerate command uses the repository's layout
(`../shared/data/<file>`), so `--report_only` from a fresh clone rewrites `table.md` byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence

from moejax.study.results import final_records, read_results
from moejax.study.spec import Arm, ArmPlot, MetricPlot, StepPlot, Study
from moejax.study.stats import AGREES, DISAGREES, Verdict, verdicts

SHARED_DATA = "../shared/data"  # Where our machines keep text corpora, relative to the clone.


def _fmt(values: Sequence[float], runs: int) -> str:
  """mean ± sample std; `(n=k)` when fewer values than finished runs (a metric some runs lack)."""
  if not values:
    return "-"
  text = (f"{values[0]:.4f}" if len(values) == 1 else
          f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
  return text + (f" (n={len(values)})" if len(values) != runs else "")


def regenerate_command(study: Study, meta: Mapping[str, str], workdir: str) -> str:
  """The command that trains (resuming) and reports `study` from a fresh clone."""
  data = meta.get("data", "builtin")
  if meta.get("data_identity"):
    data = ",".join(f"{SHARED_DATA}/{name}" for name in data.split(","))
  command = f"python experiments/reproduce.py --study={study.name} --workdir={workdir}"
  if not study.reuse:
    command += f" --data={data}"
    if meta.get("tokenizer", "byte") != "byte":
      command += f" --tokenizer={meta['tokenizer']}"
    if meta.get("scale", "cpu") != "cpu":
      command += f" --scale={meta['scale']}"
  return command


def _data_line(meta: Mapping[str, str]) -> str:
  line = f"Data: `{meta.get('data')}` ({meta.get('tokenizer')} tokens)"
  if meta.get("data_identity"):
    line += "; files (name:bytes:sha256 prefix): " + ", ".join(
        f"`{f}`" for f in meta["data_identity"].split(","))
  return line


def format_table(study: Study, records: Sequence[dict], command: str, meta: dict) -> str:
  """`table.md`: mean ± sample std over seeds per arm, the paper's figure, verdicts, command."""
  final = final_records(records)
  finals = [r for r in records if r.get("final")]
  lines = [f"# {study.name}: {study.paper}", "", f"**Claim.** {study.claim}", "",
           f"{_data_line(meta)}; scale `{meta.get('scale')}`; seeds "
           f"{sorted({s for _, s in final})}; {len(finals)} of "
           f"{len(study.arms) * len(study.seeds)} runs finished.", ""]
  has_paper = any(a.paper for a in study.arms)
  head = ["arm", "runs", *[title for _, title in study.columns], "min/run"]
  head += ["paper"] if has_paper else []
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm in study.arms:
    runs = [(s, m) for (a, s), m in sorted(final.items()) if a == arm.name]
    walls = [r["wall_s"] for r in finals if r["arm"] == arm.name and r.get("wall_s")]
    cells = [arm.name, str(len(runs))]
    cells += [_fmt([m[k] for _, m in runs if m.get(k) is not None], len(runs))
              for k, _ in study.columns]
    cells.append(f"{statistics.mean(walls) / 60:.1f}" if walls else "-")
    cells += [arm.paper or ""] if has_paper else []
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Verdict", "",
            f"Paired over seeds; Holm–Bonferroni across this study's {len(study.claims)} claims "
            "(verdict words follow the adjusted p at 0.05; `moejax/study/stats.py`).", ""]
  lines += [f"- {v.line()}" for v in verdicts(study.claims, final)]
  if study.notes:
    lines += ["", study.notes.strip()]
  lines += ["", "Regenerate:", "", "```", command, "```", ""]
  if meta.get("data_identity") and not study.reuse:
    lines += [f"`{SHARED_DATA}/` is where our machines keep these files; elsewhere pass your copies "
              "of the files named above (same names, sizes and hashes) to `--data`.", ""]
  return "\n".join(lines)


def plot(study: Study, records: Sequence[dict], out_dir: str) -> list[str]:
  """Writes `curves.png` (curve_metric vs step, mean over seeds with a min-max band) and the
  study's key plots; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  final = final_records(records)
  done = {(a, s) for a, s in final}
  offsets = start_steps(study, records)
  paths = []
  step_label = "training step" + (" (an arm started from another continues its step count)"
                                  if any(offsets.values()) else "")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _step_curves(ax, study, records, study.curve_metric, offsets, done)
  ax.set_xlabel(step_label)
  ax.set_ylabel(study.curve_metric + " (nats per token)")
  ax.set_title(f"{study.name}: eval loss (mean over seeds, band = min..max)")
  _zoom_to_tail(ax, records, study.curve_metric, done)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  paths.append(save_figure(fig, out_dir, "curves.png"))

  for spec in study.plots:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    if isinstance(spec, StepPlot):
      if spec.log_y:
        ax.set_yscale("log")
      _step_curves(ax, study, records, spec.metric, offsets, done)
      ax.set_xlabel(step_label)
      ax.set_ylabel(spec.ylabel)
      ax.set_title(f"{study.name}: {spec.metric} (mean over seeds, band = min..max)", fontsize=10)
    else:
      if spec.log_x:  # Before drawing: the plots set their own ticks at the arms' x.
        ax.set_xscale("log", base=2)
      if isinstance(spec, ArmPlot):
        _arm_plot(ax, study, spec, final)
      else:
        _metric_plot(ax, study, spec, final)
      ax.set_xlabel(spec.xlabel)
      ax.set_ylabel(spec.ylabel)
      ax.set_title(f"{study.name}: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir, spec.filename))
  return paths


def _step_curves(ax, study: Study, records: Sequence[dict], metric: str,
                 offsets: Mapping[str, int], done: set[tuple[str, int]]) -> None:
  """Per arm, `metric` of its finished runs' evals against step: mean line, min..max band; the
  label's n counts the seeds at the last step."""
  if len(study.arms) > 10:  # More arms than the default color cycle: no two share a color.
    import matplotlib  # pylint: disable=import-outside-toplevel
    ax.set_prop_cycle(color=matplotlib.colormaps["tab20"].colors)
  for arm in study.arms:
    by_step: dict[int, list[float]] = {}
    for r in records:
      if r["arm"] == arm.name and (r["arm"], r["seed"]) in done and metric in r["metrics"]:
        by_step.setdefault(offsets[arm.name] + r["step"], []).append(r["metrics"][metric])
    if not by_step:
      continue
    steps = sorted(by_step)
    mean = [statistics.mean(by_step[s]) for s in steps]
    line, = ax.plot(steps, mean, marker=".", label=f"{arm.name} (n={len(by_step[steps[-1]])})")
    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                    color=line.get_color(), alpha=0.2)


def start_steps(study: Study, records: Sequence[dict]) -> dict[str, int]:
  """Per arm, the optimizer steps its weights had seen before its own step 0: 0 for an arm trained
  from scratch; the source's own offset plus its last recorded step for `start_from` arms."""
  last: dict[str, int] = {}
  for r in records:
    last[r["arm"]] = max(last.get(r["arm"], 0), r["step"])
  by_name = {a.name: a for a in study.arms}
  def offset(arm: Arm) -> int:
    if not arm.start_from:
      return 0
    return offset(by_name[arm.start_from]) + last.get(arm.start_from, 0)
  return {a.name: offset(a) for a in study.arms}


def _values(final, arm: str, metric: str) -> list[float]:
  return [m[metric] for (a, _), m in sorted(final.items()) if a == arm and metric in m]


def _arm_plot(ax, study: Study, spec: ArmPlot, final) -> None:
  series: dict[str, list[Arm]] = {}
  for arm in study.arms:
    if arm.x is not None:
      series.setdefault(arm.series, []).append(arm)
  for name, arms in series.items():
    pts = [(a.x, _values(final, a.name, spec.metric)) for a in arms]
    pts = [(x, v) for x, v in pts if v]
    if pts:
      ax.errorbar([x for x, _ in pts], [statistics.mean(v) for _, v in pts],
                  yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                  marker="o", capsize=3, label=name or spec.metric)
  references = [a for a in study.arms if a.x is None and _values(final, a.name, spec.metric)]
  for arm, color in zip(references, ("black", "tab:red", "tab:gray", "tab:brown")):
    v = _values(final, arm.name, spec.metric)
    m = statistics.mean(v)
    ax.axhline(m, linestyle="--", color=color, label=f"{arm.name} (n={len(v)}, band = ±std)")
    if len(v) > 1:
      s = statistics.stdev(v)
      ax.axhspan(m - s, m + s, color=color, alpha=0.12)
  xs = sorted({a.x for a in study.arms if a.x is not None})
  if xs:
    ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _metric_plot(ax, study: Study, spec: MetricPlot, final) -> None:
  for arm in study.arms:
    pts = [(x, _values(final, arm.name, metric)) for x, metric in spec.points]
    pts = [(x, v) for x, v in pts if v]
    if pts:
      ax.errorbar([x for x, _ in pts], [statistics.mean(v) for _, v in pts],
                  yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts],
                  marker="o", capsize=3, label=arm.name)
  xs = sorted({x for x, _ in spec.points if math.isfinite(x)})
  ax.set_xticks(xs, [f"{x:g}" for x in xs])


def _zoom_to_tail(ax, records, metric, done) -> None:
  """The first eval is far above the rest; fit the y-range to the evals after it."""
  steps = sorted({r["step"] for r in records})
  if len(steps) < 3:
    return
  tail = [r["metrics"][metric] for r in records if r["step"] >= steps[1]
          and (r["arm"], r["seed"]) in done and metric in r["metrics"]]
  if tail:
    lo, hi = min(tail), max(tail)
    pad = 0.05 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)


def save_figure(fig, out_dir: str, name: str) -> str:
  """Lays out, writes `out_dir/name` (PNG, 110 dpi) and closes `fig`; returns the path."""
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.close(fig)
  return path


def verdict_colour(v: Verdict) -> str:
  if v.status in (AGREES,) or v.status.startswith("equivalent within"):
    return "tab:green"
  return "tab:red" if v.status == DISAGREES else "tab:gray"


def forest(rows: Sequence[tuple[str, Verdict, float | None]], path: str, title: str) -> str:
  """A forest plot: per row (label, verdict, paper's effect or None) the paired effect (dot), the
  interval at the multiplicity-adjusted level (thick: excludes 0, or lies within the margin,
  exactly when the verdict is significant) and the raw 95% interval (thin; 90% for equivalence),
  the margin (band) and the paper's value (star); colour = verdict. Each row has its own x-axis:
  claims measure different things (nats, fractions, slopes)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = [r for r in rows if r[1].n > 0]
  fig, axes = plt.subplots(max(len(rows), 1), 1, figsize=(10, 0.55 * max(len(rows), 1) + 1.0),
                           squeeze=False)
  for ax, (label, v, paper) in zip(axes[:, 0], rows):
    colour = verdict_colour(v)
    xs = [0.0, v.effect]
    if v.kind != "spread" and math.isfinite(v.half_width):
      raw = (v.effect - v.half_width, v.effect + v.half_width)
      adj = (v.effect - v.adjusted_half_width, v.effect + v.adjusted_half_width)
      ax.plot(raw, (0, 0), color=colour, linewidth=1, marker="|", markersize=10)
      ax.plot(adj, (0, 0), color=colour, linewidth=4, alpha=0.5, solid_capstyle="butt")
      xs += [*raw, *adj]
    if v.margin is not None:
      ax.axvspan(-v.margin, v.margin, color="tab:green", alpha=0.08)
      xs += [-v.margin, v.margin]
    ax.plot([v.effect], [0], "o", color=colour)
    if paper is not None:
      ax.plot([paper], [0], "*", color="black", markersize=10)
      xs.append(paper)
    ax.axvline(0, color="black", linewidth=0.8)
    lo, hi = min(xs), max(xs)
    pad = 0.08 * (hi - lo) + 1e-6
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks([])
    ax.tick_params(axis="x", labelsize=6, pad=1)
    short = label if len(label) <= 75 else label[:72] + "..."
    ax.set_ylabel(short, rotation=0, ha="right", va="center", fontsize=7)
    status = v.status + ("" if v.kind != "spread" else " (F-test)")
    ax.text(1.01, 0.5, f"{status}\nHolm p={v.p_adjusted:.3g}" if math.isfinite(v.p_adjusted)
            else status, transform=ax.transAxes, fontsize=6.5, va="center", color=colour)
  fig.suptitle(title + "\n(dot: mean paired effect, > 0 = claim holds; thick: Holm-adjusted "
               "interval; thin: raw 95% (90% for equivalence); band: equivalence margin; star: "
               "paper)", fontsize=8, y=1 - 0.1 / fig.get_figheight(), va="top")
  height = fig.get_figheight()
  fig.subplots_adjust(left=0.47, right=0.86, top=1 - 1.0 / height, bottom=0.35 / height,
                      hspace=1.1)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def study_forest(study: Study, records: Sequence[dict], out_dir: str) -> str:
  final = final_records(records)
  rows = [(c.text, v, c.paper_effect) for c, v in zip(study.claims, verdicts(study.claims, final))]
  return forest(rows, os.path.join(out_dir, "forest.png"),
                f"{study.name}: claims ({study.paper})")


def _read_meta(source_dir: str) -> dict:
  path = os.path.join(source_dir, "study.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def report(study: Study, workdir: str, command: str | None = None,
           results_from: str | None = None, plots: bool = True) -> tuple[str, list[str]]:
  """Writes `table.md` (and with `plots`, the plots) into `workdir/<study>/` from the results;
  returns them. `command` defaults to `regenerate_command`."""
  study_dir = os.path.join(workdir, study.name)
  source_dir = os.path.join(workdir, results_from or study.reuse or study.name)
  os.makedirs(study_dir, exist_ok=True)
  records = read_results(os.path.join(source_dir, "results.jsonl"))
  meta = _read_meta(source_dir)
  table = format_table(study, records, command or regenerate_command(study, meta, workdir), meta)
  with open(os.path.join(study_dir, "table.md"), "w") as f:
    f.write(table)
  if not plots:
    return table, []
  return table, plot(study, records, study_dir) + [study_forest(study, records, study_dir)]
