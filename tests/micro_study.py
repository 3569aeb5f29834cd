"""A micro study for tests/test_study.py: 2 arms x 2 seeds x 6 steps of the runlocal configs."""

from moejax.study import Arm, ArmPlot, Better, Study

STUDY = Study(
    name="micro",
    paper="none (test)",
    claim="top-1 MoE beats dense at equal FLOPs.",
    arms=(Arm("dense", "configs/dense.py:runlocal", paper="-1.731"),
          Arm("switch E=4", "configs/switch.py:runlocal,experts=4", x=4, series="top-1")),
    claims=(Better("E=4 beats dense", "switch E=4", "dense"),
            Better("E=4: no-drop eval beats eval at CF 0.5", "switch E=4", "switch E=4",
                   metric="cfinf/ce", metric_b="cf0.5/ce")),
    scales={"cpu": {"num_train_steps": 6, "eval_every": 3, "checkpoint_every": 3,
                    "log_every": 3, "optim.warmup_steps": 2, "async_checkpoint": False,
                    "eval_capacity_factors": (0.5, float("inf"))},
            "big": {"model.d_model": 64}},
    seeds=(0, 1),
    columns=(("nodrop/ce", "no-drop CE"), ("cf0.5/drop", "dropped at CF 0.5")),
    plots=(ArmPlot("loss_vs_experts.png", "nodrop/ce", "E", "CE", log_x=True),),
)
