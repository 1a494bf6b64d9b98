"""What the e2e tests share: the tiny run's settings and MLflow's environment (tests/e2e/conftest.py makes the run)."""

from __future__ import annotations

import contextlib
import os

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")
EPOCHS = 6
LR = 0.05  # tiny.yaml's 0.02 with 2 epochs a round left test accuracy at chance (10.75 %): nothing to assert on
# Every step trains B labeled rows beside mu x B pool rows, and an epoch is one pass over the labeled rows: micro
# batch 4 gives the 159 labeled rows 20 steps a worker per epoch (at 8: 10 steps, and a final accuracy of 15.75 %)
MICRO = 4


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
