"""End-to-end training on the (data=2, expert=4) fake-device mesh: learning, exact resume,
restore onto another mesh, crash-safe checkpoints, NaN stop, gradient accumulation."""

import json
import math
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import re
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from moejax import checkpoint, optim, sharding, train  # noqa: E402


def _config(**overrides):
  """tiny.py shrunk to odd/prime sizes; MoE (8 experts, top-2) in layer 1 of 2.

  Random second-expert routing and router jitter are on, so the routing RNG streams must be
  checkpointed and restored for the resume tests to be exact.
  """
  c = tiny.get_config("runlocal")
  c.mesh.data, c.mesh.expert = 2, 4
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 263, 29, 2, 3, 1
  m.head_dim, m.d_ff = 6, 37
  m.moe.update(num_experts=8, top_k=2, d_ff=19, second_expert_policy="random",
               router_jitter=1e-2)
  c.seq_len, c.batch_size, c.num_train_steps = 31, 8, 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 1, 1000, 1, 4
  c.data.builtin.num_docs, c.data.builtin.num_eval_docs = 200, 20
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}, records


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """8 steps straight on the (2, 4) mesh, checkpoints at 4 and 8."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  final = train.train_and_evaluate(_config(), workdir)
  return workdir, final


def test_end_to_end_learns_and_writes_everything(straight_run):
  workdir, final = straight_run
  losses, records = _train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert losses[8] < losses[1] - 0.3, losses
  assert math.isfinite(final["ce"]) and "nodrop/ce" in final
  for name in ("config.json", "model_info.json", "metrics.jsonl", "tb"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  last = [r for r in records if r["split"] == "train"][-1]
  assert len(last["moe/layer1/expert_load"]) == 8  # Per-MoE-layer routing statistics.
  for key in ("moe/balance_loss", "moe/z_loss", "moe/layer1/router_entropy", "grad_norm",
              "tokens_per_sec"):
    assert key in last, key
  assert last["update_norm"] > 0  # the step really moved the params
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["moe"]["top_k"] == 2


def _resume_from_step4(straight_workdir, workdir, **overrides):
  """A run killed after the step-4 save (and mid-way through the step-8 save), then restarted."""
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(straight_workdir, "checkpoints", "4"),
                  os.path.join(workdir, "checkpoints", "4"))
  tmp = os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(tmp, "state"))
  open(os.path.join(tmp, "state", "garbage"), "w").write("half-written")
  train.train_and_evaluate(_config(**overrides), workdir)
  assert not os.path.exists(tmp)  # The leftover tmp dir is ignored, then cleaned up.
  return _train_losses(workdir)[0]


def test_exact_resume(straight_run, tmp_path):
  losses = _train_losses(straight_run[0])[0]
  # The killed run had logged steps 1-6 before dying; steps 5-6 are redone after the resume from
  # step 4 and must not appear twice in metrics.jsonl.
  with open(os.path.join(straight_run[0], "metrics.jsonl")) as f:
    early = [line for line in f if json.loads(line)["step"] <= 6]
  with open(os.path.join(tmp_path, "metrics.jsonl"), "w") as f:
    f.writelines(early)
  resumed = _resume_from_step4(straight_run[0], str(tmp_path))
  steps = [(r["split"], r["step"]) for r in _train_losses(str(tmp_path))[1]]
  assert len(steps) == len(set(steps)), steps
  assert sorted(resumed) == list(range(1, 9))  # Resumed at 4, not at the half-written 8.
  assert [resumed[s] for s in range(5, 9)] == [losses[s] for s in range(5, 9)]  # Bit-exact.


def test_exact_resume_with_a_truncated_metrics_line(straight_run, tmp_path):
  # A kill mid-write leaves half a JSON line at the end of metrics.jsonl: resuming still works.
  with open(os.path.join(straight_run[0], "metrics.jsonl")) as f:
    early = [line for line in f if json.loads(line)["step"] <= 5]
  with open(os.path.join(tmp_path, "metrics.jsonl"), "w") as f:
    f.writelines(early + ['{"step": 6, "split": "tr'])
  resumed = _resume_from_step4(straight_run[0], str(tmp_path))
  assert sorted(resumed) == list(range(1, 9))


def test_resuming_a_finished_run_returns_its_final_metrics(straight_run, tmp_path):
  workdir, final = straight_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  lines_before = open(os.path.join(copy, "metrics.jsonl")).read()
  again = train.train_and_evaluate(_config(), copy)
  assert open(os.path.join(copy, "metrics.jsonl")).read() == lines_before  # Nothing retrained.
  assert again.keys() == final.keys()
  for key in final:
    assert again[key] == pytest.approx(final[key], rel=1e-5), key


def test_restoring_another_model_names_the_parameter_and_shapes(straight_run, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(straight_run[0], copy)
  with pytest.raises(ValueError, match=r"parameter '.*ffn/w_down_EFD' has shape \(8, 19, 29\) in "
                                       r"the checkpoint and \(8, 23, 29\) in the model"):
    train.train_and_evaluate(_config(**{"model.moe.d_ff": 23}), copy)


@pytest.mark.parametrize("data, expert", [(4, 2), (8, 1)])
def test_restore_onto_another_mesh(straight_run, tmp_path, data, expert):
  losses = _train_losses(straight_run[0])[0]
  resumed = _resume_from_step4(straight_run[0], str(tmp_path), **{"mesh.data": data,
                                                                    "mesh.expert": expert})
  for s in range(5, 9):  # Same math, other reduction order: equal to float32 noise.
    assert resumed[s] == pytest.approx(losses[s], rel=1e-4), (s, resumed[s], losses[s])


@pytest.mark.parametrize("scope, scan", [("group", False), ("batch", False), ("batch", True)],
                         ids=["group", "batch", "batch-scanned"])
def test_gradient_accumulation_matches_full_batch(tmp_path, scope, scan):
  """Also for the global-batch balance loss, whose f must be the whole step's (the routing
  pre-pass), not each micro-batch's (that version fails this test: 0.01542 vs 0.01534)."""
  # Deterministic routing: random draws would differ between one batch and two halves.
  common = {"batch_size": 16, "num_train_steps": 3, "checkpoint_every": 100,
            "model.moe.second_expert_policy": "all", "model.moe.router_jitter": 0.0,
            "model.moe.balance_loss_scope": scope, "model.scan_layers": scan}
  train.train_and_evaluate(_config(**common), str(tmp_path / "full"))
  train.train_and_evaluate(_config(grad_accum_steps=2, **common), str(tmp_path / "accum"))
  full, accum = _train_losses(str(tmp_path / "full"))[0], _train_losses(str(tmp_path / "accum"))[0]
  full_records = {r["step"]: r for r in _train_losses(str(tmp_path / "full"))[1]
                  if r["split"] == "train"}
  accum_records = {r["step"]: r for r in _train_losses(str(tmp_path / "accum"))[1]
                   if r["split"] == "train"}
  for s in (1, 2, 3):
    assert accum[s] == pytest.approx(full[s], rel=1e-4), (s, accum[s], full[s])
    # The gradient itself (before clipping) and the aux losses, not just the loss.
    for key in ("grad_norm", "moe/aux_loss", "moe/balance_loss"):
      assert accum_records[s][key] == pytest.approx(full_records[s][key], rel=1e-4), (s, key)


