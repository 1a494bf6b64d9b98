"""loft_dist.eval.tracking: scalars flattened, written to TensorBoard, mirrored to MLflow, and harmless when absent."""

import json
import logging
import sys
import types

import pytest

from loft_dist.eval import tracking
from loft_dist.eval.tracking import Tracker, flatten_scalars

ROUND_METRICS = {
    "round": 1, "model": "checkpoint of round 1",
    "test": {"n": 40, "accuracy": 0.5, "per_class_accuracy": [0.5, None], "ece": None,
             "groups": {"many": {"classes": [], "accuracy": None, "empty": True},
                        "few": {"classes": [0, 1], "accuracy": 0.25, "empty": False}}},
    "pseudo_labels": {"counts": {"hard": 3, "soft": 2}, "precision": 0.8, "bad": float("nan")},
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(tracking, "_warned", set())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_flatten_keeps_finite_numbers_only():
    flat = flatten_scalars(ROUND_METRICS)
    assert flat == {"round": 1.0, "test/n": 40.0, "test/accuracy": 0.5, "test/groups/few/accuracy": 0.25,
                    "pseudo_labels/counts/hard": 3.0, "pseudo_labels/counts/soft": 2.0, "pseudo_labels/precision": 0.8}


def test_tensorboard_scalars_by_round_and_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Tracker(tmp_path)
    t.log_round(0, {**ROUND_METRICS, "round": 0, "test": {**ROUND_METRICS["test"], "accuracy": 0.25}})
    t.log_round(1, ROUND_METRICS)
    for e in range(3):
        t.log_epoch(1, 10 + e, {"epoch": e, "loss": 2.0 - e, "lr": 0.01})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test/accuracy", "pseudo_labels/precision", "epoch/loss", "epoch/lr", "epoch/round"} <= tags
    assert "round" not in tags  # the step, not a curve
    assert [(s.step, s.value) for s in acc.Scalars("test/accuracy")] == [(0, 0.25), (1, 0.5)]
    assert [(s.step, s.value) for s in acc.Scalars("epoch/loss")] == [(10, 2.0), (11, 1.0), (12, 0.0)]
    assert {s.value for s in acc.Scalars("epoch/round")} == {1.0}


def test_without_tensorboard_one_warning_and_no_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="loft_dist.eval.tracking"):
        for _ in range(3):
            t = Tracker(tmp_path)
            t.log_round(1, ROUND_METRICS)
            t.log_epoch(1, 0, {"loss": 1.0})
            t.close()
    assert len([r for r in caplog.records if "tensorboard" in r.getMessage()]) == 1
    assert not (tmp_path / "tensorboard").exists()


def fake_mlflow(monkeypatch, calls, fail=False):
    """Stand-ins for mlflow's client and Metric, recording what a Tracker sends."""

    class Client:
        def get_experiment_by_name(self, name):
            calls.append(("get_experiment", name))
            return None

        def create_experiment(self, name):
            return "exp-1"

        def create_run(self, exp_id, run_name=None, tags=None):
            calls.append(("create_run", exp_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def log_batch(self, run_id, metrics):
            if fail:
                raise ConnectionError("tracking server down")
            calls.append(("log_batch", run_id, {(m.key, m.step): m.value for m in metrics}))

        def set_terminated(self, run_id, status):
            calls.append(("terminated", run_id, status))

    mlflow = types.ModuleType("mlflow")
    mlflow_tracking = types.ModuleType("mlflow.tracking")
    mlflow_tracking.MlflowClient = Client
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(key=key, value=value, step=step)
    for name, mod in (("mlflow", mlflow), ("mlflow.tracking", mlflow_tracking), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_mlflow_gets_the_same_scalars_and_one_run(tmp_path, monkeypatch):
    calls = []
    fake_mlflow(monkeypatch, calls)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid")
    t = Tracker(tmp_path / "exp")
    sent = t.log_round(1, ROUND_METRICS)
    t.close()
    # a second Tracker (a resumed driver, or the rank-0 train worker) joins the same MLflow run
    t2 = Tracker(tmp_path / "exp")
    t2.log_epoch(1, 7, {"loss": 0.5})
    t2.close(finished=True)
    assert [c[0] for c in calls] == ["get_experiment", "create_run", "log_batch", "log_batch", "terminated"]
    assert calls[2] == ("log_batch", "run-1", {(k, 1): v for k, v in sent.items()})
    assert calls[3] == ("log_batch", "run-1", {("epoch/loss", 7): 0.5, ("epoch/round", 7): 1.0})
    assert json.loads((tmp_path / "exp" / "mlflow_run.json").read_text())["run_id"] == "run-1"


def test_mlflow_not_used_without_tracking_uri(tmp_path, monkeypatch):
    calls = []
    fake_mlflow(monkeypatch, calls)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    Tracker(tmp_path).log_round(1, ROUND_METRICS)
    assert calls == []


def test_an_unreachable_mlflow_server_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog):
    calls = []
    fake_mlflow(monkeypatch, calls, fail=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.invalid")
    t = Tracker(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loft_dist.eval.tracking"):
        t.log_round(1, ROUND_METRICS)
        t.log_round(2, ROUND_METRICS)
        t.close(finished=True)
    assert len([r for r in caplog.records if "MLflow logging disabled" in r.getMessage()]) == 1
