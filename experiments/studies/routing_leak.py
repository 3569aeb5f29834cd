"""routing_leak: the causal leak of each routing policy at its own *train* capacity factor, 3 seeds.

`routing_policies` measures each run's leak at the eval CF 2.0, where few tokens drop and every
policy leaks within +-0.0003 nats. Drops, and so leaks, happen at the train CF; a one-seed rerun
outside any study (`routing_policies/leak_at_train_cf.md`) found up to +0.0058 nats there. This
study records that measurement for every seed in its own results: the same arms and configs as
`routing_policies` (so the same config keys), trained again here because the committed runs keep
no checkpoints, with the leak (causal minus teacher-forced CE on 128 positions of one eval batch,
`moejax.causal`) measured after training at the eval CF 2.0 (`leak`) and at the train CF
(`leak_train_cf`). Causal-safe policies (token priority; top-1 position priority with drop) leak
exactly 0 by construction (tested in tests/test_causal.py); the claims are that the others leak.

CPU scale: `routing_policies`' 600 steps; 33 runs of ~4 min on 2 cores (~2 h 10 min).

    python experiments/reproduce.py --study=routing_leak --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

import dataclasses

from moejax.study import Contrast

from studies import routing_policies

_LEAKY = ("top-2 position CF 1", "top-2 BPR CF 1", "top-2 position CF 0.5", "top-2 BPR CF 0.5",
          "top-1 reroute CF 1", "expert choice CF 1 (2 per token)")

STUDY = dataclasses.replace(
    routing_policies.STUDY,
    name="routing_leak",
    paper="GShard Alg. 1 and ST-MoE Table 18 (BPR) read as decoders; Switch No-Token-Left-Behind",
    claim=("In a decoder, choice-major top-2 (position priority), batch-prioritized routing, "
           "rerouting and expert choice leak the future at their train capacity factor: the "
           "teacher-forced loss is below the causal one."),
    claims=tuple(Contrast(f"{arm} leaks at its train CF", ((1.0, arm, "leak_train_cf"),))
                 for arm in _LEAKY),
    columns=(("nodrop/ce", "no-drop eval CE"), ("leak", "leak at eval CF 2 (nats)"),
             ("leak_train_cf", "leak at train CF (nats)"),
             ("teacher_forced_ce_train_cf", "teacher-forced CE at train CF")),
    plots=(),
    causal_leak_positions=128,
    causal_leak_at_train_cf=True,
    notes=("Leak = causal minus teacher-forced CE on 128 positions of one eval batch; positive = "
           "the teacher-forced loss is optimistic. Expert choice has one CF (1.0): its two leak "
           "columns are the same measurement. The no-drop CE column repeats `routing_policies`' "
           "runs of the same configs, retrained here: same config keys, but a retrained run "
           "is not guaranteed bit-identical to one trained on another machine."),
)
