"""routing_policies: GShard's second-expert policies, drop priority (position / token / batch-
prioritized) and Switch's No-Token-Left-Behind rerouting, each with its causal leak measured.

Top-2 arms: `configs/switch.py` with top_k=2, GShard gates renormalised over the two choices,
experts F/2 (FLOP-matched to top-1), E=8, train CF 1.0 unless named. Top-1 arms: `switch.py` at CF
1.0. Expert choice (added after the first 30 runs, for its leak): experts pick 2 S / E tokens each,
experts F/2. Every token-choice run is evaluated at eval CF {0.5, 1, 1.25, 2, inf} (as `capacity`)
and its routing leak is measured on 128 positions (`moejax.causal`: causal minus teacher-forced CE
at the eval CF 2.0; zero for causal-safe routing).

CPU scale: 600 steps x 2,048 tokens (half of `capacity`'s 1,200, so that the first 10 arms x 3
seeds fit the ~2 h budget of a study: 116 min; nothing is reused, since the leak needs each run's
checkpoint); 33 runs, arm means 2.8-4.3 min per run on 2 cores. The leak at each run's train CF,
3 seeds: the `routing_leak` study (one-seed numbers from before it: `leak_at_train_cf.md`).

    python experiments/reproduce.py --study=routing_policies --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, Better, Equivalent, Study

from studies import capacity, scales


def _top2(cf: float, **moe) -> dict:
  return {"model.moe.capacity_factor": cf, "eval_capacity_factors": capacity.EVAL_CAPACITY_FACTORS,
          "model.moe.top_k": 2, "model.moe.gate": "gshard",
          "model.moe.d_ff": lambda c: c.model.d_ff // 2,
          **{f"model.moe.{k}": v for k, v in moe.items()}}


def _top1(**moe) -> dict:
  return {"model.moe.capacity_factor": 1.0,
          "eval_capacity_factors": capacity.EVAL_CAPACITY_FACTORS,
          **{f"model.moe.{k}": v for k, v in moe.items()}}


SWITCH = "configs/switch.py:experts=8"
# Each expert takes its top C = 2 S / E tokens of a group (Zhou et al. 2022; 2 experts per token on
# average, experts F/2 as the top-2 arms). The capacity is part of the model here, so eval runs at
# the train value and there is no no-drop or CF sweep (its `nodrop/ce` is its CE at CF 1).
EXPERT_CHOICE = {"model.moe.choice": "expert", "model.moe.top_k": 2,
                 "model.moe.capacity_factor": 1.0, "model.moe.eval_capacity_factor": 1.0,
                 "model.moe.d_ff": lambda c: c.model.d_ff // 2}

STUDY = Study(
    name="routing_policies",
    paper="GShard Alg. 1; ST-MoE Table 18 (BPR); Switch appendix (No-Token-Left-Behind)",
    claim=("Batch-prioritized routing beats position priority when capacity is short (ST-MoE Table "
           "18, encoder); rerouting overflow to the next expert gives no gain (Switch "
           "No-Token-Left-Behind); and in a decoder, BPR, choice-major top-2 and reroute leak "
           "the future while token priority does not."),
    arms=(
        Arm("top-2 position CF 1", SWITCH, _top2(1.0)),
        Arm("top-2 random CF 1", SWITCH, _top2(1.0, second_expert_policy="random")),
        Arm("top-2 threshold CF 1", SWITCH, _top2(1.0, second_expert_policy="threshold")),
        Arm("top-2 token CF 1", SWITCH, _top2(1.0, priority="token")),
        Arm("top-2 BPR CF 1", SWITCH, _top2(1.0, priority="probability")),
        Arm("top-2 position CF 0.5", SWITCH, _top2(0.5)),
        Arm("top-2 token CF 0.5", SWITCH, _top2(0.5, priority="token")),
        Arm("top-2 BPR CF 0.5", SWITCH, _top2(0.5, priority="probability")),
        Arm("top-1 drop CF 1", SWITCH, _top1()),
        Arm("top-1 reroute CF 1", SWITCH, _top1(overflow="reroute")),
        Arm("expert choice CF 1 (2 per token)", SWITCH, EXPERT_CHOICE),
    ),
    claims=(
        Better("BPR beats position priority at CF 0.5", "top-2 BPR CF 0.5",
               "top-2 position CF 0.5"),
        Better("BPR beats position priority at CF 1", "top-2 BPR CF 1", "top-2 position CF 1"),
        Better("token priority beats position priority at CF 0.5", "top-2 token CF 0.5",
               "top-2 position CF 0.5"),
        Equivalent("reroute and drop reach the same no-drop loss within ±0.01 nats (Switch: no "
                   "gain from rerouting)", "top-1 reroute CF 1", "top-1 drop CF 1",
                   margin=scales.EQUIVALENCE_MARGIN),
        Equivalent("a random second expert costs no quality: within ±0.01 nats of always using "
                   "it", "top-2 random CF 1", "top-2 position CF 1", margin=scales.EQUIVALENCE_MARGIN),
    ),
    scales={"cpu": scales.cpu(600), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("cf1/ce", "eval CE at CF 1"),
             ("train_drop", "dropped in training"), ("leak", "causal leak (nats)")),
    causal_leak_positions=128,
    notes=("`causal leak` = causal minus teacher-forced CE on 128 positions of one eval batch at "
           "the eval CF 2.0 (`moejax.causal`; expert choice at its CF 1, the only one it has): "
           "exactly 0 for causal-safe routing (token priority; position priority with k=1 and "
           "drop). BPR and reroute numbers come from a decoder here; the papers measured "
           "encoders. The leak at the train CF: the `routing_leak` study (3 seeds; "
           "`leak_at_train_cf.md` holds an earlier one-seed rerun). Expert choice has no CF "
           "sweep (its CE at CF 1 is its no-drop CE), and its `dropped in training` counts the "
           "(token, expert) pairs no expert picked: 1 - k/E = 0.75 by construction."),
)