def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path):
  # A finite but absurd learning rate: step 1's params are huge yet finite, later ones overflow.
  config = _config(**{"optim.learning_rate": 1e10, "optim.warmup_steps": 0,
                      "checkpoint_every": 1, "num_train_steps": 5})
  with pytest.raises(FloatingPointError, match=r"at step (\d+): .*Last good checkpoint: step (\d+)") as err:
    train.train_and_evaluate(config, str(tmp_path))
  # The checkpoint the message names really is good: every array in it is finite.
  last_good = int(re.search(r"Last good checkpoint: step (\d+)", str(err.value)).group(1))
  model_cfg = train.validate_config(config)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  mesh = sharding.make_mesh(dict(config.mesh))
  target = nnx.state(train.create_model_and_optimizer(model_cfg, tx, mesh, config.seed))
  restored, _, _ = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=1,
                                           keep=1).restore(target, step=last_good)
  for leaf in jax.tree.leaves(restored):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert bool(jnp.all(jnp.isfinite(leaf)))


def test_optimizer_moments_are_sharded_like_their_params():
  config = _config()
  model_cfg = train.validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  for name in ("adamw", "adafactor"):
    config.optim.name = name
    tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
    _, optimizer = train.create_model_and_optimizer(model_cfg, tx, mesh, 0)
    specs = {"/".join(map(str, p)): v.get_value().sharding.spec
             for p, v in nnx.to_flat_state(nnx.state(optimizer))}
    moments = [k for k in specs if k.endswith("ffn/w_up_EDF") and ("/mu/" in k or "/v/" in k)]
    assert moments, sorted(specs)
    for k in moments:
      assert specs[k][0] == "expert", (name, k, specs[k])


