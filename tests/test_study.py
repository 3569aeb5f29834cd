"""moejax.study: verdict rule on synthetic results, the study runner end to end (micro study:
resume after an interruption, table, plots), and every committed study's configs at every scale."""

import dataclasses
import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from moejax import config as config_lib  # noqa: E402
from moejax import data as data_lib  # noqa: E402
from moejax import model, study, train  # noqa: E402
from studies import scales  # noqa: E402

import micro_study  # noqa: E402  pylint: disable=wrong-import-order  (tests/)
import reproduce  # noqa: E402  pylint: disable=wrong-import-order

STUDY_NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "studies"))
                     if f.endswith(".py") and f not in ("__init__.py", "scales.py"))


def _load_micro():
  spec = importlib.util.spec_from_file_location(
      "micro_study", os.path.join(os.path.dirname(__file__), "micro_study.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.STUDY


# --- verdicts ------------------------------------------------------------------------------------


def _final(table):
  """{arm: [value per seed]} -> study.final_records layout."""
  return {(arm, seed): {"nodrop/ce": v} for arm, values in table.items()
          for seed, v in enumerate(values)}


def test_t_quantile_matches_tables():
  assert study.t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
  assert study.t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)


@pytest.mark.parametrize("moe, status", [
    ([1.50, 1.52, 1.51], study.AGREES),         # 0.03 better on every seed.
    ([1.56, 1.57, 1.565], study.DISAGREES),     # worse on every seed.
    ([1.50, 1.60, 1.52], study.INCONCLUSIVE),   # mean better, but one seed worse.
])
def test_better_verdict(moe, status):
  final = _final({"dense": [1.53, 1.55, 1.54], "moe": moe})
  v = study.verdict(study.Better("moe beats dense", "moe", "dense"), final)
  assert v.status == status and v.n == 3
  diffs = [d - m for d, m in zip([1.53, 1.55, 1.54], moe)]
  assert v.effect == pytest.approx(sum(diffs) / 3)
  assert status in v.line() and "3 seeds" in v.line()


def test_better_is_paired_over_seeds():
  # Seed spread (0.1) dwarfs the effect (0.01), but the effect is the same on every seed: paired,
  # it is significant.
  final = _final({"dense": [1.4, 1.5, 1.6], "moe": [1.39, 1.49, 1.591]})
  assert study.verdict(study.Better("b", "moe", "dense"), final).status == study.AGREES


def test_verdict_with_one_seed_or_none_is_not_a_verdict():
  one = study.verdict(study.Better("b", "moe", "dense"), _final({"dense": [1.5], "moe": [1.0]}))
  assert one.status == study.INCONCLUSIVE and math.isinf(one.half_width)
  assert "one seed, no interval" in one.line()
  none = study.verdict(study.Better("b", "moe", "dense"), _final({"dense": [1.5]}))
  assert none.n == 0 and none.status == "no finished runs" and "not run yet" in none.line()


def test_better_across_metrics_of_one_arm():
  final = {("a", s): {"cf2/ce": 1.0 + s / 10, "cf1/ce": 1.02 + s / 10 + s / 1000}
           for s in range(3)}
  v = study.verdict(study.Better("eval CF 2 beats 1", "a", "a", metric="cf2/ce",
                                 metric_b="cf1/ce"), final)
  assert v.status == study.AGREES and v.effect == pytest.approx(0.021)


def test_trend_is_minus_the_slope_on_log2_x():
  s = study.Study(name="t", paper="", claim="", arms=(
      study.Arm("E=2", "c.py", x=2), study.Arm("E=8", "c.py", x=8)),
      claims=(study.Trend("falls", ("E=2", "E=8")),), scales={"cpu": {}})
  # Loss falls by 0.04 over log2(8) - log2(2) = 2: slope -0.02 per doubling, on every seed.
  final = _final({"E=2": [1.50, 1.60, 1.55], "E=8": [1.46, 1.56, 1.51]})
  v = study.verdict(s.claims[0], final)
  assert v.effect == pytest.approx(0.02) and v.status == study.AGREES
  rising = _final({"E=2": [1.50, 1.60, 1.55], "E=8": [1.56, 1.66, 1.62]})
  assert study.verdict(s.claims[0], rising).status == study.DISAGREES


def test_contrast():
  c = study.Contrast("diminishing", ((1, "a", "m"), (-1, "b", "m")))
  final = {("a", 0): {"m": 3.0}, ("b", 0): {"m": 1.0}, ("a", 1): {"m": 2.0}}
  assert c.per_seed(final) == {0: 2.0}  # Seed 1 lacks arm b.


def test_study_rejects_unknown_arms_and_duplicates():
  arm = study.Arm("a", "configs/dense.py")
  with pytest.raises(ValueError, match=r"unknown arms \['b'\]"):
    study.Study(name="s", paper="", claim="", arms=(arm,), claims=(study.Better("x", "a", "b"),),
                scales={"cpu": {}})
  with pytest.raises(ValueError, match="unique"):
    study.Study(name="s", paper="", claim="", arms=(arm, arm), claims=(), scales={"cpu": {}})


def test_step_plot_draws_each_arms_metric_against_step_over_finished_runs(tmp_path, monkeypatch):
  arms = (study.Arm("a", "configs/dense.py"), study.Arm("b", "configs/dense.py"))
  spec = study.StepPlot("z.png", "moe/z_loss", "z", log_y=True)
  s = study.Study(name="s", paper="", claim="", arms=arms, claims=(), scales={"cpu": {}},
                  plots=(spec,))
  def rec(arm, seed, step, z, final=False):
    return {"arm": arm, "seed": seed, "step": step, "metrics": {"nodrop/ce": 1.0, "moe/z_loss": z},
            **({"final": True} if final else {})}
  records = [rec("a", 0, 10, 2.0), rec("a", 0, 20, 4.0, True), rec("a", 1, 10, 4.0),
             rec("a", 1, 20, 8.0, True), rec("b", 0, 10, 0.5), rec("b", 0, 20, 0.25, True),
             rec("b", 1, 10, 99.0)]  # Seed 1 of b never finished: left out.
  drawn = {}
  def capture(fig, out_dir, name):
    ax = fig.axes[0]
    drawn[name] = (ax.get_yscale(), {line.get_label(): (list(line.get_xdata()),
                                                         list(line.get_ydata()))
                                     for line in ax.get_lines()})
    return os.path.join(out_dir, name)
  monkeypatch.setattr(study.reporting, "save_figure", capture)
  assert study.plot(s, records, str(tmp_path)) == [str(tmp_path / "curves.png"),
                                                  str(tmp_path / "z.png")]
  scale, lines = drawn["z.png"]
  assert scale == "log"
  assert lines == {"a (n=2)": ([10, 20], [3.0, 6.0]), "b (n=1)": ([10, 20], [0.5, 0.25])}


def test_read_results_ignores_a_truncated_line_and_duplicates(tmp_path):
  path = tmp_path / "results.jsonl"
  rec = {"arm": "a", "seed": 0, "step": 3, "metrics": {"ce": 1.0}}
  path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "metrics": {"ce": 2.0}}) + "\n"
                  + '{"arm": "a", "se')
  records = study.read_results(str(path))
  assert records == [{**rec, "metrics": {"ce": 2.0}}]


