"""End to end on a local Ray: the tiny config through Ray Data, the actor pool, Ray Train + DeepSpeed + peft."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from loft_dist.config import load_config
from loft_dist.rounds import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("configs/tiny.yaml", [f"run.storage_path={root}", "run.name=e2e", "train.epochs_per_round=2",
                                            "rounds.num_rounds=2"])
    summary = run(cfg)
    return cfg, Path(cfg.run_dir).resolve(), summary


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
        assert 0.0 <= m["test"]["accuracy"] <= 1.0
        assert set(m["test"]["groups"]) == {"many", "medium", "few"}
        assert m["test"]["groups"]["many"]["empty"]  # the tiny split has no class with > 100 labels
        assert m["test"]["groups"]["few"]["accuracy"] is not None
    final = json.loads((run_dir / "rounds" / f"r{cfg.rounds.num_rounds}" / "metrics.json").read_text())
    assert final["train"]["steps_all_ranks"] > 0 and final["train"]["loss"] > 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "zero-shot" in report and "nan" not in report.lower()
    assert summary["final"]["round"] == cfg.rounds.num_rounds


def test_rerun_resumes_and_redoes_only_the_incomplete_phase(tiny_run, caplog):
    cfg, run_dir, _ = tiny_run
    state = json.loads((run_dir / "state.json").read_text())["completed"]
    last = f"r{cfg.rounds.num_rounds}"
    # Simulate a driver killed in the middle of the last evaluation: phase not recorded, a half-written table left.
    (run_dir / "state.json").write_text(json.dumps({"completed": [p for p in state if p != f"{last}.eval"]}))
    half = run_dir / "rounds" / last / "predictions" / "test"
    (half / "_SUCCESS").unlink()
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "rounds").rglob("*.parquet") if "predictions" not in str(p)}
    with caplog.at_level(logging.INFO, logger="loft_dist"):
        run(cfg)
    assert f"resuming after {state[-2]}" in caplog.text
    assert "1 of" in caplog.text  # one phase to do
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "completed phases must not be redone"
    assert (half / "_SUCCESS").is_file()
    assert json.loads((run_dir / "state.json").read_text())["completed"][-1] == f"{last}.eval"
