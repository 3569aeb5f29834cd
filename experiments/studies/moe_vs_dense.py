"""moe_vs_dense: Switch Transformer Fig. 4 / Table 7 (scaling the number of experts at fixed FLOPs).

Dense `configs/dense.py` (D=128, 4 layers, F=512 ReLU) against `configs/switch.py` (every other FFN
replaced by E top-1 experts of the same width: equal active FLOPs per token), E in {2, 4, 8, 16, 32},
plus a dense model with as many *total* parameters as E=8 (every FFN 4.5x wider: 2F + 2*8F = 4 *
4.5F). Every arm uses the same optimizer, learning rate (AdamW 3e-3, cosine, 60 warmup steps),
data order and steps: nothing is tuned per arm.

CPU scale: 1,200 steps x 16 x 128 tokens (2.5M tokens), byte-level, on the 32 MB documentation
corpus; measured on 2 cores: ~40 min per seed for the 7 arms, ~2 h for 3 seeds.

    python experiments/reproduce.py --study=moe_vs_dense --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Study, Trend

from studies import scales

EXPERTS = (2, 4, 8, 16, 32)

STUDY = Study(
    name="moe_vs_dense",
    paper="Switch Transformer (Fedus et al. 2021), Fig. 4 and Table 7",
    claim=("At equal FLOPs per token, eval loss falls as the number of experts grows, and top-1 "
           "MoE with E >= 8 beats the FLOP-matched dense model (Switch-Base 128 experts: "
           "-1.561 vs T5-Base -1.731 neg. log perplexity after 100k steps)."),
    arms=(
        Arm("dense", "configs/dense.py", paper="T5-Base -1.731"),
        *(Arm(f"switch E={e}", f"configs/switch.py:experts={e}", x=e, series="top-1 MoE")
          for e in EXPERTS),
        Arm("dense, total params of E=8", "configs/dense.py",
            {"model.d_ff": lambda c: c.model.d_ff * (2 + 2 * 8) // 4}),
    ),
    claims=(
        Better("E=8 beats FLOP-matched dense", "switch E=8", "dense"),
        Better("E=32 beats FLOP-matched dense", "switch E=32", "dense"),
        Trend("loss falls with log2(E)", tuple(f"switch E={e}" for e in EXPERTS)),
        Better("dense with E=8's total params beats E=8 (small reproductions: usually)",
               "dense, total params of E=8", "switch E=8"),
    ),
    scales={"cpu": scales.cpu(1200), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("ce", "eval CE (CF 2.0)"),
             ("drop", "dropped at CF 2.0"), ("train_drop", "dropped in training (CF 1.25)")),
    plots=(ArmPlot("loss_vs_experts.png", "nodrop/ce", "experts E (top-1, every other layer)",
                   "no-drop eval CE (nats/byte)", log_x=True),),
    notes=("Dense arms have no routing, so their no-drop CE is their eval CE. Train FLOPs per token "
           "are equal for dense and every MoE arm (5.70M vs 5.72M-5.75M: the router), but the "
           "total-params dense arm costs 2.9x more FLOPs per token."),
)
