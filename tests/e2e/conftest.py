"""The tiny run of test_tiny_run.py, made once per session: test_tiny_run.py checks what it learned and wrote, and
test_methods_end_to_end.py's loft-offline case checks it as the LoFT (offline) run of the round driver, instead of
running the same method through the same driver a second time."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from e2e_lib import EPOCHS, LR, MICRO, mlflow_env


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str | None:
    """A real MLflow file store that the tiny run logs into; None without the MLflow client (its tests then skip)."""
    if importlib.util.find_spec("mlflow") is None:
        return None
    return tmp_path_factory.mktemp("mlruns").as_uri()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_session, mlflow_uri):
    """The tiny config, 2 rounds of EPOCHS epochs at LR and micro batch MICRO, logging into `mlflow_uri`:
    (cfg, run_dir, summary)."""
    from loft_dist.config import load_config
    from loft_dist.rounds import run

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/tiny.yaml", [
        f"run.storage_path={root}", "run.name=e2e", f"train.epochs_per_round={EPOCHS}", f"train.lr={LR}",
        f"train.micro_batch_size={MICRO}", "rounds.num_rounds=2"])
    with mlflow_env(mlflow_uri):
        summary = run(cfg)
    return SimpleNamespace(cfg=cfg, run_dir=Path(cfg.run_dir).resolve(), summary=summary)
