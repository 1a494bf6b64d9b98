"""The import contracts of pyproject.toml's [tool.importlinter] (DESIGN §4's layers) hold, and would catch a breach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports as a user runs it, on the loft_dist package found first on the path from cwd."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_an_import_across_a_layer_breaks_the_contract(tmp_path):
    """Evaluation importing training (a sibling it must never use) is reported, with the line that does it."""
    shutil.copytree(ROOT / "loft_dist", tmp_path / "loft_dist", ignore=shutil.ignore_patterns("__pycache__"))
    metrics = tmp_path / "loft_dist" / "eval" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom loft_dist.train import trainer  # noqa: E402\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "loft_dist.eval.metrics -> loft_dist.train.trainer" in done.stdout, done.stdout[-3000:]