def test_loss_spikes_count_jumps_above_the_running_mean():
  smooth = [3.0 - 0.01 * i for i in range(30)]
  assert study.loss_spikes(smooth) == 0
  spiky = list(smooth)
  spiky[15] += 0.5
  spiky[22] = float("nan")
  assert study.loss_spikes(spiky) == 2


def test_data_overrides(tmp_path):
  assert config_lib.data_overrides("builtin")["data.source"] == "builtin"
  assert config_lib.data_overrides("lm1b")["data.tfds.name"] == "lm1b"
  f = tmp_path / "a.txt"
  f.write_text("hello")
  out = config_lib.data_overrides(str(f), "sentencepiece")
  assert out["data.source"] == "text_files" and out["data.tokenizer"] == "sentencepiece"
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    config_lib.data_overrides(str(tmp_path / "missing.txt"))


def test_unknown_scale_and_override_are_errors():
  s = _load_micro()
  with pytest.raises(ValueError, match="scales"):
    study.arm_config(s, s.arms[0], 0, "huge")
  cfg = study.arm_config(s, s.arms[0], 0, "cpu")
  with pytest.raises(KeyError, match="no field 'lr'"):
    config_lib.apply_overrides(cfg, {"optim.lr": 1.0})


# --- the runner, end to end ----------------------------------------------------------------------


