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


def _method_name_checks(package: Path) -> list[str]:
    """Comparisons of a `.name` with a method's name (`acfg.name == "ulfine"`) anywhere but the registry's data."""
    import ast

    from loft_dist.config import METHODS

    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "config.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "name"):
                continue
            names = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in METHODS]
            if names:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} compares .name with {names}")
    return found


def test_code_asks_the_method_object_not_the_method_name(tmp_path):
    """One protocol for methods: the registry looks the object up by algorithm.name; nothing else tests the name."""
    assert _method_name_checks(ROOT / "loft_dist") == []
    shutil.copytree(ROOT / "loft_dist", tmp_path / "loft_dist", ignore=shutil.ignore_patterns("__pycache__"))
    loop = tmp_path / "loft_dist" / "train" / "loop.py"
    loop.write_text(loop.read_text() + '\n\ndef _special(a):\n    return a.name in ("ulfine", "fixmatch")\n')
    assert _method_name_checks(tmp_path / "loft_dist") == [
        "loft_dist/train/loop.py:" + str(len(loop.read_text().splitlines())) + " compares .name with ['ulfine', 'fixmatch']"]


def test_the_modules_of_decode_tasks_import_no_torch():
    """Ray Data's decode tasks import the module of their function in every worker process they start: the scoring
    job's read_unit and the training stream's decode steps must not pull in torch (~2.5 s of CPU per process on 2
    cores), which only the Scorer actors and train workers need."""
    code = ("import sys; import loft_dist.scoring.job, loft_dist.data.pseudo_labels, loft_dist.data.transforms; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'open_clip', 'peft'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout[:2000]
