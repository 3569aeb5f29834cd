"""upcycling: sparse upcycling (Komatsuzaki et al. 2022) against continuing the dense model and
against a MoE trained from scratch.

A dense model (`configs/dense.py`) is trained for 600 steps (`dense base`). From its final
checkpoint, two arms train 600 more steps each: `dense continued` (every parameter copied) and
`upcycled` (`configs/switch.py`, E=8, top-1: every expert of each MoE layer starts as that
layer's dense MLP, routers fresh; `moejax.upcycle.start_run`). Both get a fresh AdamW state and
the same fresh schedule (60 warmup steps, cosine over 600), and read the documents after those
the base read (its data position is carried over). `MoE scratch` trains the same MoE for 600
steps from a random init: the same extra compute without the dense sunk cost. For reference,
`moe_vs_dense`'s 1,200-step runs (`dense 2x steps`, `MoE scratch 2x steps`: one schedule over
the same total steps) are reused, not retrained. The MoE arms are FLOP-matched to dense
(top-1, experts of the dense width every other layer).

CPU scale: 600 + 600 steps x 2,048 tokens on the documentation corpus; 12 runs of ~3.5 min
(6 reused from `moe_vs_dense`), ~45 min on 2 cores.

    python experiments/reproduce.py --study=upcycling --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, Better, Study

from studies import scales

SWITCH = "configs/switch.py:experts=8"
# Twice the scale's steps (1,200 at the CPU scale), evaluated and checkpointed as often.
LONG = {"num_train_steps": lambda c: 2 * c.num_train_steps,
        "eval_every": lambda c: 2 * c.eval_every,
        "checkpoint_every": lambda c: 2 * c.checkpoint_every}

STUDY = Study(
    name="upcycling",
    paper="Komatsuzaki et al. 2022 (Sparse Upcycling), Figs. 2-3",
    claim=("At equal extra compute, upcycling a dense checkpoint beats both continuing the dense "
           "model and training the MoE from scratch; a MoE from scratch needs a much larger budget "
           "to catch up."),
    arms=(
        Arm("dense base", "configs/dense.py"),
        Arm("dense continued", "configs/dense.py", start_from="dense base"),
        Arm("upcycled", SWITCH, start_from="dense base"),
        Arm("MoE scratch", SWITCH),
        Arm("dense 2x steps", "configs/dense.py", LONG),
        Arm("MoE scratch 2x steps", SWITCH, LONG),
    ),
    claims=(
        Better("upcycling beats continuing the dense model (600 extra steps)", "upcycled",
               "dense continued"),
        Better("upcycling beats a MoE from scratch at equal extra compute", "upcycled",
               "MoE scratch"),
        Better("upcycling beats a MoE from scratch at equal total steps (1,200)", "upcycled",
               "MoE scratch 2x steps"),
        Better("a restarted schedule (dense continued) beats one 1,200-step schedule",
               "dense continued", "dense 2x steps"),
    ),
    scales={"cpu": scales.cpu(600), "tpu": scales.TPU},
    notes=("Continuation arms restart the learning-rate schedule (warmup + cosine over their 600 "
           "steps) with a fresh optimizer state, as Komatsuzaki et al. do; `curves.png` plots them "
           "at the total steps their weights have seen (the base's 600 plus their own). The "
           "1,200-step arms are reused from `moe_vs_dense` when their configs match (same key)."),
)
