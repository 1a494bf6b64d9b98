"""The CLIP stand-in (loft_dist/models/standin.py; trained here on reserved digits with noisy captions, not CLIP):
its pretraining digits never reach a prepared split, the builder is deterministic, model.pretrained loads exactly
what it wrote, and a rebuild of the default settings scores the reference zero-shot accuracy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from loft_dist.cli import build_standin_file
from loft_dist.config import load_config
from loft_dist.data import embedded
from loft_dist.data.prepare import plan_splits, prepare_dataset
from loft_dist.data.store import iter_table_rows, shard_paths
from loft_dist.data.transforms import clean_pixels
from loft_dist.errors import ConfigError
from loft_dist.models.clip import build_classifier, create_clip
from loft_dist.models.standin import STANDIN, StandinSettings, standin_path, train_standin
from loft_dist.models.weights import MissingWeightsError

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
FAST = StandinSettings(steps=3, batch_size=16)
# Zero-shot accuracy of the default settings on the demo's test split, measured when they were tuned (2 CPU cores,
# torch 2.x); a rebuild elsewhere may differ by float rounding in training, hence the tolerance.
REFERENCE_ZERO_SHOT, TOLERANCE = 0.557, 0.08


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOFT_DIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_reserved_digits_are_held_back():
    reserved = embedded.reserved_digit_indices()
    assert np.bincount(embedded.reserved_digits().labels).tolist() == [embedded.RESERVED_PER_CLASS] * 10
    kept = embedded.digits_source().index
    assert len(np.intersect1d(kept, reserved)) == 0 and len(kept) + len(reserved) == 1797
    assert np.array_equal(reserved, embedded.reserved_digit_indices())  # fixed: the same draw every time


def test_no_prepared_split_holds_a_reserved_digit(tmp_path):
    cfg = load_config(TINY, [f"data.root={tmp_path}"])
    info = prepare_dataset(cfg)
    reserved = set(embedded.reserved_digit_indices().tolist())
    reserved_bytes = {embedded.reserved_digits().encoded(i) for i in range(len(reserved))}
    kept_index = embedded.digits_source().index
    for split in info["rows"]:
        for row in iter_table_rows(shard_paths(str(tmp_path), split), ["id", "source", "image"]):
            if row["source"].startswith("sklearn_digits:"):
                assert int(row["source"].split(":")[1]) not in reserved, (split, row["source"])
                assert int(kept_index[row["id"]]) not in reserved, (split, row["id"])  # by id, as the source maps it
                assert row["image"] not in reserved_bytes, (split, row["id"])
    # the demo's split sizes are those of the full digits: holding back 15 per class shrank none
    assert info["rows"]["test"] == 400 and sum(info["counts"]["labeled"]) == 159


def _pixels(settings):
    src = embedded.reserved_digits()
    return torch.from_numpy(clean_pixels(src, settings.image_size)), src


def test_builder_is_deterministic():
    x, src = _pixels(FAST)
    a = train_standin(x, src.labels, src.class_names, FAST)
    b = train_standin(x, src.labels, src.class_names, FAST)
    c = train_standin(x, src.labels, src.class_names, dataclasses.replace(FAST, seed=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_model_pretrained_loads_the_builders_tensors(cache):
    with pytest.raises(MissingWeightsError, match="loft-dist standin"):
        create_clip("loft-tiny-vit", STANDIN)
    with pytest.raises(ConfigError, match="model.name=loft-tiny-vit"):
        create_clip("ViT-B-16", STANDIN)
    state = build_standin_file(FAST, standin_path())  # where `loft-dist standin` caches the default build
    for pretrained in (str(standin_path()), STANDIN):
        loaded = create_clip("loft-tiny-vit", pretrained).state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def zero_shot(weights: str) -> tuple[float, float]:
    """The demo's zero-shot path (ClipClassifier.zero_shot_logits on the clean view): accuracy on its test split,
    and the AUROC of its MSP between that split and 200 OOD images of the generator the demo's pool draws from."""
    from loft_dist.eval.metrics import ood_metrics

    cfg = load_config(TINY, [f"model.pretrained={weights}", "peft.method=none"])
    plan = plan_splits(cfg)
    src, ood = plan.test_source, embedded.ood_source(200, seed=cfg.run.seed + 1, size=8)
    x = torch.from_numpy(clean_pixels(src, cfg.data.image_size, plan.test_idx))
    xo = torch.from_numpy(clean_pixels(ood, cfg.data.image_size))
    clf = build_classifier(cfg.model, cfg.peft, list(src.class_names))
    with torch.no_grad():
        probs, probs_ood = clf.zero_shot_logits(x).softmax(1), clf.zero_shot_logits(xo).softmax(1)
    acc = float((probs.argmax(1).numpy() == np.asarray(src.labels)[plan.test_idx]).mean())
    return acc, ood_metrics(probs.max(1).values.numpy(), probs_ood.max(1).values.numpy())["auroc"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~12 s on 2 idle cores niced; 273 s measured while other jobs held the cores
def test_rebuild_reaches_the_reference_zero_shot_accuracy_and_ranks_ood_below_digits(cache):
    out = cache / "default.safetensors"
    build_standin_file(StandinSettings(), out)
    acc, auroc = zero_shot(str(out))
    assert abs(acc - REFERENCE_ZERO_SHOT) <= TOLERANCE and 0.40 <= acc <= 0.75, acc
    # LoFT-OW's stage-1 filter reads this MSP; fixed wrong captions on the OOD images made it rank them above
    # digits (AUROC 0.26-0.57), captions drawn anew each step below (0.88-0.99)
    assert auroc >= 0.8, auroc
