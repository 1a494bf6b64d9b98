"""loft_dist.tracking: scalars flattened, written to TensorBoard and a real MLflow store, harmless when absent."""

import json
import logging
import sys
import time

import pytest

from loft_dist import tracking
from loft_dist.config import Config, resumable_keys, to_dict
from loft_dist.tracking import Tracker, flatten_params, flatten_scalars

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
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # tests stay off the network


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
    with caplog.at_level(logging.WARNING, logger="loft_dist.tracking"):
        for _ in range(3):
            t = Tracker(tmp_path)
            t.log_round(1, ROUND_METRICS)
            t.log_epoch(1, 0, {"loss": 1.0})
            t.close()
    assert len([r for r in caplog.records if "tensorboard" in r.getMessage()]) == 1
    assert not (tmp_path / "tensorboard").exists()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow file store under tmp_path; the client to read it back.

    mlflow-skinny has no SQL store (no sqlalchemy), and MLflow 3 refuses a file store unless opted in."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # MLflow alone is under test
    return MlflowClient()


def run_id_of(run_dir) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def test_flatten_params_names_sections_and_cuts_long_values():
    flat = flatten_params({"run": {"name": "tiny", "num_cpus": None}, "model": {"tags": ["a", "b"], "x": "y" * 7000}})
    assert {k: v for k, v in flat.items() if k != "model.x"} == {
        "run.name": "tiny", "run.num_cpus": "None", "model.tags": "['a', 'b']"}
    assert len(flat["model.x"]) == 6000 and flat["model.x"].endswith("(truncated)")


def test_mlflow_params_metrics_and_one_run_across_a_resume(tmp_path, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    client, run_dir = mlflow_store, tmp_path / "exp"
    batches = []  # a file store takes any batch size; a tracking server refuses more than 100 params
    log_batch = MlflowClient.log_batch

    def counting(self, run_id, **kw):
        batches.append(len(kw.get("params", ())))
        return log_batch(self, run_id, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    cfg = to_dict(Config())
    t = Tracker(run_dir)
    sent = t.log_params(cfg, resumable_keys())
    assert len(sent) > 100 and max(batches) <= 100 and sum(batches) == len(sent)
    t.log_round(0, {**ROUND_METRICS, "test": {**ROUND_METRICS["test"], "accuracy": 0.25}})
    t.log_round(1, ROUND_METRICS)
    for e in range(2):
        t.log_epoch(1, 4 + e, {"epoch": e, "loss": 2.0 - e})
    t.close()
    run_id = run_id_of(run_dir)
    assert client.get_run(run_id).info.status == "RUNNING"  # an interrupted run stays open for its resumption

    # the resumed driver: same config (one resumable key moved elsewhere) joins the same MLflow run
    cfg["run"]["ray_address"] = "ray://head:10001"
    t2 = Tracker(run_dir)
    assert t2.log_params(cfg, resumable_keys()) == {}
    t2.log_round(2, {"test": {"accuracy": 0.75}})
    t2.close(finished=True)

    assert run_id_of(run_dir) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(params) == set(flatten_params(cfg))  # the config and nothing else (no environment)
    assert params["run.seed"] == "0" and params["run.name"] == "tiny" and params["data.n1"] == "40"
    assert params["run.ray_address"] == "None"  # the first start's value
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "test/accuracy"))
    assert history == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch/loss")) == [(4, 2.0), (5, 1.0)]
    assert {m.value for m in client.get_metric_history(run_id, "epoch/round")} == {1.0}
    assert "round" not in run.data.metrics and "test/n" in run.data.metrics


def test_a_changed_param_costs_a_warning_not_the_run(tmp_path, mlflow_store, caplog):
    long = {"classes": "y" * 7000}  # over MLflow's limit: logged cut, and a resume must not see it as changed
    Tracker(tmp_path).log_params({"train": {"lr": 0.1}, "data": long})
    t = Tracker(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loft_dist.tracking"):
        assert t.log_params({"train": {"lr": 0.2, "epochs": 3}, "data": long}) == {"train.epochs": "3"}
    t.log_round(1, ROUND_METRICS)  # still logging
    run = mlflow_store.get_run(run_id_of(tmp_path))
    assert run.data.params == {"train.lr": "0.1", "train.epochs": "3", "data.classes": flatten_params(long)["classes"]}
    assert run.data.metrics["test/accuracy"] == 0.5
    assert len([r for r in caplog.records if "train.lr" in r.getMessage()]) == 1


def test_mlflow_not_used_without_tracking_uri(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # where MLflow's default store, ./mlruns, would appear
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING, logger="loft_dist.tracking"):
        t = Tracker(tmp_path / "exp")
        assert t.log_params({"run": {"seed": 0}}) == {}
        t.log_round(1, ROUND_METRICS)
        t.close(finished=True)
    assert list(tmp_path.iterdir()) == []
    assert not [r for r in caplog.records if "mlflow" in r.getMessage().lower()]


def test_without_mlflow_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with caplog.at_level(logging.WARNING, logger="loft_dist.tracking"):
        for _ in range(2):
            t = Tracker(tmp_path)
            assert t.log_params({"run": {"seed": 0}}) == {}
            t.log_round(1, ROUND_METRICS)
            t.close(finished=True)
    assert len([r for r in caplog.records if "mlflow is not installed" in r.getMessage()]) == 1
    assert not (tmp_path / "mlflow_run.json").exists()


@pytest.mark.parametrize("resumed", [False, True], ids=["new-run", "resumed-run"])
def test_an_unreachable_mlflow_server_costs_a_warning_not_the_run(tmp_path, monkeypatch, caplog, resumed):
    """A new run fails at creating the MLflow run; a resumed one (run id on disk) at its first request."""
    pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    if resumed:
        (tmp_path / "mlflow_run.json").write_text(json.dumps({"run_id": "0123abcd", "experiment_id": "1"}))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="loft_dist.tracking"):
        t = Tracker(tmp_path)
        assert t.log_params({"run": {"seed": 0}}) == {}
        t.log_round(1, ROUND_METRICS)
        t.log_epoch(1, 0, {"loss": 1.0})
        t.close(finished=True)
    assert time.monotonic() - t0 < 30
    assert len([r for r in caplog.records if "MLflow logging disabled" in r.getMessage()]) == 1
    assert (tmp_path / "mlflow_run.json").exists() == resumed  # no run id for a run that was never created
