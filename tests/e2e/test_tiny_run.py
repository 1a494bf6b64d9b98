"""End to end on a local Ray: the tiny config through Ray Data, the actor pool, Ray Train + DeepSpeed + peft.

The run learns (accuracy well above chance, training loss falling), logs into a real MLflow file store, and a
re-run after an unrecorded phase redoes that phase only, in the same MLflow run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from loft_dist.rounds import run

from e2e_lib import EPOCHS, mlflow_env  # the tiny run itself is made once per session (tests/e2e/conftest.py)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# Learning, measured on 2 cores with the tiny_run fixture's config (EPOCHS epochs a round at lr 0.05, micro batch 4,
# mu 2, seed 0; the random views and the order Ray Data streams blocks in vary run to run): final test accuracy 24.5 %
# (with the union stream of earlier versions: 24.0 % and 22.75 %); 10 balanced classes, 400 test images, so chance is
# 10 % +- 1.5 % (one binomial standard deviation). 17 % is 4.7 standard deviations above chance.
CHANCE = 0.10
MIN_ACCURACY = 0.17
# The labeled part of the loss (loss_s: logit-adjusted CE, the one term every epoch of every round shares; the soft
# term is bounded below by the entropy of a random teacher's near-uniform targets): the mean of the last round's last
# LOSS_SPAN epochs over the mean of round 1's first LOSS_SPAN epochs. One epoch is 20 steps a worker, and its mean
# moves by up to 0.25 from run to run (round 1's first epoch: 2.44 and 2.20 in two runs); a single epoch against a
# single epoch measured 0.73-0.87, so the spans average that out. Measured with spans of 3: 0.79.
LOSS_SPAN = 3
MAX_LOSS_RATIO = 0.9


@pytest.fixture(autouse=True)
def _mlflow_settings(mlflow_uri):
    """This module's tests read (and its re-run logs into) the tiny run's MLflow store."""
    with mlflow_env(mlflow_uri):
        yield


@pytest.fixture
def tiny_run(tiny_run):
    """(cfg, run_dir, summary) of the session's tiny run."""
    return tiny_run.cfg, tiny_run.run_dir, tiny_run.summary


def _mlflow_run(run_dir: Path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return client, json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def _table_ids(table: Path) -> list[int]:
    return pq.read_table(sorted(table.glob("*.parquet")), columns=["id"]).column("id").to_pylist()


def test_every_round_writes_one_pseudo_label_row_per_pool_image(tiny_run):
    cfg, run_dir, _ = tiny_run
    pool = sorted(pq.read_table(sorted((run_dir / "data" / "unlabeled").glob("*.parquet")), columns=["id"])
                  .column("id").to_pylist())
    for r in range(cfg.rounds.num_rounds + 1):
        table = run_dir / "rounds" / f"r{r}" / "pseudo_labels"
        assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
        assert sorted(_table_ids(table)) == pool  # exactly once each: no loss, no duplicate
        t = pq.read_table(sorted(table.glob("*.parquet")))
        assert {"id", "pred", "msp", "zs_msp", "decision", "weight", "probs"} <= set(t.column_names)
        assert set(t.column("decision").to_pylist()) <= {"hard", "soft", "ood", "rejected"}


def test_checkpoints_hold_peft_adapter_and_head(tiny_run):
    cfg, run_dir, _ = tiny_run
    for r in range(1, cfg.rounds.num_rounds + 1):
        ckpt = run_dir / "rounds" / f"r{r}" / "checkpoint"
        assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert (ckpt / "head.safetensors").is_file()
        assert json.loads((ckpt / "train_state.json").read_text())["epoch"] == cfg.train.epochs_per_round - 1
        # Exact resume needs the optimizer state: at ZeRO 0 (the default) DeepSpeed keeps it, replicated, in rank
        # 0's model-states file; from stage 1 on every rank writes its own optimizer shard.
        assert cfg.train.zero_stage == 0
        state = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)
        momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
        assert momentum and all(m.abs().sum() > 0 for m in momentum), "SGD momentum saved for exact resume"


def test_metrics_and_report(tiny_run):
    cfg, run_dir, summary = tiny_run
    for r in range(cfg.rounds.num_rounds + 1):
        m = json.loads((run_dir / "rounds" / f"r{r}" / "metrics.json").read_text())
        assert set(m["test"]["groups"]) == {"many", "medium", "few"}
        assert m["test"]["groups"]["many"]["empty"]  # the tiny split has no class with > 100 labels
        assert m["test"]["groups"]["few"]["accuracy"] is not None
    final = json.loads((run_dir / "rounds" / f"r{cfg.rounds.num_rounds}" / "metrics.json").read_text())
    assert final["train"]["steps_all_ranks"] > 0 and final["train"]["loss"] > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "zero-shot" in report and "nan" not in report.lower()
    assert summary["final"]["round"] == cfg.rounds.num_rounds


