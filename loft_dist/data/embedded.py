"""The embedded default dataset: real handwritten digits (scikit-learn's wheel) as the ID classes,
crops of the two photos scikit-learn ships plus generated textures as the out-of-distribution source.

RESERVED_PER_CLASS digits of each class (a fixed, seeded draw) are held back from `digits_source`, so no split
`loft-dist prepare` writes ever holds them: they are the pretraining data of the CLIP stand-in
(loft_dist/models/standin.py, `loft-dist standin`), which is trained here and is not CLIP.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# 15 per class: the demo's protocol (n1=40, m1=80, 40 test per class) needs 160 of class 0's 178 images, so
# at most 18 per class can be held back without shrinking its splits.
RESERVED_PER_CLASS = 15
RESERVED_SEED = 1797


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
    index: Optional[np.ndarray] = None  # each image's index in the original collection (origin names it); None = i

    def __len__(self) -> int:
        return len(self.labels)

    def encoded(self, i: int) -> bytes:
        return (_jpeg if self.fmt == "jpeg" else _png)(self.images[i])

    def origin(self, i: int) -> str:
        return f"{self.name}:{i if self.index is None else int(self.index[i])}"


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple:
    """scikit-learn's 1,797 8×8 digits as uint8 images (0..16 scaled to 0..255) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def reserved_digit_indices() -> np.ndarray:
    """The sorted indices (into scikit-learn's digits) held back for the stand-in's pretraining: RESERVED_PER_CLASS
    of each class, drawn with RESERVED_SEED; the same on every machine."""
    labels = _all_digits()[1]
    rng = np.random.default_rng(RESERVED_SEED)
    picks = [rng.choice(np.flatnonzero(labels == c), RESERVED_PER_CLASS, replace=False)
             for c in range(len(DIGIT_NAMES))]
    return np.sort(np.concatenate(picks))


def _digits_subset(name: str, keep: np.ndarray) -> ArraySource:
    images, labels = _all_digits()
    return ArraySource(name, images[keep], labels[keep], list(DIGIT_NAMES), index=keep)


def digits_source() -> ArraySource:
    """The real 8×8 grayscale digits less the reserved ones (1,647 of 1,797), stored at their native size (decode
    resizes to the model's input); origin names each image's index in scikit-learn's digits."""
    keep = np.setdiff1d(np.arange(len(_all_digits()[1])), reserved_digit_indices())
    return _digits_subset("sklearn_digits", keep)


def reserved_digits() -> ArraySource:
    """The held-back digits (reserved_digit_indices): only the stand-in builder reads them."""
    return _digits_subset("sklearn_digits_reserved", reserved_digit_indices())


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
        photo = _sample_photos()[self._photo(i)]
        # Crops of 1-4 output sides, clamped so large outputs (224 px) still fit the 427x640 photos.
        largest = min(4 * self.size, *photo.shape[:2])
        side = int(rng.integers(min(self.size, largest), largest + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((self.size, self.size), Image.BILINEAR)
        return np.asarray(crop)

    @staticmethod
    def _photo(i: int) -> int:
        """Which sample photo even image i is cropped from."""
        return i // 2 % len(_sample_photos())

    def encoded(self, i: int) -> bytes:
        return _png(self.image(int(i)))

    def kind(self, i: int) -> int:
        """What image i shows, as an index into OOD_KINDS: which photo it was cropped from, or its texture's
        pattern (the stand-in's captions name it)."""
        if i % 2 == 0:
            return self._photo(i)  # load_sample_images' order: china.jpg (a temple), flower.jpg
        return 2 + _texture_kind(np.random.default_rng([self.seed, i]))

    def origin(self, i: int) -> str:
        return f"{self.name}:seed={self.seed}:{i}"


def ood_source(count: int, seed: int, size: int = 32) -> GeneratedOOD:
    """`count` generated OOD images (photo crops and textures) of side `size`, made on demand."""
    return GeneratedOOD(count, seed, size)


# What a GeneratedOOD image shows (GeneratedOOD.kind): the two photos, then the three texture patterns of _texture.
OOD_KINDS = ["temple", "flower", "striped pattern", "checkerboard", "color blob"]


def _texture_kind(rng: np.random.Generator) -> int:
    """The texture's pattern: the first draw of the image's generator (_texture draws it the same way)."""
    return int(rng.integers(0, 3))


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = _texture_kind(rng)
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
