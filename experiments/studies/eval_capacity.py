"""eval_capacity: ST-MoE Table 8 for every arm of `capacity` (no training: it reads those runs).

Each `capacity` run is evaluated at its end at eval capacity factor {0.5, 1, 1.25, 2, inf} on the
same 32 x 2,048 held-out tokens; this study tabulates and plots those numbers.

    python experiments/reproduce.py --study=eval_capacity --workdir=experiments/results
"""

from moejax.study import Better, MetricPlot, Study

from studies import capacity

_CF = capacity.EVAL_CAPACITY_FACTORS


def _key(cf: float) -> str:
  return f"cf{cf:g}/ce"


STUDY = Study(
    name="eval_capacity",
    paper="ST-MoE Table 8",
    claim=("Raising the eval capacity factor above the train one lowers eval loss (ST-MoE Table 8: "
           "top-1 train CF 1.0, eval 1.0 -> 2.0: -1.397 -> -1.384; top-2 train 1.25, eval 1.25 -> "
           "2.0: -1.375 -> -1.369), and no-drop eval is the upper end of that curve."),
    arms=capacity.STUDY.arms,
    claims=(
        Better("top-1 trained at CF 1: eval CF 2 beats eval CF 1 (ST-MoE: +0.013)",
               capacity.name(1, 1.0), capacity.name(1, 1.0), metric="cf2/ce", metric_b="cf1/ce",
               paper_effect=0.013),
        Better("top-2 trained at CF 1.25: eval CF 2 beats eval CF 1.25 (ST-MoE: +0.006)",
               capacity.name(2, 1.25), capacity.name(2, 1.25), metric="cf2/ce",
               metric_b="cf1.25/ce", paper_effect=0.006),
        Better("top-1 trained at CF 2: no-drop eval beats eval CF 2", capacity.name(1, 2.0),
               capacity.name(1, 2.0), metric="cfinf/ce", metric_b="cf2/ce"),
    ),
    scales=capacity.STUDY.scales,
    columns=tuple((_key(cf), f"eval CF {cf:g}") for cf in _CF),
    plots=(MetricPlot("loss_vs_eval_capacity.png",
                      tuple((cf if cf != float("inf") else 4.0, _key(cf)) for cf in _CF),
                      "eval capacity factor (4 = no drop)", "eval CE (nats/byte)", log_x=True),),
    reuse="capacity",
    notes="Rows are the `capacity` runs (train CF and k in the arm name); columns the eval CF.",
)