class Killed(Exception):
  """Stands in for a kill mid-run."""


def test_micro_study_resumes_after_interruption_and_reports(tmp_path):
  s = _load_micro()
  workdir = str(tmp_path)
  calls = []

  def interrupted_pipeline(*args, **kwargs):
    it = data_lib.make_pipeline(*args, **kwargs)
    if kwargs["split"] != "train":
      return it

    class Stop:  # The 5th training batch raises: checkpoint 3 is on disk, step 6 never comes.
      n = 0
      def __next__(self):
        Stop.n += 1
        if Stop.n == 5:
          raise Killed
        return next(it)
      get_state, set_state = it.get_state, it.set_state
    return Stop()

  killed_once = []

  def train_fn(config, run_dir):
    calls.append(run_dir)
    if len(calls) == 2 and not killed_once:  # The 2nd run (switch E=4, seed 0) is killed.
      killed_once.append(run_dir)
      return train.train_and_evaluate(config, run_dir, make_pipeline=interrupted_pipeline)
    return train.train_and_evaluate(config, run_dir)

  with pytest.raises(Killed):
    study.run_study(s, workdir, train_fn=train_fn, log=lambda _: None)
  results = os.path.join(workdir, "micro", "results.jsonl")
  assert set(study.final_records(study.read_results(results))) == {("dense", 0)}
  killed = calls[1]
  assert os.listdir(os.path.join(killed, "checkpoints")) == ["3"]

  calls.clear()
  records = study.run_study(s, workdir, train_fn=train_fn, log=lambda _: None)
  # The finished run is skipped; the killed one resumes from its checkpoint at step 3.
  assert calls[0] == killed and len(calls) == 3
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    evals = [r["step"] for r in map(json.loads, f) if r["split"] == "eval"]
  assert evals == [3, 6]
  final = study.final_records(records)
  assert sorted(final) == [("dense", 0), ("dense", 1), ("switch E=4", 0), ("switch E=4", 1)]
  moe = final[("switch E=4", 0)]
  # The extra eval capacity factors are evaluated at the end; CF inf is the no-drop eval.
  assert moe["cfinf/ce"] == pytest.approx(moe["nodrop/ce"], abs=1e-6)
  assert moe["cf0.5/drop"] > 0.2 and moe["cfinf/drop"] == 0
  assert final[("dense", 0)]["nodrop/ce"] == final[("dense", 0)]["ce"]
  # Balance and stability statistics.
  assert moe["load_cv"] >= 0 and "load_cv" not in final[("dense", 0)]
  assert moe["loss_spikes"] == 0

  # One record per eval step (3 and 6) per run; only the last is final.
  assert len(records) == 8 and sum(bool(r.get("final")) for r in records) == 4

  table, plots = study.report(s, workdir, "python experiments/reproduce.py --study=micro")
  assert "| switch E=4 | 2 |" in table and "| dense | 2 |" in table and "-1.731" in table
  assert table.count("(95% CI, paired over 2 seeds; p = ") == 2
  assert table.count("Holm p = ") == 2
  assert "python experiments/reproduce.py --study=micro" in table
  for path in plots:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.path.basename(p) for p in plots) == ["curves.png", "forest.png",
                                                        "loss_vs_experts.png"]

  # A workdir never mixes settings.
  with pytest.raises(ValueError, match="other settings"):
    study.run_study(s, workdir, data="lm1b", train_fn=train_fn, log=lambda _: None)


def test_runner_measures_the_causal_leak_of_each_moe_run(tmp_path):
  s = dataclasses.replace(_load_micro(), name="leak", seeds=(0,), causal_leak_positions=4,
                          causal_leak_at_train_cf=True, router_precision=True, claims=())
  records = study.run_study(s, str(tmp_path), log=lambda _: None)
  final = study.final_records(records)
  moe = final[("switch E=4", 0)]
  # Top-1 with position priority is causal-safe: the leak is zero to float precision, at the eval
  # CF and at the train CF alike.
  assert abs(moe["leak"]) < 1e-5 and moe["causal_ce"] > 0
  assert abs(moe["leak_train_cf"]) < 1e-5 and moe["causal_ce_train_cf"] > 0
  assert "leak_train_cf" not in final[("dense", 0)]
  assert 0 <= moe["router_dtype_disagreement"] < 0.5
  assert "leak" not in final[("dense", 0)]
  assert "router_dtype_disagreement" not in final[("dense", 0)]


