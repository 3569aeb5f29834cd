"""Reproduction studies: arms x seeds of configs, trained resumably, summarised by a table, plots and
verdicts against a paper's claims.

A study is data (`Study`): the paper claim it tests, a list of arms (a config file, its `:arg`, and
dotted overrides), seeds, named scales (overrides applied to every arm: `cpu` runs here, `tpu` is a
Switch-Base-like size for a pod, validated but not run here), and the claims a verdict reads.
`experiments/studies/<name>.py` define them; `experiments/reproduce.py` is the command.

Modules, one concept each:
- `spec`: the dataclasses (`Study`, `Arm`, claims `Better` / `Trend` / `Contrast` /
  `Equivalent` / `Spread`, plots `ArmPlot` / `MetricPlot` / `StepPlot`).
- `keys`: run identity (`config_key`): the resolved config with data named by content, not path.
- `runner`: `run_study` trains what is missing; `arm_config` builds one run's config.
- `results`: `results.jsonl` records and how a finished run becomes records.
- `stats`: paired tests, equivalence tests, Holm–Bonferroni across a study's claims.
- `reporting`: `table.md`, plots, forest plots.

Everything a study writes lives in `DIR/<study>/`: `results.jsonl` (one line per run and eval step;
a run's lines are appended only when it has finished, the last one with `"final": true`),
`study.json` (scale, tokenizer, and the data by name and content hash: a workdir never mixes two),
`table.md`, `*.png`, and `runs/<arm>/seed<k>/` (the trainer's workdir: checkpoints, metrics.jsonl;
never committed).
"""

from moejax.study.keys import KEY_NEUTRAL_DEFAULTS, config_key, data_identity
from moejax.study.reporting import (format_table, forest, plot, regenerate_command, report,
                                    save_figure, start_steps)
from moejax.study.results import final_records, loss_spikes, read_results, run_records
from moejax.study.runner import arm_config, data_meta, run_study
from moejax.study.spec import (Arm, ArmPlot, Better, Claim, Contrast, Equivalent, MetricPlot,
                               Spread, StepPlot, Study, Trend, gain_trend)
from moejax.study.stats import (AGREES, DISAGREES, INCONCLUSIVE, NOT_SHOWN, Verdict, holm,
                                t_quantile_975, verdict, verdicts)

__all__ = [
    "AGREES", "DISAGREES", "KEY_NEUTRAL_DEFAULTS", "INCONCLUSIVE", "NOT_SHOWN", "Arm", "ArmPlot", "Better", "Claim",
    "Contrast", "Equivalent", "MetricPlot", "Spread", "StepPlot", "Study", "Trend", "Verdict",
    "arm_config", "config_key", "data_identity", "data_meta", "final_records", "forest",
    "format_table", "gain_trend", "holm", "loss_spikes", "plot", "read_results", "regenerate_command", "report",
    "run_records", "run_study", "save_figure", "start_steps", "t_quantile_975", "verdict",
    "verdicts",
]
