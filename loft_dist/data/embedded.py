"""The embedded default dataset: real handwritten digits (scikit-learn's wheel) as the ID classes,
crops of the two photos scikit-learn ships plus generated textures as the out-of-distribution source."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ArraySource:
    """Images held as a uint8 array, encoded on demand; the same interface as the file-backed sources."""

    name: str
    images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8
    labels: np.ndarray
    class_names: list
    fmt: str = "png"

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> bytes:
        return (_jpeg if self.fmt == "jpeg" else _png)(self.images[i])

    def origin(self, i: int) -> str:
        return f"{self.name}:{i}"


def digits_source() -> ArraySource:
    """1,797 real 8×8 grayscale digits, stored at their native size (decode resizes to the model's input)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    return ArraySource("sklearn_digits", images, d.target.astype(np.int64), list(DIGIT_NAMES))


def ood_source(count: int, seed: int, size: int = 32) -> ArraySource:
    """`count` OOD images: half random crops of scikit-learn's two sample photos, half generated textures."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = []
    for k in range(count):
        if k % 2 == 0:
            photo = photos[k // 2 % len(photos)]
            side = int(rng.integers(size, 4 * size))
            y = int(rng.integers(0, photo.shape[0] - side))
            x = int(rng.integers(0, photo.shape[1] - side))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            out.append(np.asarray(crop))
        else:
            out.append(_texture(rng, size))
    images = np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
    return ArraySource("ood_photos_textures", images, np.full(count, -1, np.int64), [])


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:  # oriented stripes
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 1.2)
        base = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(2, 8))
        base = ((xx // cell + yy // cell) % 2) * 2 - 1
    else:  # smooth noise
        small = rng.normal(size=(4, 4)).astype(np.float32)
        base = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
        base = base / (np.abs(base).max() + 1e-6)
    color = rng.uniform(0, 1, size=3)
    rgb = (0.5 + 0.5 * base[..., None]) * color[None, None, :] * 255
    return np.clip(rgb, 0, 255).astype(np.uint8)
