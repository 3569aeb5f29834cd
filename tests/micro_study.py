"""A micro study for tests/test_study.py: 2 arms x 2 seeds x 6 steps of the runlocal configs;
and `fake_train`, a trainer that writes a run's metrics without training (runner tests)."""

import json
import os

from moejax.study import Arm, ArmPlot, Better, Study


def fake_train(calls: list):
  """`train_fn(config, run_dir)` that appends run_dir to `calls` and writes two train and two
  eval records (ce = 2 + learning rate + seed / 10) to its metrics.jsonl."""
  def train_fn(config, run_dir):
    calls.append(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for step in (3, 6):
        f.write(json.dumps({"step": step, "split": "train", "tokens_per_sec": 1.0}) + "\n")
        f.write(json.dumps({"step": step, "split": "eval",
                            "ce": 2.0 + config.optim.learning_rate + config.seed / 10}) + "\n")
  return train_fn

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