def test_arms_that_start_from_another_arms_checkpoint(tmp_path):
  """`Arm.start_from`: the continued dense run starts from the base run's parameters, the
  upcycled one with every expert = the base's MLP, both at the base's data position; their keys
  name their source, and a rerun trains nothing."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax import checkpoint  # pylint: disable=import-outside-toplevel
  arms = (study.Arm("base", "configs/dense.py:runlocal"),
          study.Arm("continued", "configs/dense.py:runlocal", start_from="base"),
          study.Arm("upcycled", "configs/switch.py:runlocal,experts=4", start_from="base"))
  s = dataclasses.replace(_load_micro(), name="start", arms=arms, claims=(), plots=(), seeds=(0,))
  starts = {}

  def train_fn(config, run_dir):
    directory = os.path.join(run_dir, "checkpoints")
    if checkpoint.saved_steps(directory):  # Step 0 written by the runner: what it holds.
      model_at_0, _, step = train.load_model(config, run_dir)
      ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=1, async_save=False)
      starts[os.path.basename(os.path.dirname(run_dir))] = (step, model_at_0,
                                                             ckpt.restore_data(0)[0])
      ckpt.close()
    train.train_and_evaluate(config, run_dir)

  records = study.run_study(s, str(tmp_path), train_fn=train_fn, log=lambda _: None)
  base_dir = os.path.join(tmp_path, "start", "runs", "base", "seed0")
  base, _, base_step = train.load_model(train.load_run_config(base_dir), base_dir)
  ckpt = checkpoint.Checkpointer(os.path.join(base_dir, "checkpoints"), save_every=1, keep=1,
                                 async_save=False)
  base_data = ckpt.restore_data(base_step)[0]
  ckpt.close()
  assert sorted(starts) == ["continued", "upcycled"] and base_step == 6
  for name, (step, start, data_state) in starts.items():
    assert step == 0 and data_state == base_data and data_state, name
    np.testing.assert_array_equal(start.embed_VD[...], base.embed_VD[...])
  upcycled = starts["upcycled"][1]
  for e in range(4):
    np.testing.assert_array_equal(upcycled.blocks[1].ffn.w_up_EDF[...][e],
                                  base.blocks[1].ffn.w_up_DF[...])
  keys = {r["arm"]: r["config_key"] for r in records if r.get("final")}
  assert keys["continued"].endswith("+from:" + keys["base"]) and "+from:" not in keys["base"]
  # Plots put a continuation at the total steps its weights have seen: after the base's 6.
  assert study.start_steps(s, records) == {"base": 0, "continued": 6, "upcycled": 6}

  def no_training(config, run_dir):
    raise AssertionError(f"retrained {run_dir}")

  assert len(study.run_study(s, str(tmp_path), train_fn=no_training, log=lambda _: None)) == len(
      records)
  with pytest.raises(ValueError, match="'later', which must be an arm listed before it"):
    dataclasses.replace(s, arms=(study.Arm("x", "configs/dense.py", start_from="later"),
                                 study.Arm("later", "configs/dense.py")))


# --- the committed studies -----------------------------------------------------------------------


@pytest.mark.parametrize("name", STUDY_NAMES)
def test_study_configs_validate_at_every_scale(name):
  s = reproduce.load_study(name)
  assert s.scales.keys() >= {"cpu", "tpu"} and len(s.seeds) >= 3
  for scale in s.scales:
    devices = scales.TPU_DEVICES if scale == "tpu" else 1
    data = config_lib.data_overrides("builtin") if scale == "cpu" else {}
    for arm in s.arms:
      config = study.arm_config(s, arm, 0, scale, data)
      train.validate_config(config, num_devices=devices)


def test_moe_vs_dense_arms_are_flop_matched_and_param_matched():
  s = reproduce.load_study("moe_vs_dense")
  for scale in ("cpu", "tpu"):
    counts = {}
    for arm in s.arms:
      config = study.arm_config(s, arm, 0, scale)
      devices = scales.TPU_DEVICES if scale == "tpu" else 1
      counts[arm.name] = model.count_params(train.validate_config(config, devices),
                                            config.seq_len)
    dense = counts["dense"]
    for e in (2, 4, 8, 16, 32):
      moe = counts[f"switch E={e}"]
      assert moe.flops_per_token == pytest.approx(dense.flops_per_token, rel=0.01)
      assert moe.total > dense.total
    big = counts["dense, total params of E=8"]
    assert big.total == pytest.approx(counts["switch E=8"].total, rel=1e-3)


def test_capacity_arms_differ_only_in_k_and_cf():
  s = reproduce.load_study("capacity")
  configs = {a.name: study.arm_config(s, a, 0, "cpu").to_dict() for a in s.arms}
  base = configs["top-1 CF 1.25"]
  for name, c in configs.items():
    diff = {k for k in c["model"]["moe"] if c["model"]["moe"][k] != base["model"]["moe"][k]}
    assert diff <= {"capacity_factor", "top_k", "gate", "d_ff"}, name
    assert {k for k in c if c[k] != base[k]} <= {"model"}, name


# --- resume bookkeeping, with a fake trainer (no training) ---------------------------------------


def _fake_train(calls):
  return micro_study.fake_train(calls)


def _tiny_study(name, arm_name, lr):
  return study.Study(name=name, paper="", claim="", seeds=(0, 1), scales={"cpu": {}}, claims=(),
                     arms=(study.Arm(arm_name, "configs/dense.py:runlocal",
                                     {"optim.learning_rate": lr}),))


def test_identical_runs_are_reused_across_studies_not_retrained(tmp_path):
  calls = []
  study.run_study(_tiny_study("first", "dense", 1e-3), str(tmp_path), train_fn=_fake_train(calls),
                  log=lambda _: None)
  assert len(calls) == 2
  records = study.run_study(_tiny_study("second", "baseline", 1e-3), str(tmp_path),
                            train_fn=_fake_train(calls), log=lambda _: None)
  assert len(calls) == 2  # Nothing trained: both seeds came from "first".
  assert {r["reused_from"] for r in records} == {"first"} and len(records) == 4
  final = study.final_records(records)
  assert final[("baseline", 1)]["ce"] == pytest.approx(2.0 + 1e-3 + 0.1)
  # A different config is trained.
  study.run_study(_tiny_study("third", "baseline", 2e-3), str(tmp_path),
                  train_fn=_fake_train(calls), log=lambda _: None)
  assert len(calls) == 4


def test_each_finished_run_releases_its_compiled_programs(tmp_path, monkeypatch):
  """Without it a study process keeps every run's executables, and their memory mappings pile up
  to the kernel's limit (see `release_compiled_programs`)."""
  from moejax.study import runner  # pylint: disable=import-outside-toplevel
  events, calls = [], []
  monkeypatch.setattr(runner, "release_compiled_programs", lambda: events.append(len(calls)))
  study.run_study(_tiny_study("s", "dense", 1e-3), str(tmp_path), train_fn=_fake_train(calls),
                  log=lambda _: None)
  assert events == [1, 2]  # After each of the two runs, not only at the end.


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")
def test_releasing_compiled_programs_unmaps_their_code():
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moejax.study.runner import release_compiled_programs  # pylint: disable=import-outside-toplevel

  def maps():
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)

  def loss(w, x):
    for _ in range(8):
      x = jnp.tanh(x @ w) * jax.nn.sigmoid(x) + jnp.sin(x)
    return x.sum()

  def compile_eight(start):  # 8 programs (one per shape), each mapping its kernels' code.
    grad = jax.jit(jax.grad(loss))
    for n in range(start, start + 8):
      grad(jnp.ones((n, n)), jnp.ones((2, n))).block_until_ready()
    del grad
    gc.collect()
    return maps()

  release_compiled_programs()
  kept = [compile_eight(8), compile_eight(16)]  # JAX's caches hold the dead functions' programs.
  assert kept[1] - kept[0] > 20
  released = []
  for start in (24, 32, 40):
    compile_eight(start)
    release_compiled_programs()
    released.append(maps())
  assert released[-1] - released[0] < (kept[1] - kept[0]) // 4, (kept, released)