def test_the_run_learns(tiny_run):
    cfg, run_dir, _ = tiny_run
    last = cfg.rounds.num_rounds
    acc = json.loads((run_dir / "rounds" / f"r{last}" / "metrics.json").read_text())["test"]["accuracy"]
    assert acc >= MIN_ACCURACY, f"final test accuracy {acc:.4f} (chance {CHANCE}; measured 0.24, 0.2275)"
    first = json.loads((run_dir / "rounds" / "r1" / "train_metrics.json").read_text())["loss_by_epoch"]["loss_s"]
    final = json.loads((run_dir / "rounds" / f"r{last}" / "train_metrics.json").read_text())["loss_by_epoch"]["loss_s"]
    assert len(first) == len(final) == EPOCHS
    start, end = sum(first[:LOSS_SPAN]) / LOSS_SPAN, sum(final[-LOSS_SPAN:]) / LOSS_SPAN
    assert end <= MAX_LOSS_RATIO * start, f"labeled loss by epoch: round 1 {first}, round {last} {final}"


def test_mlflow_holds_params_and_per_round_metrics(tiny_run):
    cfg, run_dir, _ = tiny_run
    client, run_id = _mlflow_run(run_dir)
    params = client.get_run(run_id).data.params
    assert params["algorithm.name"] == "loft" and params["train.epochs_per_round"] == str(EPOCHS)
    history = client.get_metric_history(run_id, "test/accuracy")
    by_round = {m.step: m.value for m in history}
    assert sorted(by_round) == list(range(cfg.rounds.num_rounds + 1))
    for r, value in by_round.items():
        assert value == json.loads((run_dir / "rounds" / f"r{r}" / "metrics.json").read_text())["test"]["accuracy"]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_rerun_after_an_unrecorded_phase_redoes_only_that_phase(tiny_run, caplog):
    cfg, run_dir, _ = tiny_run
    state = json.loads((run_dir / "state.json").read_text())["completed"]
    last = f"r{cfg.rounds.num_rounds}"
    # Simulate a driver killed in the middle of the last evaluation: phase not recorded, a half-written table left.
    (run_dir / "state.json").write_text(json.dumps({"completed": [p for p in state if p != f"{last}.eval"]}))
    half = run_dir / "rounds" / last / "predictions" / "test"
    (half / "_SUCCESS").unlink()
    # Everything the completed phases wrote: pseudo-label tables, checkpoints (a redone training phase rewrites
    # them), Ray Train's own run dir, metrics of the other rounds.
    before = {p: p.stat().st_mtime_ns for p in [*(run_dir / "rounds").rglob("*"), *(run_dir / "ray_train").rglob("*")]
              if p.is_file() and "predictions" not in str(p) and p != run_dir / "rounds" / last / "metrics.json"}
    client, run_id = _mlflow_run(run_dir)
    logged_before = len(client.get_metric_history(run_id, "test/accuracy"))
    with caplog.at_level(logging.INFO, logger="loft_dist"):
        run(cfg)
    assert f"resuming after {state[-2]}" in caplog.text
    assert "1 of" in caplog.text  # one phase to do
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "completed phases must not be redone"
    assert (half / "_SUCCESS").is_file()
    assert json.loads((run_dir / "state.json").read_text())["completed"][-1] == f"{last}.eval"
    # The re-run logged into the same MLflow run: the redone evaluation's round appended to its history.
    assert _mlflow_run(run_dir)[1] == run_id
    steps = [m.step for m in client.get_metric_history(run_id, "test/accuracy")]
    assert len(steps) == logged_before + 1 and steps.count(cfg.rounds.num_rounds) == 2, steps


def test_evaluate_a_checkpoint_and_its_export_reproduces_the_rounds_metrics(tiny_run, tmp_path, capsys):
    """`loft-dist evaluate` on the run's own test split: the same model scored again by the actor pool gives the
    round's own metrics, from the checkpoint dir and from an export of it; figures beside metrics.json."""
    from loft_dist.cli import main

    cfg, run_dir, _ = tiny_run
    last = cfg.rounds.num_rounds
    want = json.loads((run_dir / "rounds" / f"r{last}" / "metrics.json").read_text())["test"]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    for name, model in (("checkpoint", run_dir / "rounds" / f"r{last}" / "checkpoint"), ("export", tmp_path / "export")):
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", str(model), cfg.data_root, "--out", str(out), "scoring.max_actors=1"]) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert m["test"]["n"] == want["n"] and m["test"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
        assert m["test"]["per_class_accuracy"] == pytest.approx(want["per_class_accuracy"], abs=1e-9)
        assert "ood_test" in m and {"per_class_accuracy.png", "reliability.png"} <= {p.name for p in out.iterdir()}
        assert f"done: test accuracy {100 * want['accuracy']:.1f}%" in capsys.readouterr().out
    # another dataset's classes: one line, exit 2
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    info = json.loads((Path(cfg.data_root) / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**info, "class_names": info["class_names"][::-1]}))
    assert main(["evaluate", str(tmp_path / "export"), str(other), "--out", str(tmp_path / "e3")]) == 2
    assert "evaluate it on the dataset it was trained for" in capsys.readouterr().err
