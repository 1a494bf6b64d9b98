"""Small sources in the real formats, for fixtures: CIFAR python pickles written the way the official
(Python 2) files were, and PNG files for ImageFolder trees and manifests."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes bytes as Python 2 strings, as the official files do.

    Python 3 writes bytes under protocol 2 as a call to `_codecs.encode`, a global the
    restricted reader rightly refuses; the real files use (SHORT_)BINSTRING opcodes and
    name `numpy.core.multiarray._reconstruct`.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_py2_pickle(path: Path, obj) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    Path(path).write_bytes(buf.getvalue())


def random_images(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def to_cifar_rows(hwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) → the files' (N, 3072) channel-major rows."""
    return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(len(hwc), 3072))


def write_cifar10(root: Path, batches: dict[str, tuple[np.ndarray, list[int]]], names=CIFAR10_NAMES) -> Path:
    """root/cifar-10-batches-py with batches.meta and the given {file name: (images, labels)}."""
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    write_py2_pickle(base / "batches.meta", {b"num_cases_per_batch": 3, b"num_vis": 3072,
                                             b"label_names": [n.encode() for n in names]})
    for name, (images, labels) in batches.items():
        write_py2_pickle(base / name, {b"batch_label": f"{name} of 5".encode(), b"labels": [int(x) for x in labels],
                                       b"data": to_cifar_rows(images)})
    return base


def write_cifar100(root: Path, splits: dict[str, tuple[np.ndarray, list[int]]], names: list[str]) -> Path:
    """root/cifar-100-python with meta and the given {"train"|"test": (images, fine labels)}."""
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    write_py2_pickle(base / "meta", {b"fine_label_names": [n.encode() for n in names],
                                     b"coarse_label_names": [b"c"] * 20})
    for name, (images, labels) in splits.items():
        n = len(labels)
        write_py2_pickle(base / name, {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": [int(x) for x in labels],
            b"coarse_labels": [0] * n,
            b"data": to_cifar_rows(images),
        })
    return base


def save_png(path: Path, rng, size: int = 8) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path.read_bytes()
