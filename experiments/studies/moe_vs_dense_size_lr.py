"""moe_vs_dense_size_lr: is the MoE's loss at d_model 192 the learning rate's doing?

`moe_vs_dense_size` found the Switch E=8 gain shrinking with width and reversing at d_model 192
(-0.019 +- 0.009 nats, 3 seeds), with Switch d=192 ending worse than Switch d=128 on every seed
while dense kept improving. Every width used the learning rate set at d=128 (3e-3), for both
arms. Wider models usually want a smaller Adam learning rate, and the MoE layer's router logits
grew with width there. This study gives *both* arms the same one-step grid at d=192: the shared
learning rate and half of it, nothing else changed, nothing tuned per arm. The full-rate arms are
`moe_vs_dense_size`'s d=192 runs (same configs, reused by config key).

Declared before any half-rate run. If halving helps Switch (claim 2) and its gain returns
(claims 1 and 4), the size study's reversal was the shared learning rate; if not, it stands as a
property of this recipe at this budget.

CPU scale: 6 new runs of 23-29 min on 2 cores (`moe_vs_dense_size`'s d=192 times), ~2 h 30 min.

    python experiments/reproduce.py --study=moe_vs_dense_size_lr --workdir=experiments/results \\
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, Better, Contrast, Study

from studies import moe_vs_dense_size, scales

D = 192
DENSE, SWITCH = moe_vs_dense_size.dense(D), moe_vs_dense_size.switch(D)
DENSE_HALF, SWITCH_HALF = f"{DENSE} lr/2", f"{SWITCH} lr/2"
HALF_LR = {"optim.learning_rate": lambda c: c.optim.learning_rate / 2}

STUDY = Study(
    name="moe_vs_dense_size_lr",
    paper="Switch Transformer Fig. 1 (sparse gains grow with scale), checked against our recipe",
    claim=("At d_model 192 the MoE's loss to FLOP-matched dense comes from the learning rate set "
           "at d_model 128: with half that rate for both arms, Switch E=8 beats dense again."),
    arms=(
        Arm(DENSE, "configs/dense.py", moe_vs_dense_size.width(D, moe=False), series="dense"),
        Arm(SWITCH, "configs/switch.py:experts=8", moe_vs_dense_size.width(D, moe=True),
            series="switch E=8"),
        Arm(DENSE_HALF, "configs/dense.py", {**moe_vs_dense_size.width(D, moe=False), **HALF_LR},
            series="dense"),
        Arm(SWITCH_HALF, "configs/switch.py:experts=8",
            {**moe_vs_dense_size.width(D, moe=True), **HALF_LR}, series="switch E=8"),
    ),
    claims=(
        Better(f"d_model {D}, half learning rate: switch E=8 beats dense", SWITCH_HALF,
               DENSE_HALF),
        Better(f"half the learning rate helps switch E=8 at d_model {D}", SWITCH_HALF, SWITCH),
        Better(f"half the learning rate helps dense at d_model {D}", DENSE_HALF, DENSE),
        Contrast(f"the MoE gain at d_model {D} is larger at half the learning rate",
                 ((1.0, DENSE_HALF, "nodrop/ce"), (-1.0, SWITCH_HALF, "nodrop/ce"),
                  (-1.0, DENSE, "nodrop/ce"), (1.0, SWITCH, "nodrop/ce"))),
    ),
    scales={"cpu": scales.cpu(3000), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("train_ce", "train CE (last fifth)"),
             ("train_drop", "dropped in training (CF 1.25)")),
    notes=("The full-rate arms are `moe_vs_dense_size`'s d_model = 192 runs (reused by config "
           "key). A one-step grid: if half the rate helps, a quarter might help more; this study "
           "does not look."),
)
