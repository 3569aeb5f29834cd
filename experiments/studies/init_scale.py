"""init_scale: Switch Transformer Table 3 (weight-init scale 0.1 vs 1.0).

`configs/switch.py` (E=8, top-1) with the MoE layer's router and expert weights drawn from a
truncated normal of std sqrt(s / fan_in), s = 0.1 against s = 1.0 (Switch scaled *every* weight of
the model; here only the MoE layer's, the part moejax owns: the attention and dense weights keep
their init). 5 seeds, because the claim is about the spread across seeds; a short run (600 steps,
1.2M tokens), because the claim is about early training.

CPU scale: 600 steps x 2,048 tokens on the documentation corpus; 10 runs, 5.2 min each on 2 cores
(table `min/run`), ~55 min in all.

    python experiments/reproduce.py --study=init_scale --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, Better, Spread, Study

from studies import scales


def _scale(s: float) -> dict:
  return {"model.moe.router_init_scale": s, "model.moe.expert_init_scale": s}


STUDY = Study(
    name="init_scale",
    paper="Switch Transformer Table 3",
    claim=("Initialising with scale 0.1 instead of 1.0 gives a lower early-training loss and a much "
           "smaller spread across seeds (Switch Table 3, 3.5k steps, 3 seeds: -2.72 +- 0.01 vs "
           "-3.60 +- 0.68 neg. log perplexity)."),
    arms=(Arm("scale 0.1", "configs/switch.py", _scale(0.1), paper="-2.72 +- 0.01"),
          Arm("scale 1.0", "configs/switch.py", _scale(1.0), paper="-3.60 +- 0.68")),
    claims=(Better("scale 0.1 reaches a lower no-drop loss", "scale 0.1", "scale 1.0"),
            Spread("scale 0.1 varies less across seeds", "scale 0.1", "scale 1.0")),
    seeds=(0, 1, 2, 3, 4),
    scales={"cpu": scales.cpu(600), "tpu": {**scales.TPU, "num_train_steps": 3_500,
                                           "optim.warmup_steps": 1_000, "eval_every": 500,
                                           "checkpoint_every": 500}},
    columns=(("nodrop/ce", "no-drop eval CE"), ("moe/z_loss", "router z-loss"),
             ("load_cv", "router load CV")),
)
