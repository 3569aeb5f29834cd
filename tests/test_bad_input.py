"""The bad-input catalogue (docs/reliability.md): every case raises before anything is compiled,
with a message that names the field or file, the value and what is allowed, and leaves the
workdir of an existing run exactly as it was (no file lost, overwritten or added).

Each case reruns a trained tiny run's workdir with one thing wrong: a config field, the data, or
the checkpoint. "Before compiling" is checked twice: JAX reports no backend compilation during
the call, and the model (whose creation is the first jitted function) is never created.
"""

import hashlib
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Callable, NamedTuple

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import tiny  # noqa: E402
from moejax import train  # noqa: E402
from moejax import config as config_lib  # noqa: E402

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _config(**overrides):
  """tiny.py:runlocal, 4 steps on the (data=2, expert=4) mesh, checkpoints at 2 and 4."""
  c = tiny.get_config("runlocal")
  c.mesh.data, c.mesh.expert = 2, 4
  c.num_train_steps, c.checkpoint_every, c.log_every, c.eval_every, c.eval_steps = 4, 2, 2, 4, 1
  config_lib.apply_overrides(c, overrides)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(_config(), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return _make_files(tmp_path_factory.mktemp("files"))


def _make_files(root):
  """Text files with one problem each, and a good one."""
  (root / "good.txt").write_text("Two short paragraphs.\n\nOf plain text.\n" * 50)
  (root / "empty.txt").write_text("  \n\n ")
  (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
  (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n\n".encode("latin-1") * 20)
  return root


def _snapshot(root) -> dict[str, str]:
  """Every file and directory under `root` with a hash of its bytes."""
  out = {}
  for directory, dirs, names in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(directory, d), root) + "/"] = ""
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


class Case(NamedTuple):
  overrides: dict          # config fields; a value that is callable gets the files directory
  error: type
  message: str             # regex the error must match: the field or file, the value, allowed
  prepare: Callable | None = None  # changes the workdir (a damaged checkpoint) before the run


def _text(*names, **more):
  return lambda files: {"data.source": "text_files", "data.cache_dir": str(files / "cache"),
                        "data.text_files.paths": ",".join(str(files / n) for n in names), **more}


def _remove(relative):
  return lambda workdir: os.remove(workdir / relative)


CASES = {
    # Config: types and ranges.
    "batch_size=0": Case({"batch_size": 0}, ValueError,
                         r"config\.batch_size=0: allowed values are positive integers"),
    "seq_len<0": Case({"seq_len": -4}, ValueError, r"config\.seq_len=-4: .*positive integers"),
    "num_train_steps=0": Case({"num_train_steps": 0}, ValueError,
                              r"config\.num_train_steps=0: .*positive integers"),
    "eval_steps=0": Case({"eval_steps": 0}, ValueError, r"config\.eval_steps=0: .*positive"),
    "optim.name": Case({"optim.name": "adamx"}, ValueError,
                       r"config\.optim\.name='adamx': allowed values are .*adamw"),
    "optim.schedule": Case({"optim.schedule": "cosin"}, ValueError,
                           r"config\.optim\.schedule='cosin': allowed values are .*cosine"),
    "learning_rate=0": Case({"optim.learning_rate": 0.0}, ValueError,
                            r"config\.optim\.learning_rate=0\.0: allowed values are numbers > 0"),
    "b2=1": Case({"optim.b2": 1.0}, ValueError, r"config\.optim\.b2=1\.0: .*\[0, 1\)"),
    "end_lr_fraction": Case({"optim.end_lr_fraction": 1.5}, ValueError,
                            r"config\.optim\.end_lr_fraction=1\.5: .*\[0, 1\]"),
    "top_k>E": Case({"model.moe.top_k": 9}, ValueError,
                    r"config\.model\.moe\.top_k=9; allowed: an integer in \[1, num_experts=8\]"),
    "top_k float": Case({"model.moe.top_k": 1.5}, TypeError,  # ConfigDict's type safety.
                        r"field 'top_k' .*1\.5 .*cannot be casted to type <class 'int'>"),
    "capacity_factor=0": Case({"model.moe.capacity_factor": 0.0}, ValueError,
                              r"config\.model\.moe\.capacity_factor=0\.0; allowed: a number > 0"),
    "capacity_factor=nan": Case({"model.moe.capacity_factor": float("nan")}, ValueError,
                                r"config\.model\.moe\.capacity_factor=nan; allowed"),
    "router_dtype": Case({"model.moe.router_dtype": "float8"}, ValueError,
                         r"router_dtype='float8'; allowed: 'float32' \| 'bfloat16'"),
    "dispatch": Case({"model.moe.dispatch": "scatter"}, ValueError,
                     r"dispatch='scatter'; allowed: 'sort' \| 'onehot'"),
    "expert_dropout=1": Case({"model.moe.expert_dropout": 1.0}, ValueError,
                             r"expert_dropout=1\.0; allowed: a number in \[0, 1\)"),
    "z_loss<0": Case({"model.moe.z_loss_weight": -1e-3}, ValueError,
                     r"z_loss_weight=-0\.001; allowed: a finite number >= 0"),
    "eval_capacity_factors": Case({"eval_capacity_factors": (1.0, 0.0)}, ValueError,
                                  r"config\.eval_capacity_factors=\(1\.0, 0\.0\): .*> 0"),
    "activation": Case({"model.activation": "swish"}, ValueError,
                       r"config\.model\.activation='swish': allowed values are"),
    # Config: incompatible combinations.
    "gshard gates with top_k=1": Case({"model.moe.top_k": 1}, ValueError,
                                      r"gate='gshard' with top_k=1 .*allowed with top_k=1"),
    "group_size and num_groups": Case({"model.moe.group_size": 32, "model.moe.num_groups": 4},
                                      ValueError, r"group_size=32 and num_groups=4 are both set"),
    "group_size not dividing": Case({"model.moe.group_size": 48}, ValueError,
                                    r"config\.model\.moe\.group_size=48 does not divide the "
                                    r"256 tokens"),
    "grad_accum not dividing": Case({"grad_accum_steps": 3}, ValueError,
                                    r"config\.grad_accum_steps=3: .*divisors of batch_size=8"),
    "kv heads not dividing": Case({"model.num_kv_heads": 3}, ValueError,
                                  r"config\.model\.num_kv_heads=3: allowed"),
    "vocab smaller than tokenizer": Case({"model.vocab_size": 200}, ValueError,
                                         r"config\.model\.vocab_size=200: .*at least the "
                                         r"tokenizer's vocabulary, 259"),
    # Config: the mesh and the devices.
    "mesh larger than devices": Case({"mesh.data": 4}, ValueError,
                                     r"mesh: axis sizes .*'data': 4.* multiply to 16, but 8 "
                                     r"devices"),
    "mesh axis 0": Case({"mesh.expert": 0}, ValueError, r"mesh\.expert=0: .*positive integer"),
    "E not divisible by expert axis": Case({"model.moe.num_experts": 6, "model.moe.top_k": 2},
                                           ValueError, r"config\.model\.moe\.num_experts=6: "
                                           r"allowed values are multiples of mesh\.expert=4"),
    "batch not divisible by shards": Case({"batch_size": 12}, ValueError,
                                          r"config\.batch_size=12: .*multiples of "
                                          r"grad_accum_steps x data x fsdp x expert = 1 x 8"),
    "mesh cannot split d_model": Case(
        {"mesh.data": 1, "mesh.expert": 1, "mesh.fsdp": 8, "model.d_model": 36}, ValueError,
        r"config\.model\.d_model=36: .*multiples of mesh\.fsdp=8"),
    "unknown balance loss scope": Case(
        {"model.moe.balance_loss_scope": "global"}, ValueError,
        r"balance_loss_scope='global'.*'group'.*'batch'"),
    # Data.
    "data.source": Case({"data.source": "hdfs"}, ValueError,
                        r"data\.source='hdfs' is not supported; allowed values are"),
    "missing file": Case(_text("nope.txt"), FileNotFoundError,
                         r"data\.text_files\.paths: '.*nope\.txt' matches no file"),
    "glob matching nothing": Case(_text("*.md"), FileNotFoundError,
                                  r"data\.text_files\.paths: '.*\*\.md' matches no file"),
    "no paths": Case({"data.source": "text_files", "data.text_files.paths": ""}, ValueError,
                     r"data\.text_files\.paths is empty"),
    "empty file": Case(_text("good.txt", "empty.txt"), ValueError,
                       r"data\.text_files\.paths: .*empty\.txt is empty"),
    "binary file": Case(_text("good.txt", "binary.bin"), ValueError,
                        r"data\.text_files\.paths: .*binary\.bin looks binary \(a NUL byte at "
                        r"offset 0\); allowed: text files"),
    "invalid UTF-8, strict": Case(
        _text("latin1.txt", **{"data.text_files.decode_errors": "strict"}), ValueError,
        r"data\.text_files\.paths: .*latin1\.txt is not valid UTF-8 at byte 3"),
    "decode_errors": Case(_text("good.txt", **{"data.text_files.decode_errors": "fail"}),
                          ValueError, r"decode_errors='fail' is not supported; allowed values"),
    "held_out_fraction": Case(_text("good.txt", **{"data.text_files.held_out_fraction": 1.0}),
                              ValueError, r"data\.text_files\.held_out_fraction=1\.0: .*\[0, 1\)"),
    "unknown TFDS name": Case(lambda files: {"data.source": "tfds", "data.tfds.name": "lm1bb",
                                             "data.tfds.data_dir": str(files / "tfds")},
                              ValueError, r"data\.tfds\.name='lm1bb': no such TFDS dataset; "
                              r"allowed: a registered dataset name .*close names: \['lm1b'"),
    "builtin domains": Case({"data.builtin.num_domains": 9}, ValueError,
                            r"data\.builtin\.num_domains=9"),
    "eval split": Case({"data.eval_split": "test"}, ValueError,
                       r"split='test' does not exist for data\.source='builtin'; allowed"),
    # Checkpoints.
    "another model": Case({"model.moe.d_ff": 96}, ValueError,
                          r"checkpoint .*/checkpoints/4 does not fit this model: parameter "
                          r"'.*ffn/w_down_EFD' has shape \(8, 32, 32\) in the checkpoint and "
                          r"\(8, 96, 32\) in the model"),
    "another expert count": Case({"model.moe.num_experts": 16}, ValueError,
                                 r"checkpoint .* does not fit this model: parameter '.*' has "
                                 r"shape \(.*8.*\) in the checkpoint and \(.*16.*\)"),
    "another sequence length": Case({"seq_len": 16}, ValueError,
                                    r"data iterator state: seq_len=32 in the checkpoint but 16"),
    "half-written state": Case({}, ValueError,
                               r"checkpoint .*/checkpoints/4 is incomplete or corrupt "
                               r"\(state/_METADATA is missing\).* resume from step 2",
                               prepare=_remove("checkpoints/4/state/_METADATA")),
    "half-written data state": Case({}, ValueError,
                                    r"checkpoints/4 is incomplete or corrupt \(data/metadata is "
                                    r"missing\)", prepare=_remove("checkpoints/4/data/metadata")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_before_compiling_and_loses_nothing(name, trained, files, tmp_path,
                                                             monkeypatch):
  case = CASES[name]
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  if case.prepare:
    case.prepare(workdir)
  before = _snapshot(workdir)
  overrides = case.overrides(files) if callable(case.overrides) else case.overrides

  def created(*args, **kwargs):
    raise AssertionError("the model was created (compiled) before the bad input was found")
  monkeypatch.setattr(train, "create_model_and_optimizer", created)
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      compiles.append(event)

  def cache_listener(event, **kwargs):
    del kwargs
    if event == CACHE_HIT_EVENT:  # The persistent cache (tests/conftest.py) skips the compile.
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  jax.monitoring.register_event_listener(cache_listener)
  try:
    with pytest.raises(case.error, match=case.message):
      train.train_and_evaluate(_config(**overrides), str(workdir))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(cache_listener)
  assert not compiles, f"{len(compiles)} compilation(s) before the error"
  assert _snapshot(workdir) == before


def test_the_catalogue_has_at_least_30_cases():
  assert len(CASES) >= 30


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a directory")
  with pytest.raises(NotADirectoryError, match=r"--workdir=.*run is a file; allowed: a directory"):
    train.train_and_evaluate(_config(), str(path))
  assert path.read_text() == "not a directory"


@pytest.mark.parametrize("flag, message", [
    ("--config.model.moe.top_k=1.5", r"--config\.model\.moe\.top_k=1\.5: .*an int"),
    ("--config.batch_size=abc", r"--config\.batch_size=abc: .*an int"),
    ("--config.model.moe.num_expert=4", r"config\.model\.moe has no field 'num_expert'; did you "
                                        r"mean config\.model\.moe\.num_experts\?"),
])
def test_command_line_type_errors_and_typos_are_one_line(flag, message, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "moejax.main", "--config=configs/tiny.py:runlocal",
       f"--workdir={tmp_path / 'run'}", flag], cwd=ROOT, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and re.search(message, last), last
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--config=configs/tiny.py:runlocl"],
     r"^error: --config=configs/tiny.py:runlocl: config arg 'runlocl': allowed names are "
     r"\['runlocal'\]"),
    (["--config=configs/no_such_config.py"],
     r"^error: --config=configs/no_such_config.py: no such config file"),
    (["--config=configs/tiny.py:runlocal", "--config.model.moe.top_k=0"],
     r"^error: config.model.moe.top_k=0; allowed: an integer in \[1, num_experts=8\]"),
    (["--config=configs/tiny.py:runlocal", "--config.model.moe.dispatch=dropless",
      "--config.model.moe.capacity_factor=2.0"],
     r"^error: config.model.moe.capacity_factor=2.0 with dispatch='dropless'"),
])
def test_user_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
  """A config file that does not load and a bad value: one `error:` line on stderr, exit 2, no
  traceback, nothing written (MOEJAX_TRACEBACK=1 would show the traceback)."""
  env = {k: v for k, v in os.environ.items() if k != "MOEJAX_TRACEBACK"}
  result = subprocess.run([sys.executable, "-m", "moejax.main", *args,
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, env={**env, "JAX_PLATFORMS": "cpu"}, check=False)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) <= 3 and re.search(message, lines[-1]), lines
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()