def test_an_edited_arm_is_not_mixed_with_its_old_runs(tmp_path):
  calls = []
  study.run_study(_tiny_study("s", "dense", 1e-3), str(tmp_path), train_fn=_fake_train(calls),
                  log=lambda _: None)
  with pytest.raises(ValueError, match="another config"):
    study.run_study(_tiny_study("s", "dense", 2e-3), str(tmp_path), train_fn=_fake_train(calls),
                    log=lambda _: None)


def test_trend_needs_distinct_positive_xs():
  arms = (study.Arm("a", "c.py", x=2), study.Arm("b", "c.py"))
  with pytest.raises(ValueError, match="distinct x"):
    study.Study(name="s", paper="", claim="", arms=arms, scales={"cpu": {}},
                claims=(study.Trend("t", ("a", "b")),))


def test_reuse_needs_the_leak_or_the_checkpoint_to_measure_it(tmp_path, monkeypatch):
  monkeypatch.setattr(study.runner, "_leak", lambda run_dir, positions: {
      "leak": 0.5, "causal_ce": 1.0, "teacher_forced_ce": 0.5})
  moe = lambda name, leak: study.Study(  # noqa: E731
      name=name, paper="", claim="", seeds=(0,), scales={"cpu": {}}, claims=(),
      arms=(study.Arm("moe", "configs/switch.py:runlocal"),), causal_leak_positions=leak)
  calls = []
  study.run_study(moe("plain", 0), str(tmp_path), train_fn=_fake_train(calls), log=lambda _: None)
  # Its checkpoint dir is there: reused, and the leak is measured on it.
  records = study.run_study(moe("leaky", 4), str(tmp_path), train_fn=_fake_train(calls),
                            log=lambda _: None)
  assert len(calls) == 1 and records[-1]["reused_from"] == "plain"
  assert records[-1]["metrics"]["leak"] == 0.5
  # Without the checkpoint (a fresh clone has only results.jsonl), the run is trained here.
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(tmp_path / "plain" / "runs")
  records = study.run_study(moe("leaky2", 4), str(tmp_path), train_fn=_fake_train(calls),
                            log=lambda _: None)
  assert len(calls) == 2 and "reused_from" not in records[-1]


