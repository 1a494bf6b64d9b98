"""The README's two commands, as written. Command 2 is what CI runs (.ci/run runs it verbatim, checked here).
Command 1 runs once per session (tests/e2e/conftest.py `demo_run`) in a copy of the project, installed into a fresh
virtual environment as on a user's fresh machine, with an empty model cache (so the demo builds its CLIP stand-in)
and a Ray of its own; here, it must have left what the README says it leaves. What the run learned:
test_demo_run.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from e2e_lib import ROOT, readme_command


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_command(2)
    assert "pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines(), f".ci/run does not run {command!r}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_command_1_installs_and_runs_the_demo(demo_run):
    assert "loft-dist demo" in readme_command(1) and demo_run.rc == 0
    installed = subprocess.run(["python", "-c", "import loft_dist; print(loft_dist.__file__)"], cwd=demo_run.log.parent,
                               env=demo_run.env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(installed).is_relative_to(demo_run.project), f"the fresh install imports loft_dist from {installed}"
    for path in ("config.yaml", "state.json", "data/dataset.json", "report/report.md", "report/gallery.html",
                 "report/accuracy_by_round.png", "rounds/r2/pseudo_labels/_SUCCESS",
                 "rounds/r2/checkpoint/head.safetensors"):
        assert (demo_run.run_dir / path).is_file(), f"the demo left no {path} in {demo_run.run_dir}"
    zero_shot = json.loads((demo_run.run_dir / "rounds" / "r0" / "metrics.json").read_text())
    assert zero_shot["model"] == "zero-shot of the CLIP stand-in (not CLIP)"
    assert 0.40 <= zero_shot["test"]["accuracy"] <= 0.75, zero_shot["test"]["accuracy"]  # real skill, not chance
    log = demo_run.log.read_text()
    assert "stand-in build: step 600/600" in log  # built on first use, with its progress shown
    assert "ETA" in log and "final test accuracy" in log
