"""Fixtures of the data tests: small sources in every supported format, and configs pointing at them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from source_files import random_images, save_png, write_cifar10, write_cifar100

SMALL_CLASSES = ["apple", "bear", "cloud", "dolphin", "maple"]  # also in test_prepare.py
SMALL_TRAIN_PER_CLASS, SMALL_TEST_PER_CLASS = 30, 6


def _balanced_labels(rng, classes: int, per_class: int) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(classes), per_class))


@pytest.fixture
def small_cifar100(tmp_path) -> Path:
    """A CIFAR-100-format tree of 5 classes: 30 train and 6 test images per class, in shuffled order."""
    rng = np.random.default_rng(10)
    C = len(SMALL_CLASSES)
    train = _balanced_labels(rng, C, SMALL_TRAIN_PER_CLASS)
    test = _balanced_labels(rng, C, SMALL_TEST_PER_CLASS)
    write_cifar100(tmp_path / "c100", {"train": (random_images(rng, len(train)), train),
                                       "test": (random_images(rng, len(test)), test)}, SMALL_CLASSES)
    return tmp_path / "c100"


@pytest.fixture
def small_cifar10(tmp_path) -> Path:
    """A CIFAR-10-format tree with 5 train batches of 8 images (an OOD source for the CIFAR-100 tests)."""
    rng = np.random.default_rng(11)
    write_cifar10(tmp_path / "c10", {f"data_batch_{k}": (random_images(rng, 8), rng.integers(0, 10, 8).tolist())
                                     for k in range(1, 6)} | {"test_batch": (random_images(rng, 4), [0, 1, 2, 3])})
    return tmp_path / "c10"


@pytest.fixture
def image_tree(tmp_path) -> dict:
    """ImageFolder train/ and test/ trees with a long-tailed train set (40, 25, 10, 3, 1 images),
    test/ holding only some classes, and a flat ood/ directory of 12 images."""
    rng = np.random.default_rng(12)
    sizes = {"ant": 40, "bee": 25, "cat": 10, "dog": 3, "eel": 1}
    for name, n in sizes.items():
        for i in range(n):
            save_png(tmp_path / "train" / name / f"{i:03d}.png", rng)
    for name in ("bee", "ant", "cat", "dog", "eel"):
        for i in range(2):
            save_png(tmp_path / "test" / name / f"t{i}.png", rng)
    for i in range(12):
        save_png(tmp_path / "ood" / f"coco_{i:06d}.png", rng)
    return {"train": tmp_path / "train", "test": tmp_path / "test", "ood": tmp_path / "ood", "sizes": sizes}


@pytest.fixture
def make_config(tmp_path):
    """make_config(root, key=value, ...) → a validated Config writing to tmp_path/root (or to root, a URI).

    Keys are data.* keys; `section__key` names another section (run__seed=1)."""
    from loft_dist.config import load_config

    def make(root: str = "ds", **data):
        root = root if "://" in root else tmp_path / root
        overrides = [f"data.root={root}"] + [f"{k.replace('__', '.') if '__' in k else 'data.' + k}={v}"
                                             for k, v in data.items()]
        return load_config(None, overrides)

    return make
