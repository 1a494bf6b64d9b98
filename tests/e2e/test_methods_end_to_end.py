"""Every method through the same round driver (`loft_dist.rounds.run`) on the embedded data, one short round each:
the config switch `algorithm.name` (and `algorithm.mode=online` for LoFT) is all that differs.

LoFT offline, the default method, is checked on the session's tiny run (tests/e2e/conftest.py `tiny_run`: the same
driver and config switch, 2 longer rounds, which test_tiny_run.py checks further) instead of a run of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loft_dist.config import load_config
from loft_dist.rounds import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATA = ["data.ood_test=0"]  # no OOD test split: one scoring job less per evaluation keeps the file within minutes
CASES = [  # (algorithm.name, algorithm.mode)
    ("zero_shot", "offline"), ("lp", "offline"), ("lft", "offline"), ("fft", "offline"), ("fixmatch", "offline"),
    ("loft", "offline"), ("loft_ow", "offline"), ("ulfine", "offline"), ("loft", "online"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ray_session):
    """One prepared dataset dir for every case (data.root), so none of them re-prepares it."""
    from loft_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("methods")
    prepare_dataset(load_config("configs/tiny.yaml", [f"data.root={root / 'data'}", *DATA]))
    return root


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_method_runs_through_the_round_driver(ray_session, request, name, mode):
    if (name, mode) == ("loft", "offline"):  # the default method: the session's tiny run is one
        tiny = request.getfixturevalue("tiny_run")
        cfg, run_dir, summary = tiny.cfg, tiny.run_dir, tiny.summary
        assert (cfg.algorithm.name, cfg.algorithm.mode) == (name, mode)
    else:
        shared = request.getfixturevalue("shared")
        cfg = load_config("configs/tiny.yaml", [
            f"run.storage_path={shared / 'runs'}", f"run.name={name}-{mode}", f"data.root={shared / 'data'}",
            f"algorithm.name={name}", f"algorithm.mode={mode}", "rounds.num_rounds=1", "train.epochs_per_round=1",
            *DATA])
        summary = run(cfg)
        run_dir = Path(cfg.run_dir).resolve()
    last = 0 if name == "zero_shot" else cfg.rounds.num_rounds
    assert summary["final"]["round"] == last
    m = json.loads((run_dir / "rounds" / f"r{last}" / "metrics.json").read_text())
    assert 0.0 <= m["test"]["accuracy"] <= 1.0 and set(m["test"]["tertiles"]) == {"head", "mid", "tail"}
    if name == "zero_shot":
        assert m["model"] == "zero-shot CLIP" and not (run_dir / "rounds" / "r1").exists()
        return
    train = m["train"]
    assert train["steps_all_ranks"] > 0 and train["steps_all_ranks"] % cfg.train.num_workers == 0  # same steps per rank
    ckpt = run_dir / "rounds" / f"r{last}" / "checkpoint"
    assert (ckpt / "head.safetensors").is_file()
    assert (ckpt / "adapter").is_dir() == (name != "lp")  # LP trains the head only
    if name == "fft":
        assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["method"] == "full"
    if name == "ulfine":
        assert (ckpt / "ulfine.safetensors").is_file() and train["loss_orth"] > 0
    if name in ("lp", "lft", "fft"):
        assert "loss_hard" not in train  # labeled rows only
    if mode == "online":
        assert train["pool_rows_seen"] > 0 and 0.0 <= train["hard_share"] + train["soft_share"] <= 1.0
