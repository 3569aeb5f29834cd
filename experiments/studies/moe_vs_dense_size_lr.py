"""moe_vs_dense_size_lr: is the MoE's deficit at d_model 192 the learning rate's doing?

`moe_vs_dense_size` found the Switch E=8 gain shrinking with width and reversing at d_model 192
(-0.019 +- 0.009 nats, 3 seeds), with Switch d=192 ending worse than Switch d=128 on every seed
while dense kept improving. Every width used the learning rate set at d=128 (3e-3), for both
arms. Wider models usually want a smaller Adam learning rate, and the MoE layer's router logits
grew with width there. This study gives *both* arms the same one-step grid at d=192: the shared
learning rate and half of it, nothing else changed, nothing tuned per arm. The full-rate arms are
`moe_vs_dense_size`'s d=192 runs (same configs, reused by config key).

Declared before any half-rate run. Claim 1 counts as an MoE win only if Switch at half rate also
beats dense at the shared rate (claim 2 below); otherwise Switch would only beat a dense model the
half rate handicapped. If halving helps Switch (claim 3) and its gain returns (claims 1, 2 and 5),
the size study's reversal was the shared learning rate at d=192. If not, the rate is not cleared:
at 3,000 steps a lower rate can also hurt an under-trained model, and a quarter rate is not tried.
Either way d=64 and d=128 stay at the shared rate, so the size study's trend claim is not retested.

The full-rate runs were trained before this study was written; the config key pins the config,
not the code. Before reading claims 3-5, check that no commit between the two changed the numerics
of training (`git log -- moejax/`).

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
    paper="arXiv 2605.13769 (MoE gains at small scale); Clark et al. 2022 (routing gains shrink with base size)",
    claim=("At d_model 192 the MoE's deficit to FLOP-matched dense comes from the learning rate "
           "set at d_model 128: at half that rate Switch E=8 beats dense at either rate."),
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
        Better(f"d_model {D}: switch E=8 at half rate beats dense at the shared rate",
               SWITCH_HALF, DENSE),
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
           "key; trained before this study was written). A one-step grid at one width: if half "
           "the rate helps, a quarter might help more, and d_model 64 / 128 keep the shared "
           "rate; a failed claim does not clear the learning rate."),
)
