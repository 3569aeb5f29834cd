"""One-time migration: re-key committed study results from data paths to data identity.

Before December 2026 a run's `config_key` hashed the absolute paths of its text files, so the
committed results could only be resumed or extended with the corpus at the path it had then. This
rewrites, for every study under `--workdir` whose `study.json` still names its data by path:
- each record's `config_key` (and `+from:` parts) from the path key to the identity key
  (`moejax.study.keys`), after checking that the study's current definition reproduces the stored
  path key exactly (if any record's key is not reproduced, nothing is rewritten: nothing is
  guessed);
- `study.json`: the data by file name plus `data_identity`;
- `runs/*/seed*/config_key` of interrupted runs, so they resume.

    python experiments/migrate_study_keys.py --workdir=experiments/results [--dry_run]

Run it from the directory the studies were run from (their `--data` paths are relative to it).
Every data source's keys changed (location fields left the key), so built-in and TFDS studies are
re-keyed too; a text-file study whose `study.json` has `data_identity` is already migrated and left
as it is, and a rerun after an interrupted migration finishes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from moejax import cli  # noqa: E402  pylint: disable=wrong-import-position
from moejax import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from moejax import study as study_lib  # noqa: E402  pylint: disable=wrong-import-position
from moejax.study import keys  # noqa: E402  pylint: disable=wrong-import-position


def key_map(study: study_lib.Study, meta: dict, records: list[dict]
            ) -> tuple[dict[str, str], list[str]]:
  """{path key: identity key} for every (arm, seed) of the study and of its records (finished or
  not: interrupted runs keep their checkpoints), and the finished records whose stored key is
  neither the path key the study gives now nor already the identity key."""
  overrides = config_lib.data_overrides(meta["data"], meta["tokenizer"])
  arms = {a.name: a for a in study.arms}
  seeds = sorted(set(study.seeds) | {r["seed"] for r in records})
  mapping, new_keys = {}, set()
  for arm in study.arms:
    for seed in seeds:
      config = study_lib.arm_config(study, arm, seed, meta["scale"], overrides)
      new = keys.config_key(config)
      mapping[keys.path_config_key(config)] = new
      new_keys.add(new)
  problems = []
  for r in records:
    stored = r.get("config_key", "").split("+from:")[0]
    if not r.get("final") or stored in mapping or stored in new_keys:
      continue
    problems.append(f"{r['arm']!r} seed {r['seed']}: stored key {stored} is not this study's "
                    f"config at these data paths" + ("" if r["arm"] in arms else
                                                     " (no such arm in the study now)"))
  return mapping, problems


def _rekey(key: str, mapping: dict[str, str]) -> str:
  return "+from:".join(mapping.get(part, part) for part in key.split("+from:"))


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def migrate(study: study_lib.Study, study_dir: str, dry_run: bool = False) -> list[str]:
  """Migrates one study directory; returns the problems (empty: every record re-keyed). Safe to
  rerun, also after an interrupted run: keys that are already identity keys stay."""
  meta_path = os.path.join(study_dir, "study.json")
  results_path = os.path.join(study_dir, "results.jsonl")
  with open(meta_path) as f:
    meta = json.load(f)
  if "data_identity" in meta:  # Text files named by content: migrated (their paths are gone).
    return []
  with open(results_path) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  mapping, problems = key_map(study, meta, lines)
  if problems or dry_run:
    return problems
  for r in lines:
    if "config_key" in r:
      r["config_key"] = _rekey(r["config_key"], mapping)
  _write(results_path, "".join(json.dumps(r) + "\n" for r in lines))
  runs = os.path.join(study_dir, "runs")
  for root, _, files in os.walk(runs) if os.path.isdir(runs) else ():
    if "config_key" in files:
      path = os.path.join(root, "config_key")
      with open(path) as f:
        old = f.read().strip()
      _write(path, _rekey(old, mapping))
  new_meta = {**meta, **study_lib.data_meta(meta["data"], meta["tokenizer"])}
  _write(meta_path, json.dumps(new_meta, indent=2))  # Last: it marks text studies migrated.
  return []


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="experiments/results",
                      help="the studies directory to migrate")
  parser.add_argument("--dry_run", action="store_true", help="check every record, rewrite nothing")
  args = parser.parse_args()
  from reproduce import load_study  # pylint: disable=import-outside-toplevel
  failed = False
  for name in sorted(os.listdir(args.workdir)):
    study_dir = os.path.join(args.workdir, name)
    if not (os.path.exists(os.path.join(study_dir, "study.json"))
            and os.path.exists(os.path.join(study_dir, "results.jsonl"))
            and os.path.exists(os.path.join(HERE, "studies", f"{name}.py"))):
      continue
    problems = migrate(load_study(name), study_dir, args.dry_run)
    print(f"{name}: " + ("; ".join(problems) if problems else "ok"))
    failed |= bool(problems)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  cli.run(main)  # user errors: one `error:` line, exit 2
