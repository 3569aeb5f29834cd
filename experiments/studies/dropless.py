"""dropless: dropping or dropless? Capacity-factor experts against dropless grouped-matmul experts.

`configs/switch.py` (E=8 experts in layers 1 and 3, Switch balance loss 1e-2, jitter 1e-2) with
top-1 (softmax gate, experts F=512) and top-2 (GShard gates, experts F=256, FLOP-matched), trained
at capacity factor 1.0 / 1.25 / 2.0 (choice-major position priority, overflow dropped: the token
rides the residual) or dropless (`model.moe.dispatch="dropless"`: every choice computed, grouped
matmuls, MegaBlocks). Everything else is identical: optimizer, learning rate, steps, data order,
seeds. All arms are compared by the no-drop eval CE (a capacity arm evaluated without drops; a
dropless arm's eval never drops).

The capacity arms are the `capacity` study's arms of the same name, bit for bit (same config
key): the runner reuses their finished runs and trains only the dropless arms. The dropless arms
were trained after the capacity ones, with the same code for everything but the FFN dispatch.

Pre-declared claims (MegaBlocks, Gale et al. 2023: dropless matches or beats every capacity
factor at equal steps): dropless beats CF 1.0 and CF 1.25 for both k; against CF 2.0 (few drops
left) the difference is expected to be small, so it is tested too, and an inconclusive verdict
there means "not separable at 3 seeds", not "equal".

    python experiments/reproduce.py --study=dropless --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Study

from studies import capacity, scales

CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def dropless(k: int) -> str:
  return f"top-{k} dropless"


STUDY = Study(
    name="dropless",
    paper="MegaBlocks (Gale et al. 2023) Fig. 6-7; Switch Transformer Table 1",
    claim=("Dropless experts (no capacity, no token dropped) reach a lower loss than capacity-"
           "factor experts at equal steps: MegaBlocks reports dropless MoEs matching or beating "
           "every capacity factor it tried, with the largest gains over the smallest factors."),
    arms=(*(arm for arm in capacity.STUDY.arms if arm.x in CAPACITY_FACTORS),
          *(Arm(dropless(k), "configs/switch.py:experts=8",
                {"model.moe.dispatch": "dropless",
                 **({"model.moe.top_k": 2, "model.moe.gate": "gshard",
                     "model.moe.d_ff": lambda c: c.model.d_ff // 2} if k == 2 else {})},
                x=None, series=f"top-{k}")
            for k in (1, 2))),
    claims=tuple(Better(f"top-{k}: dropless beats train CF {cf:g}", dropless(k),
                        capacity.name(k, cf))
                 for k in (1, 2) for cf in CAPACITY_FACTORS),
    scales={"cpu": scales.cpu(1200), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("ce", "eval CE (eval CF 2; dropless: none)"),
             ("train_drop", "dropped in training")),
    plots=(ArmPlot("loss_vs_capacity.png", "nodrop/ce", "train capacity factor (dashed: dropless)",
                   "no-drop eval CE (nats/byte)"),),
    notes=("Capacity arms: runs of the `capacity` study (reused records). `dropped in training` "
           "is the fraction of expert choices that found their expert full, averaged over MoE "
           "layers and the steps logged in the last fifth of training (0 for dropless). "
           "`min/run` is the wall time of one run on 2 CPU cores; the dropless arms use the "
           "blocked grouped matmul (`moejax.grouped`), whose cost on CPU is not what it is on "
           "an accelerator."),
)
