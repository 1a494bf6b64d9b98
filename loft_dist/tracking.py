"""Experiment tracking: the numeric scalars of each round and each training epoch, to TensorBoard and MLflow.

TensorBoard event files go to <run dir>/tensorboard (`tensorboard --logdir runs/`). MLflow is used as
well when `mlflow` is importable and MLFLOW_TRACKING_URI is set; the MLflow run id is kept in
<run dir>/mlflow_run.json so that a resumed run and the train workers log into the same MLflow run.
Tracking is a side channel: a missing package or an unreachable server costs one warning, never the run.

Params: the driver logs the run's resolved config once per start (`run.seed`, `train.lr`, … as strings);
environment variables are never logged. A resumed run keeps the params of its first start: MLflow refuses
to change a logged param, and only where-it-runs keys (config.resumable_keys()) may change on resumption.

Tags: a round's metrics under their own path (`test/accuracy`, `pseudo_labels/precision`, step = round);
a training epoch's under `epoch/` (`epoch/loss`, step = global epoch over all rounds).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from loft_dist import storage

log = logging.getLogger(__name__)
TB_DIR = "tensorboard"
MLFLOW_FILE = "mlflow_run.json"
MAX_PARAMS_PER_BATCH = 100  # MLflow's per-request limits (mlflow.utils.validation)
MAX_PARAM_LENGTH = 6000
TRUNCATED = "...(truncated)"
_warned: set[str] = set()  # one warning per cause per process, however many Trackers a run creates


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def flatten_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested dict → {"a/b/c": float} of its finite int/float leaves (lists, strings, bools and None are not
    scalars worth a curve: per-class lists would be thousands of tags)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config → {"section.key": str(value)}; a value over MLflow's length limit is cut and says so."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - len(TRUNCATED)] + TRUNCATED
    return out


class Tracker:
    """Scalars of one run, to TensorBoard (if installed) and MLflow (if installed and configured)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = storage.absolute(str(run_dir))
        # TensorBoard writes local files only: for a run dir in object storage, into a temporary directory that is
        # copied to <run dir>/tensorboard after every flush (each writer's own event file, so writers never collide).
        self._remote = storage.is_uri(self.run_dir) and not storage.is_local(self.run_dir)
        self._tb_dir = tempfile.mkdtemp(prefix="loft_dist-tb-") if self._remote else storage.join(self.run_dir, TB_DIR)
        self._tb = None
        self._mlflow = None  # (client, run_id)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _warn_once("tensorboard", "tensorboard is not installed: no TensorBoard logs are written "
                       "(pip install tensorboard)")
        else:
            self._tb = SummaryWriter(log_dir=self._tb_dir)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                import mlflow  # noqa: F401
            except ImportError:
                _warn_once("mlflow", "MLFLOW_TRACKING_URI is set but mlflow is not installed: not logging to MLflow")
            else:
                self._mlflow = self._mlflow_run()

    def _mlflow_run(self):
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient()
            state = storage.join(self.run_dir, MLFLOW_FILE)
            if storage.is_file(state):
                return client, storage.read_json(state)["run_id"]
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "loft_dist")
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run = client.create_run(exp_id, run_name=storage.name(self.run_dir),
                                    tags={"loft_dist.run_dir": self.run_dir})
            storage.write_json(state, {"run_id": run.info.run_id, "experiment_id": exp_id})
            return client, run.info.run_id
        except Exception as e:  # noqa: BLE001 - any tracking-server failure
            self._disable(e)
            return None

    def _sync_tb(self) -> None:
        if self._remote:
            try:
                storage.upload_dir(self._tb_dir, storage.join(self.run_dir, TB_DIR))
            except Exception as e:  # noqa: BLE001 - tracking never stops a run
                _warn_once("tb-upload", "TensorBoard logs not copied to %s: %s", self.run_dir, e)

    def _disable(self, e: Exception) -> None:
        _warn_once("mlflow-error", "MLflow logging disabled: %s: %s", type(e).__name__, e)
        self._mlflow = None

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()  # a crashed run still shows its curves up to the last round / epoch
            self._sync_tb()
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = int(time.time() * 1000)
            items = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in scalars.items()]
            try:
                for i in range(0, len(items), 1000):  # MLflow's per-request limit on metrics
                    client.log_batch(run_id, metrics=items[i:i + 1000])
            except Exception as e:  # noqa: BLE001
                self._disable(e)

    def log_params(self, config: dict, resumable: tuple[str, ...] = ()) -> dict[str, str]:
        """The run's resolved config (nested dict) as MLflow params; returns the params sent.

        Params already in the MLflow run (a resumed run) are not sent again: MLflow refuses a changed value.
        A changed `resumable` key keeps its first start's value silently; any other change means the run
        dir's config guard was bypassed, which is worth a warning, not the run."""
        if self._mlflow is None:
            return {}
        from mlflow.entities import Param

        client, run_id = self._mlflow
        try:
            logged = client.get_run(run_id).data.params
            params = flatten_params(config)
            changed = sorted(k for k in params.keys() & logged.keys() if k not in resumable and params[k] != logged[k])
            if changed:
                _warn_once("mlflow-params", "MLflow keeps the first start's params of %s: %s", run_id, changed)
            new = {k: v for k, v in params.items() if k not in logged}
            items = [Param(k, v) for k, v in new.items()]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
            return new
        except Exception as e:  # noqa: BLE001
            self._disable(e)
            return {}

    def log_round(self, round_idx: int, metrics: dict) -> dict[str, float]:
        """A round's metrics.json (nested) at step = round; returns the scalars logged."""
        scalars = flatten_scalars({k: v for k, v in metrics.items() if k != "round"})
        self._log(scalars, round_idx)
        return scalars

    def log_epoch(self, round_idx: int, global_epoch: int, metrics: dict) -> dict[str, float]:
        """One training epoch's metrics at step = global epoch (epochs of all rounds on one axis)."""
        scalars = {f"epoch/{k}": v for k, v in flatten_scalars(metrics).items()}
        scalars["epoch/round"] = float(round_idx)
        self._log(scalars, global_epoch)
        return scalars

    def close(self, finished: bool = False) -> None:
        """Flush and close; `finished=True` (the driver, after the last round) also ends the MLflow run."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._sync_tb()
        if self._mlflow is not None and finished:
            client, run_id = self._mlflow
            try:
                client.set_terminated(run_id, "FINISHED")
            except Exception as e:  # noqa: BLE001
                self._disable(e)
        self._mlflow = None