def test_adafactor_factored_moments_of_experts_are_sharded_over_expert():
  # Sizes that factor (D, F >= 128): expert moments are v_row [E, D] and v_col [E, F].
  config = _config(**{"model.d_model": 128, "model.moe.d_ff": 160, "model.num_heads": 2,
                      "model.head_dim": 8})
  config.optim.name = "adafactor"
  model_cfg = train.validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  _, optimizer = train.create_model_and_optimizer(model_cfg, tx, mesh, 0)
  flat = {"/".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(optimizer))}
  factored = {k: v for k, v in flat.items() if k.endswith("ffn/w_up_EDF") and "/v_" in k}
  shapes = sorted((k.split("/v_")[1][:3], v.shape) for k, v in factored.items())
  # optax's rule: v_row drops the largest dim (F=160), v_col the second largest (D=128).
  assert shapes == [("col", (8, 160)), ("row", (8, 128))], shapes
  for k, v in factored.items():
    assert v.sharding.spec[0] == "expert", (k, v.sharding.spec)


def test_weight_decay_is_lr_times_decay_on_matrices_for_both_optimizers():
  import ml_collections  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.ones((4, 3)), "scale": jnp.ones((3,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ("adamw", "adafactor"):
    c = ml_collections.ConfigDict(dict(name=name, learning_rate=0.1, warmup_steps=0,
                                       schedule="constant", end_lr_fraction=0.0, b1=0.9,
                                       b2=0.95, weight_decay=0.5, grad_clip_norm=0.0))
    tx, _ = optim.make_optimizer(c, 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: the update is the decay alone, -lr * wd * w, and norms' scales are not decayed.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((4, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], 0.0)


def test_eval_uses_the_eval_capacity_factor_and_nodrop_drops_nothing(tmp_path):
  # Train at CF 2 (few drops), evaluate at CF 0.3 (many drops) and with no drop (none).
  config = _config(**{"model.moe.capacity_factor": 2.0, "model.moe.eval_capacity_factor": 0.3,
                      "num_train_steps": 2, "eval_every": 2, "checkpoint_every": 2,
                      "eval_capacity_factors": (1.0,)})
  train.train_and_evaluate(config, str(tmp_path))
  _, records = _train_losses(str(tmp_path))
  train_rec = [r for r in records if r["split"] == "train"][-1]
  eval_rec = [r for r in records if r["split"] == "eval"][-1]
  at_eval_cf = sum(eval_rec["moe/layer1/dropped_fraction"])
  assert at_eval_cf > 0.3, eval_rec["moe/layer1/dropped_fraction"]
  assert sum(train_rec["moe/layer1/dropped_fraction"]) < at_eval_cf / 3
  assert sum(eval_rec["nodrop/moe/layer1/dropped_fraction"]) == 0
  assert eval_rec["nodrop/ce"] < eval_rec["ce"]  # Dropping tokens costs loss.
  # The extra capacity factor sits in between.
  assert 0 < sum(eval_rec["cf1/moe/layer1/dropped_fraction"]) < at_eval_cf


def test_load_model_restores_a_run_from_its_own_config(straight_run):
  workdir, _ = straight_run
  config = train.load_run_config(workdir)
  assert config.model.moe.top_k == 2 and isinstance(config.model.moe_layers, tuple)
  model, _, step = train.load_model(config, workdir)
  assert step == 8
  fresh, _ = train.create_model_and_optimizer(train.validate_config(config),
                                              optim.make_optimizer(config.optim, 8)[0],
                                              sharding.make_mesh(dict(config.mesh)), config.seed)
  restored_wi = np.asarray(model.blocks[1].ffn.w_up_EDF[...])
  assert not np.allclose(restored_wi, np.asarray(fresh.blocks[1].ffn.w_up_EDF[...]))  # Trained.
  assert model.blocks[1].ffn.deterministic  # Eval mode.


def test_selection_bias_update_is_the_same_with_gradient_accumulation(tmp_path):
  """Auxiliary-loss-free balancing: after one step every bias is +-rate or 0 (one sign step), not
  all zero, and identical whether the batch is one micro-batch or two (the update reads the
  step's summed selection counts); it is checkpointed and restored."""
  biases, cvs = {}, {}
  for accum in (1, 2):
    workdir = str(tmp_path / f"accum{accum}")
    config = _config(**{"model.moe.bias_update_rate": 1e-3, "model.moe.second_expert_policy":
                        "all", "model.moe.router_jitter": 0.0, "grad_accum_steps": accum,
                        "batch_size": 16, "num_train_steps": 1, "checkpoint_every": 1})
    train.train_and_evaluate(config, workdir)
    model, _, step = train.load_model(config, workdir)
    assert step == 1
    biases[accum] = [np.asarray(layer.expert_bias[...]) for layer in model.moe_layers()]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      logged = [json.loads(line) for line in f if '"train"' in line][-1]
    cvs[accum] = {k: v for k, v in logged.items() if k.endswith("load_cv")}
  # The logged load CV is the step's (from its summed counts), not a mean of micro-batch CVs.
  assert len(cvs[1]) == len(model.moe_layers()) + 1 and max(cvs[1].values()) > 0
  for key, cv in cvs[1].items():
    assert cvs[2][key] == pytest.approx(cv, rel=1e-5), key
  for b1, b2 in zip(biases[1], biases[2], strict=True):
    np.testing.assert_array_equal(b1, b2)
    assert set(np.round(b1 / 1e-3, 4)) <= {-1.0, 0.0, 1.0} and np.abs(b1).max() > 0


def test_upcycled_checkpoint_trains_from_the_dense_weights(tmp_path):
  """experiments/upcycle.py: a dense run's weights become step 0 of a MoE run (experts = the dense
  MLP), which the trainer then resumes and trains."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import moejax.main  # noqa: F401  Its absl flags are defined: importing the script must not clash.
  import upcycle as upcycle_cli  # pylint: disable=import-outside-toplevel
  dense_config = _config(**{"model.moe_every": 0, "num_train_steps": 2, "checkpoint_every": 2})
  train.train_and_evaluate(dense_config, str(tmp_path / "dense"))
  moe_config = _config(**{"model.moe.d_ff": 37, "model.moe.second_expert_policy": "all",
                          "model.moe.router_jitter": 0.0, "num_train_steps": 2})
  assert upcycle_cli.upcycle_run(str(tmp_path / "dense"), moe_config, str(tmp_path / "moe")) == 2
  dense, _, _ = train.load_model(dense_config, str(tmp_path / "dense"))
  moe, _, step = train.load_model(moe_config, str(tmp_path / "moe"))
  assert step == 0
  expert_wi = moe.blocks[1].ffn.w_up_EDF[...]
  for e in range(8):
    np.testing.assert_array_equal(expert_wi[e], dense.blocks[1].ffn.w_up_DF[...])
  np.testing.assert_array_equal(moe.embed_VD[...], dense.embed_VD[...])
  final = train.train_and_evaluate(moe_config, str(tmp_path / "moe"))
  assert sorted(_train_losses(str(tmp_path / "moe"))[0]) == [1, 2] and math.isfinite(final["ce"])
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    upcycle_cli.upcycle_run(str(tmp_path / "dense"), moe_config, str(tmp_path / "moe"))


def test_dropless_training_on_the_expert_mesh(tmp_path, caplog):
  """Dropless experts train end to end on (data=2, expert=4): nothing is dropped, so the eval
  and no-drop eval are the same number; a bounded receive buffer that overflows is counted in
  the metrics and warned about at eval."""
  overrides = {"model.moe.dispatch": "dropless", "num_train_steps": 2, "eval_every": 2,
               "checkpoint_every": 2}
  train.train_and_evaluate(_config(**overrides), str(tmp_path / "exact"))
  _, records = _train_losses(str(tmp_path / "exact"))
  eval_rec = [r for r in records if r["split"] == "eval"][-1]
  assert eval_rec["ce"] == eval_rec["nodrop/ce"]
  assert sum(eval_rec["moe/layer1/dropped_fraction"]) == 0
  assert eval_rec["moe/ep_overflow_fraction"] == 0
  caplog.set_level("WARNING")
  train.train_and_evaluate(_config(**overrides, **{"model.moe.receive_buffer_factor": 0.5}),
                           str(tmp_path / "bounded"))
  _, records = _train_losses(str(tmp_path / "bounded"))
  eval_rec = [r for r in records if r["split"] == "eval"][-1]
  assert eval_rec["moe/ep_overflow_fraction"] > 0
  assert "overflowed a receive buffer" in caplog.text


def test_forced_routers_are_refused_outside_benchmarks():
  config = _config(**{"model.moe.router": "balanced"})
  with pytest.raises(ValueError, match=r"config.model.moe.router='balanced'.*config.benchmark"):
    train.validate_config(config, 8)
  config.benchmark = True
  train.validate_config(config, 8)


def test_rerunning_a_finished_run_says_so_and_writes_nothing(straight_run, tmp_path, caplog):
  workdir, final = straight_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  def files():
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(copy) for name in names}
  before = files()
  with caplog.at_level("INFO"):
    again = train.train_and_evaluate(_config(), copy)
  assert any("already finished at step" in r.getMessage() for r in caplog.records)
  assert files() == before  # no file written or touched (no TensorBoard file, no config.json)
  assert again["ce"] == pytest.approx(final["ce"], rel=1e-6)
  # A longer run of the same workdir is not finished: it trains on (not tested here).
  assert train.finished_run(copy, _config(num_train_steps=_config().num_train_steps + 1)) is None


def test_relative_data_paths_are_resolved_when_the_run_starts(tmp_path, monkeypatch):
  """A run started with relative text-file paths saves them absolute (and as typed), so its
  config.json reads the same files from any directory."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("\n\n".join(f"document {i}: some words" for i in range(60)))
  monkeypatch.chdir(tmp_path)
  c = tiny.get_config("runlocal")
  c.num_train_steps, c.eval_every, c.checkpoint_every, c.eval_steps = 2, 2, 2, 1
  c.data.source, c.data.text_files.paths = "text_files", "corpus/*.txt"
  c.data.cache_dir = str(tmp_path / "cache")
  train.train_and_evaluate(c, str(tmp_path / "run"))
  saved = train.load_run_config(str(tmp_path / "run"))
  assert saved.data.text_files.paths == str(corpus / "*.txt")
  assert saved.data.text_files.paths_as_typed == "corpus/*.txt"
  assert c.data.text_files.paths == "corpus/*.txt"  # the caller's config is not changed
  monkeypatch.chdir(ROOT)  # From elsewhere, the saved config still finds the files.
  from moejax.data import sources  # pylint: disable=import-outside-toplevel
  assert sources.expand_paths(saved.data.text_files.paths) == [str(corpus / "a.txt")]
  # Rerun from the same directory: the same config, so already finished.
  monkeypatch.chdir(tmp_path)
  assert train.finished_run(str(tmp_path / "run"), _resolved(c)) is not None


def _resolved(c):
  from moejax.data import config as data_config  # pylint: disable=import-outside-toplevel
  c = c.copy_and_resolve_references()
  with c.unlocked():
    data_config.resolve_paths(c.data)
  return c
