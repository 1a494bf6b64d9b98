"""What the e2e tests share: MLflow's environment, the README's commands and the fresh install that runs command 1
(tests/e2e/conftest.py runs it once per session: the demo run)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")
ROOT = Path(__file__).resolve().parents[2]
# What `pip install -e .` reads; the rest of the repo (tests, docs, bench) is not part of the install.
PROJECT_FILES = ("pyproject.toml", "README.md", "loft_dist", "configs")


@contextlib.contextmanager
def mlflow_env(uri: str | None):
    """MLflow's settings in this process's environment (read when a Tracker or an MlflowClient is made), restored
    afterwards: only the tiny run and its own tests log to MLflow, not every run of the session."""
    if uri is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_DISABLE_TELEMETRY="true")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def readme_command(number: int) -> str:
    """The command under `# <number>.` in the README's "Two commands" block, exactly as written."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Two commands' section with a bash block"
    lines = block.group(1).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"# {number}."))
    return lines[at + 1].strip()


def fresh_install(where: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the project and a venv over this interpreter's packages (pip then installs only loft_dist, from the
    copy): (the copy, the environment for README command 1, with no Ray address to join)."""
    project = where / "project"
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            project.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / name)
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return project, env


@contextlib.contextmanager
def in_project(project):
    """The demo's paths are relative to where the user ran it (run.storage_path=runs)."""
    before = os.getcwd()
    os.chdir(project)
    try:
        yield
    finally:
        os.chdir(before)
