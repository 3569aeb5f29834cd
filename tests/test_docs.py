"""Every ```python block of README.md and docs/*.md runs as pasted, in a fresh interpreter from
the repository root (so a snippet cannot rot). Configuration fragments that need your data are
fenced as ```text instead."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def python_blocks():
  for path in DOCS:
    with open(path) as f:
      text = f.read()
    for i, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)):
      line = text[:match.start()].count("\n") + 1
      yield pytest.param(match.group(1), id=f"{os.path.relpath(path, ROOT)}:{line}")


BLOCKS = list(python_blocks())


def test_the_docs_have_python_blocks():
  assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs_as_pasted(code):
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_relative_links_resolve():
  """Every relative link or image of README.md and docs/*.md names a file that exists (pages
  moved into docs/ keep working links), and none points into a git-ignored run folder."""
  broken = []
  for path in DOCS:
    with open(path) as f:
      text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)  # links in code are text
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if target.startswith(("http://", "https://", "#", "mailto:")):
        continue
      file = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
      if not os.path.exists(file) or "/runs/" in target:
        broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
  assert not broken, broken
