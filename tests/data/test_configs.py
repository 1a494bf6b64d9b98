"""The dataset configs in configs/: they load, say how to run them, and their protocols fit the real datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from loft_dist.config import ConfigError, load_config
from loft_dist.data import protocol

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SOURCE, TEST, OOD = "data.source_path=/data/src", "data.test_path=/data/val", "data.ood_path=/data/ood"
PATHS = {"imagenet127_1pct": [SOURCE, TEST], "imagenet127_1pct_ow": [SOURCE, TEST, OOD], "cifar100_lt_ow": [SOURCE, OOD]}
# Training images per class of the official sets.
PER_CLASS = {"cifar10": (10, 5000), "cifar100": (100, 500)}
DATASET_CONFIGS = ["cifar10_lt", "cifar100_lt_n50_m400", "cifar100_lt_n150_m300", "imagenet127_1pct",
                   "cifar100_lt_ow", "imagenet127_1pct_ow", "cifar100_lt_loft", "cifar100_lt_ulfine"]


def load(name: str, *extra: str):
    text = (CONFIGS / f"{name}.yaml").read_text()
    return load_config(str(CONFIGS / f"{name}.yaml"), PATHS.get(name, [SOURCE]) + list(extra)), text


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_config_loads_and_names_its_command(name):
    cfg, text = load(name)
    command = "loft-dist run" if name in ("cifar100_lt_loft", "cifar100_lt_ulfine") else "loft-dist prepare"
    assert f"{command} configs/{name}.yaml" in text
    assert cfg.run.name == name and cfg.data.image_size == 224 and cfg.data.hflip


@pytest.mark.parametrize("name", [n for n in DATASET_CONFIGS if n.startswith("cifar")])
@pytest.mark.parametrize("dist", ["consistent", "uniform", "reversed"])
def test_cifar_protocols_fit_the_official_training_sets(name, dist):
    cfg, _ = load(name, f"data.unlabeled_dist={dist}")
    d = cfg.data
    classes, per_class = PER_CLASS[d.source]
    n = protocol.long_tail_counts(d.n1, d.gamma_l, classes)
    m = protocol.unlabeled_counts(d.m1, d.gamma_u, classes, dist)
    assert max(a + b for a, b in zip(n, m)) <= per_class


def test_paper_values():
    c100, _ = load("cifar100_lt_n50_m400")
    assert (c100.data.n1, c100.data.m1, c100.data.gamma_l, c100.data.gamma_u) == (50, 400, 10, 10)
    assert c100.data.labeled_in_unlabeled and c100.data.test_source == "official"
    assert protocol.long_tail_counts(50, 10, 100)[-1] == 5
    n150, _ = load("cifar100_lt_n150_m300")
    assert (n150.data.n1, n150.data.m1) == (150, 300)
    inet, _ = load("imagenet127_1pct")
    assert (inet.data.protocol, inet.data.labeled_percent, inet.data.labeled_in_unlabeled) == ("percent", 1.0, True)
    loft, _ = load("cifar100_lt_loft")
    a, t = loft.algorithm, loft.train
    assert (a.name, a.c_hard, a.c_ood, a.lambda_u, a.lambda_uc) == ("loft", 0.6, 0.3, 3.0, 1.0)
    assert (t.lr, t.momentum, t.weight_decay, t.labeled_view) == (0.01, 0.9, 5e-4, "rrc")
    assert (loft.model.name, loft.model.pretrained) == ("ViT-B-16-quickgelu", "/mnt/shared/weights/ViT-B-16.pt")
    assert (loft.data.n1, loft.data.m1, loft.data.image_size, loft.data.hflip) == (50, 400, 224, True)
    ow, _ = load("cifar100_lt_ow")
    assert ow.algorithm.zs_filter and ow.data.ood_source == "cifar10" and ow.data.ood_test > 0


def test_paths_are_asked_for_by_name():
    with pytest.raises(ConfigError, match="data.source_path=''.*directory holding cifar-100-python"):
        load_config(str(CONFIGS / "cifar100_lt_n50_m400.yaml"))
    with pytest.raises(ConfigError, match="data.test_source='official'.*needs data.test_path"):
        load_config(str(CONFIGS / "imagenet127_1pct.yaml"), ["data.source_path=/data/train"])
    with pytest.raises(ConfigError, match="data.ood_path=''.*data.ood_source=cifar10 reads from a path"):
        load_config(str(CONFIGS / "cifar100_lt_ow.yaml"), ["data.source_path=/data/c100"])


@pytest.mark.parametrize("overrides, message", [
    (["data.test_source=official"], "embedded digits have no official test set"),
    (["data.source=imagefolder", "data.source_path=/x", "data.test_path=/y", "data.test_source=carve"],
     "data.test_path='/y' is not allowed: not read with data.test_source=carve"),
    (["data.ood_source=generated", "data.ood_count=-1"], "needs a finite source"),
    (["data.labeled_percent=0"], r"a percentage in \(0, 100\]"),
    (["data.shard_mb=0"], "megabytes per shard"),
    (["data.protocol=random"], "choose one of: lt, percent"),
    (["data.source=cifar10", "data.source_path=/c", "data.ood_source=cifar10", "data.ood_path=/c"],
     "must come from another source"),
])
def test_data_config_errors_name_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
