"""moe_vs_dense_data: when does MoE beat dense at our scale? The gain against unique training text.

The headline configs, nothing tuned: `configs/dense.py` and `configs/switch.py:experts=8` (the
`moe_vs_dense_long` arms, 3,000 steps x 16 x 128 tokens = 6.1M tokens, 3 seeds) trained on the
documentation corpus's training split capped to 1 MB and 4 MB of unique text (`data.train_max_bytes`:
a fixed random subset of documents, nested, both files represented), or on all of it (30.4 MB,
195,968 documents: these arms are `moe_vs_dense_long`'s runs, reused by config key). Every arm is
evaluated on the same held-out 5% of the corpus (the cap never touches the validation split).
Epochs over the unique text: 6.1M tokens / 1.0 MB = 6.1 at 1 MB, 1.5 at 4 MB, 0.2 at 30.4 MB (byte
tokens: one per byte, plus one per document boundary).

Pre-declared before any run: Switch with expert dropout 0.4 (Switch's fine-tuning setting against
overfitting small data) at 1 MB, run whatever the other arms show.

Measured: no-drop eval CE; `train_ce` (training-batch CE over the last fifth of training) and
`generalisation_gap` = eval - train (new runs only: the reused 30.4 MB runs predate it).

    python experiments/reproduce.py --study=moe_vs_dense_data --workdir=experiments/results \\
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Contrast, Study, gain_trend

from studies import scales

SIZES_MB = (1.0, 4.0, 30.4)  # 30.4: the whole training split (no cap)


def dense(mb: float) -> str:
  return f"dense {mb:g} MB" + (" (all)" if mb == SIZES_MB[-1] else "")


def switch(mb: float) -> str:
  return f"switch E=8 {mb:g} MB" + (" (all)" if mb == SIZES_MB[-1] else "")


def cap(mb: float) -> dict:
  return {} if mb == SIZES_MB[-1] else {"data.train_max_bytes": int(mb * 1_000_000)}


DROPOUT = "switch E=8 1 MB, expert dropout 0.4"

STUDY = Study(
    name="moe_vs_dense_data",
    paper="Switch Transformer Fig. 4 (gains grow with tokens) and its fine-tuning section (expert "
          "dropout against overfitting)",
    claim=("At equal steps the MoE's gain over FLOP-matched dense grows with the amount of distinct "
           "training text; with little text its extra parameters memorise (a larger generalisation "
           "gap), which expert dropout is meant to counter."),
    arms=(*(arm for mb in SIZES_MB for arm in (
              Arm(dense(mb), "configs/dense.py", cap(mb), x=mb, series="dense"),
              Arm(switch(mb), "configs/switch.py:experts=8", cap(mb), x=mb, series="switch E=8"))),
          Arm(DROPOUT, "configs/switch.py:experts=8",
              {**cap(1.0), "model.moe.expert_dropout": 0.4}, x=None)),
    claims=(
        gain_trend("the MoE gain grows with unique text (slope of dense - switch per doubling)",
                   [(mb, dense(mb), switch(mb)) for mb in SIZES_MB]),
        *(Better(f"{mb:g} MB: switch E=8 beats dense", switch(mb), dense(mb)) for mb in SIZES_MB),
        Contrast("1 MB: switch's generalisation gap exceeds dense's",
                 ((1.0, switch(1.0), "generalisation_gap"),
                  (-1.0, dense(1.0), "generalisation_gap"))),
        Better("1 MB: expert dropout 0.4 improves switch", DROPOUT, switch(1.0)),
        Better("1 MB: switch with expert dropout 0.4 beats dense", DROPOUT, dense(1.0)),
    ),
    scales={"cpu": scales.cpu(3000), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("train_ce", "train CE (last fifth)"),
             ("generalisation_gap", "eval - train CE")),
    plots=(ArmPlot("loss_vs_data.png", "nodrop/ce", "unique training text (MB)",
                   "no-drop eval CE (nats/byte)", log_x=True),),
    notes=("Reused: the 30.4 MB arms are `moe_vs_dense_long`'s runs (same configs and data, so "
           "the same config keys); they predate `train_ce`, so their gap is not shown. The "
           "slope contrast weighs each size by its distance from the mean log size. Train CE is "
           "measured on training batches in training mode (router jitter and capacity drops on, "
           "expert dropout on for the dropout arm), so the gap also holds those effects."),
)
