"""families: the family configs (`configs/dense.py`, `switch.py`, `gshard.py`, `stmoe.py`) as they
are, on real text, multi-seed: the table of `docs/training.md`.

Each config keeps its own recipe (stmoe.py: Adafactor with rsqrt decay at 1e-2, z-loss; gshard.py:
random second expert, GShard loss; switch.py: top-1, jitter), so this compares recipes, not one
knob; the routing ablations that isolate one knob are `capacity` and the routing-policy studies.
All four are FLOP-matched (5.70M vs 5.72M train FLOPs per token). `dense` and `switch` are the
same runs as `moe_vs_dense`'s `dense` and `switch E=8` (reused, not retrained).

CPU scale: 1,200 steps x 2,048 tokens on the documentation corpus, ~6 min per run on 2 cores.

    python experiments/reproduce.py --study=families --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, Better, Study

from studies import moe_vs_dense, scales

STUDY = Study(
    name="families",
    paper="Switch Transformer, GShard, ST-MoE (each paper's recipe at toy scale)",
    claim=("Each MoE recipe beats the FLOP-matched dense baseline (Switch Table 1, GShard, ST-MoE "
           "all report sparse models ahead of their dense baselines at equal FLOPs)."),
    arms=(Arm("dense", "configs/dense.py"),
          Arm("switch", "configs/switch.py"),
          Arm("gshard", "configs/gshard.py"),
          Arm("stmoe", "configs/stmoe.py")),
    claims=tuple(Better(f"{name} beats dense", name, "dense")
                 for name in ("switch", "gshard", "stmoe")),
    scales={"cpu": scales.cpu(1200), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("ce", "eval CE (CF 2.0)"),
             ("train_drop", "dropped in training"), ("moe/z_loss", "router z-loss (eval)")),
    notes=moe_vs_dense.STUDY.notes.split(" Train FLOPs")[0],
)
