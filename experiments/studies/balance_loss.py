"""balance_loss: Switch Transformer's load-balancing loss (Switch eqs. 4-6, alpha = 1e-2).

`configs/switch.py` (E=8, top-1, CF 1.25) with Switch balance loss weight alpha in {0, 1e-3, 1e-2,
1e-1}, plus the GShard form of the loss (`(1/E) sum_e (c_e/S) m_e`, uniform value 1/E^2) at weight
1e-2 * E^2, i.e. the same pull as alpha = 1e-2. Everything else identical; 3 seeds. Each run
reports the coefficient of variation of the router's per-expert load (`load_cv`, 0 = balanced;
eval batches, layer mean), the fraction of choices dropped in training, router entropy, the router
z-loss and the no-drop eval CE, and its causal leak (top-1 position priority: zero).

CPU scale: 1,200 steps x 2,048 tokens on the documentation corpus; 15 runs, ~6 min each on 2
cores (~1 h 30 min). `alpha=1e-2` is the same run as `moe_vs_dense`'s `switch E=8` (reused).

    python experiments/reproduce.py --study=balance_loss --workdir=experiments/results \
        --data=../shared/data/linux_kernel_docs.txt,../shared/data/python_docs.txt
"""

from moejax.study import Arm, ArmPlot, Better, Study

from studies import scales


def name(alpha: float) -> str:
  return f"alpha={alpha:g}"


STUDY = Study(
    name="balance_loss",
    paper="Switch Transformer section 2.2 (eqs. 4-6); GShard's auxiliary loss",
    claim=("Without a balance loss routing collapses onto few experts and drops rise; alpha = 1e-2 "
           "balances without hurting quality; alpha = 1e-1 hurts quality."),
    arms=(
        Arm(name(0), "configs/switch.py", {"model.moe.balance_loss_weight": 0.0}),
        *(Arm(name(a), "configs/switch.py", {"model.moe.balance_loss_weight": a}, x=a,
              series="Switch loss") for a in (1e-3, 1e-2, 1e-1)),
        Arm("GShard loss 1e-2*E^2", "configs/switch.py",
            {"model.moe.balance_loss_weight": 0.0,
             "model.moe.gshard_loss_weight": lambda c: 1e-2 * c.model.moe.num_experts ** 2}),
    ),
    claims=(
        Better("alpha=1e-2 balances the router (lower load CV) than alpha=0", name(1e-2), name(0),
               metric="load_cv"),
        Better("alpha=1e-2 drops fewer choices in training than alpha=0", name(1e-2), name(0),
               metric="train_drop"),
        Better("alpha=1e-2 reaches a lower no-drop loss than alpha=0", name(1e-2), name(0)),
        Better("alpha=1e-1 hurts: alpha=1e-2 reaches a lower no-drop loss", name(1e-2),
               name(1e-1)),
    ),
    scales={"cpu": scales.cpu(1200), "tpu": scales.TPU},
    columns=(("nodrop/ce", "no-drop eval CE"), ("load_cv", "router load CV"),
             ("train_drop", "dropped in training"), ("moe/router_entropy", "router entropy"),
             ("moe/z_loss", "router z-loss")),
    plots=(ArmPlot("load_cv_vs_alpha.png", "load_cv", "Switch balance-loss weight alpha",
                   "router load CV (eval)", log_x=True),
           ArmPlot("loss_vs_alpha.png", "nodrop/ce", "Switch balance-loss weight alpha",
                   "no-drop eval CE (nats/byte)", log_x=True)),
    causal_leak_positions=128,
    notes=("alpha=0 and the GShard-loss arm are drawn as reference lines. `load_cv` is the "
           "standard deviation over experts of the router's first-choice share divided by its "
           "mean, on the eval batches, averaged over MoE layers."),
)