def test_spread_verdict_is_an_f_test_of_the_seed_variances():
  tight = [1.50, 1.501, 1.499, 1.5005, 1.4995]
  wide = [1.40, 1.60, 1.45, 1.55, 1.52]
  claim = study.Spread("a varies less", "a", "b")
  assert study.verdict(claim, _final({"a": tight, "b": wide})).status == study.AGREES
  assert study.verdict(claim, _final({"a": wide, "b": tight})).status == study.DISAGREES
  similar = [1.50, 1.52, 1.49, 1.51, 1.505]
  v = study.verdict(claim, _final({"a": similar, "b": [x + 0.1 for x in similar[::-1]]}))
  assert v.status == study.INCONCLUSIVE and "F-test" in v.line()


def test_config_key_ignores_fields_added_later_at_their_original_default():
  """Adding a config field (at the default every earlier run had) must not orphan committed
  results: the key of a config without the field equals the key with it; setting the field away
  from that default changes the key."""
  import ml_collections
  from configs import switch
  from moejax import study as study_lib
  config = switch.get_config()
  stripped = config.to_dict()
  for path in study_lib.KEY_NEUTRAL_DEFAULTS:
    node = stripped
    for part in path[:-1]:
      node = node[part]
    del node[path[-1]]
  assert study_lib.config_key(ml_collections.ConfigDict(stripped)) == study_lib.config_key(config)
  for path, default in study_lib.KEY_NEUTRAL_DEFAULTS.items():
    changed = switch.get_config()
    node = changed
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = {"einsum": "dot_product", "token": "expert", "softmax": "sigmoid", "": "x",
                      "none": "full", False: True, "group": "batch", None: 64,
                      "auto": "ragged_dot", "learned": "random"}.get(
                          default, 2 if isinstance(default, int) else 0.5)
    if path[-1] == "receive_buffer_factor":
      node[path[-1]] = 2.0
    assert study_lib.config_key(changed) != study_lib.config_key(config), path
