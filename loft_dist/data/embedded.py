"""The embedded default dataset: real handwritten digits (scikit-learn's wheel) as the ID classes,
crops of the two photos scikit-learn ships plus generated textures as the out-of-distribution source."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


class GeneratedOOD:
    """`count` OOD images made on demand: even indices are random crops of scikit-learn's two sample photos,
    odd ones generated textures. Image i depends only on (seed, i), so nothing is held in memory and a
    larger count keeps the images of a smaller one."""

    name = "ood_photos_textures"
    class_names: list = []

    def __init__(self, count: int, seed: int, size: int = 32):
        self.seed, self.size = int(seed), int(size)
        self.labels = np.full(int(count), -1, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range for {len(self)} generated OOD images")
        rng = np.random.default_rng([self.seed, i])
        if i % 2:
            return _texture(rng, self.size)
        photos = _sample_photos()
        photo = photos[i // 2 % len(photos)]
        # Crops of 1-4 output sides, clamped so large outputs (224 px) still fit the 427x640 photos.
        largest = min(4 * self.size, *photo.shape[:2])
        side = int(rng.integers(min(self.size, largest), largest + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(crop)

    def encoded(self, i: int) -> bytes:
        return _png(self.image(int(i)))

    def origin(self, i: int) -> str:
        return f"{self.name}:seed={self.seed}:{i}"


def ood_source(count: int, seed: int, size: int = 32) -> GeneratedOOD:
    """`count` generated OOD images (photo crops and textures) of side `size`, made on demand."""
    return GeneratedOOD(count, seed, size)


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