def _print_catalogue() -> None:
  """`python tests/test_bad_input.py`: the catalogue as docs/reliability.md's table."""
  import pathlib
  import tempfile
  root = pathlib.Path(tempfile.mkdtemp())
  train.train_and_evaluate(_config(), str(root / "trained"))
  (root / "files").mkdir()
  files = _make_files(root / "files")
  for name, case in CASES.items():
    workdir = root / name.replace(" ", "_")
    shutil.copytree(root / "trained", workdir)
    if case.prepare:
      case.prepare(workdir)
    overrides = case.overrides(files) if callable(case.overrides) else case.overrides
    try:
      train.train_and_evaluate(_config(**overrides), str(workdir))
      seen = "NO ERROR"
    except Exception as e:  # pylint: disable=broad-except
      seen = f"{type(e).__name__}: {e}".replace(str(workdir), "WORKDIR")
    what = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if k != "data.cache_dir")
    what = (what or "(the run's config)") + (f"; {name}" if case.prepare else "")
    seen = seen.replace(str(files), "DIR").replace("|", "\\|").replace("`", "")
    print(f"| {name} | `{what.replace(str(files), 'DIR')}` | `{seen}` |")


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _print_catalogue()


def test_a_resumed_run_logs_no_library_noise_and_ends_with_a_summary(tmp_path):
  """The console of a run and of its resumption: no JAX backend probe line, no orbax
  'Metadata file does not exist' warning on restore, and one closing summary line."""
  logs = []
  for steps in (4, 6):
    result = subprocess.run(
        [sys.executable, "-m", "moejax.main", "--config=configs/tiny.py:runlocal",
         f"--config.num_train_steps={steps}", "--config.checkpoint_every=2",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    logs.append(result.stderr)
  assert "restored" in logs[1] or "resumed" in logs[1]
  for log in logs:
    assert "Unable to initialize backend" not in log
    assert "Metadata file does not exist" not in log
  assert re.search(r"finished at step 6: eval CE \d\.\d{4}, no-drop CE \d\.\d{4}; 1,536 tokens",
                   logs[1]), logs[1][-2000:]


@pytest.mark.parametrize("args, message", [
    (["--study=no_such_study", "--dry_run"], r"^error: --study='no_such_study': no such study"),
    (["--study=capacity", "--dry_run", "--data=/no/such/file.txt"],
     r"^error: --data: text files \['/no/such/file.txt'\] do not exist"),
])
def test_reproduce_user_errors_are_one_line(args, message):
  env = {k: v for k, v in os.environ.items() if k != "MOEJAX_TRACEBACK"}
  result = subprocess.run([sys.executable, "experiments/reproduce.py", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu"},
                          check=False)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) <= 3, result.stderr[-2000:]
  assert re.search(message, lines[-1]) and "Traceback" not in result.stderr


_NO_FILE = "/no/such/dir"


@pytest.mark.parametrize("command, message", [
    # moejax.main
    ("-m moejax.main --config=configs/tiny.py:runlocl --workdir={tmp}/r", r"config arg 'runlocl'"),
    ("-m moejax.main --config=configs/nope.py --workdir={tmp}/r", r"no such config file"),
    ("-m moejax.main --config=configs/tiny.py --config.model.moe.top_k=0 --workdir={tmp}/r",
     r"config\.model\.moe\.top_k=0; allowed"),
    ("-m moejax.main --config=configs/tiny.py --workdir={tmp}/r "
     "--config.data.source=text_files --config.data.text_files.paths=/no/such.txt",
     r"data\.text_files\.paths: '/no/such\.txt' matches no file"),
    ("-m moejax.main --config=configs/tiny.py --workdir={tmp}/r "
     "--config.data.source=text_files --config.data.text_files.paths=/no/such/*.txt",
     r"'/no/such/\*\.txt' matches no file"),
    ("-m moejax.main --config=configs/tiny.py --workdir={tmp}/a_file", r"is a file; allowed"),
    # the experiment commands
    ("experiments/sample.py --workdir=" + _NO_FILE + " --prompt=a", r"not a training run's"),
    ("experiments/sample.py --workdir={tmp}/a_file --prompt=a", r"not a training run's"),
    ("experiments/evaluate.py --workdir=" + _NO_FILE, r"not a training run's"),
    ("experiments/evaluate.py --workdir=" + _NO_FILE + " --capacity_factors=abc",
     r"--capacity_factors='abc': allowed"),
    ("experiments/routing_analysis.py --workdir=" + _NO_FILE + " --out={tmp}/ra",
     r"not a training run's"),
    ("experiments/routing_analysis.py --traces=" + _NO_FILE + " --out={tmp}/ra", r"--traces="),
    ("experiments/causal_leak.py --workdir=/no/such/*", r"matches no directory"),
    ("experiments/upcycle.py --dense_workdir=" + _NO_FILE + " --config=configs/switch.py:runlocl "
     "--workdir={tmp}/u", r"config arg 'runlocl'"),
    ("experiments/upcycle.py --dense_workdir=" + _NO_FILE + " --config=configs/switch.py:runlocal "
     "--workdir={tmp}/u", r"not a training run's"),
    ("experiments/kill_campaign.py --config=configs/nope.py --workdir={tmp}/k",
     r"no such config file"),
    ("experiments/sweep.py --config=configs/tiny.py:runlocl --workdir={tmp}/s",
     r"config arg 'runlocl'"),
    ("experiments/bench_train.py --config=configs/nope.py", r"no such config file"),
    ("experiments/bench_moe.py --dispatch=nope", r"dispatch='nope'; allowed"),
    ("experiments/reproduce.py --study=no_such_study", r"no such study"),
    ("experiments/time_study_arm.py --study=capacity --arms=nope", r"not an arm of capacity"),
])
def test_every_command_reports_user_errors_in_one_line(command, message, tmp_path):
  """Each command x bad input: exit code 2, at most 3 lines on stderr, the last one `error: ...`
  naming the problem, and no traceback."""
  (tmp_path / "a_file").write_text("not a directory")
  env = {k: v for k, v in os.environ.items() if k != "MOEJAX_TRACEBACK"}
  result = subprocess.run([sys.executable, *command.format(tmp=tmp_path).split()], cwd=ROOT,
                          capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu"},
                          check=False, timeout=600)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(lines) <= 3 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), lines[-1]


def test_every_command_flag_has_help_text():
  """`--help` of every argparse command describes each of its flags."""
  import ast  # pylint: disable=import-outside-toplevel
  missing = []
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    for node in ast.walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
          and not any(k.arg == "help" for k in node.keywords)):
        missing.append(f"{os.path.basename(path)} {ast.literal_eval(node.args[0])}")
  assert not missing, missing
