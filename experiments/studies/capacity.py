"""capacity: Switch Transformer Table 1 and ST-MoE Table 8 (train capacity factor x top-k).

`configs/switch.py` (E=8 experts in layers 1 and 3, Switch balance loss 1e-2, jitter 1e-2) trained at
capacity factor {0.5, 1.0, 1.25, 2.0}, with top-1 (softmax gate, experts F=512) and top-2 (GShard
gates renormalised over the two choices, both always used, experts F=256). Top-2 is FLOP-matched
to top-1 here (2 x F/2): a stricter test than Switch Table 1, whose top-2 "MoE-Base" used experts
as wide as Switch's and so more FLOPs per token. Capacity per expert per group (one group = one
128-token sequence) is C = ceil(k * CF * S / E): 8 / 16 / 20 / 32 slots at top-1, twice that at
top-2. Every run is evaluated at the end at eval CF {0.5, 1, 1.25, 2, inf} (the `eval_capacity`
study reads those). Same optimizer, learning rate and steps for every arm.

CPU scale: 1,200 steps x 2,048 tokens on the documentation corpus (as `moe_vs_dense`; its `switch
E=8` arm is this study's `top-1 CF 1.25`, bit for bit); measured on 2 cores: see table.md (min/run).

    python experiments/reproduce.py --study=capacity --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Contrast, Study, Trend

from studies import scales

CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0)
EVAL_CAPACITY_FACTORS = (0.5, 1.0, 1.25, 2.0, float("inf"))
# Switch Table 1 (neg. log perplexity at 100k steps, 128 experts; top-2 there has more FLOPs).
PAPER = {(1, 1.0): "-1.561", (1, 1.25): "-1.553", (1, 2.0): "-1.554",
         (2, 1.0): "-1.572", (2, 1.25): "-1.559", (2, 2.0): "-1.547"}


def name(k: int, cf: float) -> str:
  return f"top-{k} CF {cf:g}"


STUDY = Study(
    name="capacity",
    paper="Switch Transformer Table 1; ST-MoE Table 8",
    claim=("Quality improves with the train capacity factor with diminishing returns (Switch-Base "
           "CF 1.0 / 1.25 / 2.0: -1.561 / -1.553 / -1.554), top-2 beats top-1 at equal CF (ST-MoE; "
           "in Switch Table 1 only at CF 2.0), and evaluating at a higher CF than training "
           "recovers loss (ST-MoE Table 8: +0.013 nats for top-1 trained at CF 1.0)."),
    arms=tuple(
        Arm(name(k, cf), "configs/switch.py:experts=8",
            {"model.moe.capacity_factor": cf,
             "eval_capacity_factors": EVAL_CAPACITY_FACTORS,
             **({"model.moe.top_k": 2, "model.moe.gate": "gshard",
                 "model.moe.d_ff": lambda c: c.model.d_ff // 2} if k == 2 else {})},
            x=cf, series=f"top-{k}", paper=PAPER.get((k, cf), ""))
        for k in (1, 2) for cf in CAPACITY_FACTORS),
    claims=(
        *(Trend(f"top-{k}: no-drop loss falls as train CF grows",
                tuple(name(k, cf) for cf in CAPACITY_FACTORS)) for k in (1, 2)),
        *(Contrast(f"top-{k}: diminishing returns, gain 0.5->1.0 exceeds gain 1.25->2.0",
                   ((1, name(k, 0.5), "nodrop/ce"), (-1, name(k, 1.0), "nodrop/ce"),
                    (-1, name(k, 1.25), "nodrop/ce"), (1, name(k, 2.0), "nodrop/ce")))
          for k in (1, 2)),
        *(Better(f"top-2 beats top-1 at CF {cf:g}", name(2, cf), name(1, cf))
          for cf in CAPACITY_FACTORS),
        *(Better(f"top-{k} trained at CF {cf:g}: eval at CF 2 beats eval at CF {cf:g}",
                 name(k, cf), name(k, cf), metric="cf2/ce", metric_b=f"cf{cf:g}/ce")
          for k in (1, 2) for cf in (0.5, 1.0)),
    ),
    scales={"cpu": scales.cpu(1200), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("cf2/ce", "eval CE at CF 2"),
             ("train_drop", "dropped in training"), ("cf2/drop", "dropped at eval CF 2")),
    plots=(ArmPlot("loss_vs_capacity.png", "nodrop/ce", "train capacity factor",
                   "no-drop eval CE (nats/byte)"),
           ArmPlot("drop_vs_capacity.png", "train_drop", "train capacity factor",
                   "fraction of expert choices dropped in training")),
    notes=("`dropped in training` is the fraction of expert choices (top-2: of both choices) that "
           "found their expert full, averaged over MoE layers and over the steps logged (every "
           "50th) in the last fifth of training. The "
           "paper column is Switch Table 1 (negative log perplexity, 100k steps, T5 vocabulary): "
           "compare directions, not values."),
)
