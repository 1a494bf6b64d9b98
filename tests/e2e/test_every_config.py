"""Every file in configs/ at tiny scale, by overrides only, so that no config rots: the data become the embedded
digits, the model the tiny ViT loaded from a weights file written here, the budget a couple of optimizer steps;
every method, adapter, loss and training setting of the file stays as written. Each distinct such setting runs
one round through the round driver (Ray Data, the actor pool, Ray Train + DeepSpeed with 2 workers); configs that
differ only in their data section (overridden here) share one run. The setting of tiny.yaml (the defaults) and of
ulfine_tiny.yaml (the defaults with algorithm.name=ulfine) is not run again here: the round driver runs it for the
demo run (tests/e2e/test_demo_run.py) and in every case of tests/e2e/test_methods_end_to_end.py. pool.yaml, a
`loft-dist score` config, scores a pool with its own scoring section."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from loft_dist.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if p.name != "pool.yaml"]
DATA = ["data.source=embedded", "data.source_path=''", "data.test_source=carve", "data.test_path=''", "data.protocol=lt",
        "data.n1=40", "data.gamma_l=10", "data.m1=80", "data.gamma_u=10", "data.unlabeled_dist=consistent",
        "data.labeled_in_unlabeled=false", "data.ood_source=generated", "data.ood_path=''", "data.ood_count=null",
        "data.ood_ratio=0.25", "data.ood_test=0", "data.image_size=32", "data.rows_per_shard=256"]
BUDGET = ["rounds.num_rounds=1", "train.num_workers=2", "train.use_gpu=false", "train.precision=fp32",
          "train.epochs_per_round=1", "train.max_steps=0", "scoring.gpus_per_actor=0", "scoring.min_actors=1",
          "scoring.max_actors=1", "scoring.cpus_per_actor=0.5", "scoring.torch_threads=1", "scoring.batch_size=64",
          "scoring.precision=fp32"]
SECTIONS = ("model", "peft", "algorithm", "train", "rounds", "scoring", "eval")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The tiny ViT's weights as a safetensors file, from another seed than its random init: model.pretrained."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from loft_dist.models.clip import _register_configs

    _register_configs()
    torch.manual_seed(11)
    sd = open_clip.create_model("loft-tiny-vit").state_dict()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def tiny(path: Path, weights: str, *extra: str):
    return load_config(str(path), [*DATA, *BUDGET, "model.name=loft-tiny-vit", f"model.pretrained={weights}",
                                   "model.force_quick_gelu=false", *extra])


def _setting(cfg) -> str:
    """What a config trains and scores with, once its data and budget are tiny: its runs are identical beyond it."""
    d = asdict(cfg)
    return json.dumps({k: d[k] for k in SECTIONS}, sort_keys=True, default=str)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_at_tiny_scale_by_overrides_only(path, weights):
    cfg = tiny(path, weights)
    assert cfg.model.pretrained == weights and cfg.data.source == "embedded"


def _budget(path: Path) -> list[str]:
    """A config with its own step budget (train.max_steps) keeps it, scaled to 2 steps a round; the rest train an epoch."""
    import yaml

    own = (yaml.safe_load(path.read_text()) or {}).get("train", {}).get("max_steps", 0)
    return ["train.max_steps=2", "train.steps_per_epoch=2"] if own else []


def test_every_distinct_config_runs_one_round(tmp_path, weights, ray_session):
    from loft_dist.rounds import run

    groups: dict[str, list[Path]] = {}
    for p in RUN_CONFIGS:
        groups.setdefault(_setting(tiny(p, weights, *_budget(p))), []).append(p)
    run_elsewhere = {_setting(tiny(p, weights)) for p in CONFIGS if p.name in ("tiny.yaml", "ulfine_tiny.yaml")}
    todo = [members for setting, members in groups.items() if setting not in run_elsewhere]
    assert len(todo) >= 3, [[p.name for p in g] for g in todo]  # the LoFT, LoFT-OW and ULFine paper settings
    for i, members in enumerate(todo):
        p, names = members[0], ", ".join(m.name for m in members)
        cfg = tiny(p, weights, *_budget(p), f"run.storage_path={tmp_path}", f"run.name=c{i}-{p.stem}")
        assert run(cfg)["final"]["round"] == 1, names
        m = json.loads((Path(cfg.run_dir) / "rounds" / "r1" / "metrics.json").read_text())
        assert 0.0 <= m["test"]["accuracy"] <= 1.0 and m["train"]["steps_all_ranks"] > 0, names
        if _budget(p):  # 2 optimizer steps on each of the 2 ranks, in micro steps, whatever the config's own budget
            assert m["train"]["steps_all_ranks"] == 2 * 2 * cfg.train.batch_plan()[1], (names, m["train"])


def test_the_pool_config_scores_a_pool(tmp_path, weights, ray_session):
    from loft_dist.cli import main
    from loft_dist.data.prepare import prepare_dataset
    from loft_dist.data.pseudo_labels import table_rows

    pool = next(p for p in CONFIGS if p.name == "pool.yaml")
    data = tmp_path / "data"
    info = prepare_dataset(tiny(pool, weights, f"data.root={data}"))
    out = tmp_path / "labels"
    overrides = [*DATA, *BUDGET, "model.name=loft-tiny-vit", f"model.pretrained={weights}", f"data.root={data}",
                 f"scoring.input={data}", f"scoring.output={out}", "scoring.rows_per_chunk=100"]
    assert main(["score", str(pool), *overrides]) == 0
    assert table_rows(out) == info["rows"]["unlabeled"]
