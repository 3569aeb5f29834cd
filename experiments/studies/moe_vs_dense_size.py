"""moe_vs_dense_size: does the MoE's gain over FLOP-matched dense grow with model size?

The study was asked for as a test of "Switch Fig. 1 and the small-scale literature" (arXiv
2605.13769: -0.076 nats below 25M parameters). Switch Fig. 1 varies the number of experts at a
fixed base size, not the base size; the closer prior is Clark et al. 2022 (Unified Scaling Laws
for Routed Language Models), who found routing's gain *shrinks* as the base model grows. The claim
below was declared before any run and is kept as declared. Here: dense vs Switch E=8
(top-1, MoE in every other FFN, expert width = dense FFN width, so FLOP-matched at each size) at
three widths d_model in {64, 128, 192} (FFN 4 d_model, 4 heads, 4 layers: the same depth), 3,000
steps each on the documentation corpus, 3 seeds. Nothing else changes: optimizer, learning rate,
schedule, data order and tokens are those of `moe_vs_dense_long`, whose runs are the d_model = 128
arms (same configs, same config keys: reused, not retrained).

CPU scale, measured on 2 idle cores (`experiments/time_study_arm.py --steps=300`, compilation
included): switch d=192 131 s, dense d=192 97 s, switch d=64 53 s, so at most 22, 16 and 9 min
per 3,000-step run (d=64 dense less); ~50 min of new training per seed, ~2 h 30 min for 3 seeds
(the d=128 runs are reused).

    python experiments/reproduce.py --study=moe_vs_dense_size --workdir=experiments/results \\
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Study, gain_trend

from studies import scales

WIDTHS = (64, 128, 192)


def dense(d: int) -> str:
  return f"dense d={d}"


def switch(d: int) -> str:
  return f"switch E=8 d={d}"


def width(d: int, moe: bool) -> dict:
  """d_model and FFN width scaled by d / 128 from the scale's own (cpu: 128 and 512, so exactly d
  and 4 d; tpu: 768 -> 384 / 768 / 1,152); the experts as wide as the dense FFN."""
  out = {"model.d_model": lambda c: c.model.d_model * d // 128,
         "model.d_ff": lambda c: c.model.d_ff * d // 128}
  return {**out, "model.moe.d_ff": lambda c: c.model.d_ff} if moe else out


STUDY = Study(
    name="moe_vs_dense_size",
    paper="arXiv 2605.13769 (small-scale MoE gains); Clark et al. 2022 (routing gains vs base size)",
    claim=("At equal FLOPs per token the MoE's gain over dense grows with model width; published "
           "small-scale results find about 0.08 nats below 25M parameters."),
    arms=tuple(arm for d in WIDTHS for arm in (
        Arm(dense(d), "configs/dense.py", width(d, moe=False), x=d, series="dense"),
        Arm(switch(d), "configs/switch.py:experts=8", width(d, moe=True), x=d,
            series="switch E=8"))),
    claims=(
        gain_trend("the MoE gain grows with width (slope of dense - switch per doubling of "
                   "d_model)", [(d, dense(d), switch(d)) for d in WIDTHS]),
        *(Better(f"d_model {d}: switch E=8 beats dense", switch(d), dense(d)) for d in WIDTHS),
    ),
    scales={"cpu": scales.cpu(3000), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("train_ce", "train CE (last fifth)"),
             ("train_drop", "dropped in training (CF 1.25)")),
    plots=(ArmPlot("loss_vs_width.png", "nodrop/ce", "d_model", "no-drop eval CE (nats/byte)",
                   log_x=True),),
    notes=("The d_model = 128 arms are `moe_vs_dense_long`'s runs (reused by config key; they "
           "predate `train_ce`). Parameters per arm: `--dry_run`. The gain slope weighs each width "
           "by its distance from the mean log2 width."),
)
