"""Every method through the same round driver (`loft_dist.rounds.run`) on the embedded data, one short round each:
the config switch `algorithm.name` (and `algorithm.mode=online` for LoFT) is all that differs.

Every adapter rides along: each case trains another `peft.method` through Ray Train + DeepSpeed with 2 workers, the
scoring actors reload it for the evaluation, and the round is exported and loaded back without Ray.

LoFT offline, the default method, is checked on the session's demo run (tests/e2e/conftest.py `demo_run`: README
command 1, the same driver and config switch from the CLIP stand-in, 2 longer rounds, which test_demo_run.py checks
further) instead of a run of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loft_dist.config import load_config
from loft_dist.rounds import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DATA = ["data.ood_test=0"]  # no OOD test split: fewer images to score per evaluation keeps the file within minutes
CASES = [  # (algorithm.name, algorithm.mode, peft.method)
    ("zero_shot", "offline", "lora"), ("lp", "offline", "none"), ("lft", "offline", "adaptformer"),
    ("fft", "offline", "full"), ("fixmatch", "offline", "vpt"), ("loft", "offline", "lora"),
    ("loft_ow", "offline", "bitfit"), ("ulfine", "offline", "ln"), ("loft", "online", "adaptformer"),
]
POOL_METHODS = ("fixmatch", "loft", "loft_ow", "ulfine")
# One case trains under DeepSpeed ZeRO-3 (every parameter, the frozen tower's included, partitioned over the 2 ranks):
# AdaptFormer, the papers' adapter. ZeRO-3 refuses peft's LoRA on nn.MultiheadAttention (a config error, see config.py).
ZERO3 = {("lft", "offline"): ["train.zero_stage=3"]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, ray_session):
    """One prepared dataset dir for every case (data.root), so none of them re-prepares it."""
    from loft_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("methods")
    prepare_dataset(load_config("configs/tiny.yaml", [f"data.root={root / 'data'}", *DATA]))
    return root


@pytest.mark.parametrize("name, mode, adapter", CASES, ids=[f"{n}-{m}-{a}" for n, m, a in CASES])
def test_method_runs_through_the_round_driver(ray_session, request, tmp_path, name, mode, adapter):
    if (name, mode) == ("loft", "offline"):  # the default method: the session's demo run is one
        demo = request.getfixturevalue("demo_run")
        cfg, run_dir, summary = demo.cfg, demo.run_dir, demo.summary
        assert (cfg.algorithm.name, cfg.algorithm.mode, cfg.peft.method) == (name, mode, adapter)
    else:
        shared = request.getfixturevalue("shared")
        cfg = load_config("configs/tiny.yaml", [
            f"run.storage_path={shared / 'runs'}", f"run.name={name}-{mode}", f"data.root={shared / 'data'}",
            f"algorithm.name={name}", f"algorithm.mode={mode}", f"peft.method={adapter}", "rounds.num_rounds=1",
            "train.epochs_per_round=1", *DATA, *ZERO3.get((name, mode), [])])
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
    if name in POOL_METHODS and _pool_rows(run_dir / "rounds" / f"r{last}" / "pseudo_labels"):
        # each step: B labeled rows beside at most mu x B pool rows, offline and online
        assert 0 < train["pool_rows_seen"] <= cfg.algorithm.mu * train["steps_all_ranks"] * cfg.train.micro_batch_size
        assert 0.0 <= train["hard_share"] + train["soft_share"] <= 1.0
    else:  # a method without pseudo-labels, or a pool that stage 1 emptied (LoFT-OW with random weights)
        assert "pool_rows_seen" not in train
    _export_and_load(run_dir, tmp_path / "export", adapter, m["test"]["accuracy"])


def _pool_rows(table: Path) -> int:
    """The pool rows a round trains beside: the table's hard / soft / rejected rows (stage-1 `ood` rows never)."""
    from loft_dist.data.pseudo_labels import pool_decisions

    n = pool_decisions(table)
    return n["hard"] + n["soft"] + n["rejected"]


def _export_and_load(run_dir: Path, out: Path, adapter: str, accuracy: float) -> None:
    """The round's export loads without Ray or the run dir; peft's own format where peft has the adapter."""
    from loft_dist.export import export_round, load_export

    export_round(run_dir, out)
    model, meta = load_export(out)
    assert meta["peft"]["method"] == adapter and meta["metrics"]["accuracy"] == pytest.approx(accuracy)
    config = out / "adapter" / "adapter_config.json"
    assert config.is_file() == (adapter != "none")
    peft_type = {"lora": "LORA", "ln": "LN_TUNING"}.get(adapter)  # peft's own adapter_config.json
    if peft_type:
        assert json.loads(config.read_text())["peft_type"] == peft_type
    elif adapter != "none":  # loft_dist's documented layout (docs/weights.md)
        assert json.loads(config.read_text())["format"] == "loft_dist"
