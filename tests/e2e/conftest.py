"""The demo run, made once per session by README command 1 as written (`pip install -e ".[dev]" && loft-dist demo`)
in a fresh install of a copy of the project, logging into a real MLflow file store: test_readme_commands.py checks
that the command did what the README says, test_demo_run.py what the run learned and wrote (and re-runs it in this
process), and test_methods_end_to_end.py's loft-offline case checks it as the LoFT (offline) run of the round
driver, instead of running the same method through the same driver a second time."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from types import SimpleNamespace

import pytest

from e2e_lib import fresh_install, in_project, mlflow_env, readme_command


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str | None:
    """A real MLflow file store that the demo run logs into; None without the MLflow client (its tests then skip)."""
    if importlib.util.find_spec("mlflow") is None:
        return None
    return tmp_path_factory.mktemp("mlruns").as_uri()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, mlflow_uri, ray_session):
    """README command 1 in a fresh install: SimpleNamespace(project, env, log, rc, run_dir, cfg, summary). Its Ray is
    its own (no RAY_ADDRESS), its model cache the session's (tests/conftest.py: empty until the demo builds the
    stand-in). cfg holds the run's relative paths: read them with `in_project`.

    It asks for ray_session, which tests re-running the demo in this process use, so that every test of the demo run
    is in that shared Ray's xdist group (tests/conftest.py): one test process makes the demo, once."""
    from loft_dist.config import load_config

    where = tmp_path_factory.mktemp("readme-command-1")
    project, env = fresh_install(where)
    log = where / "command1.log"
    with mlflow_env(mlflow_uri), log.open("w") as out:
        env.update({k: os.environ[k] for k in os.environ if k.startswith("MLFLOW_")})
        rc = subprocess.run(["bash", "-c", readme_command(1)], cwd=project, env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=1700).returncode
    run_dir = project / "runs" / "tiny"  # where the README says the demo leaves everything
    if rc != 0 or not (run_dir / "report" / "metrics.json").is_file():
        pytest.fail(f"README command 1 exited {rc}:\n{log.read_text()[-4000:]}")
    with in_project(project):
        cfg = load_config(str(run_dir / "config.yaml"))
    return SimpleNamespace(project=project, env=env, log=log, rc=rc, run_dir=run_dir, cfg=cfg,
                           summary=json.loads((run_dir / "report" / "metrics.json").read_text()))
