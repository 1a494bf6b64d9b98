"""FixMatch's RandAugmentMC, the strong view of SPEC A.0.4: its op pool and magnitudes, the 1/2 application
probability, and the Cutout every strong image gets."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from loft_dist.data import randaugment as ra
from loft_dist.data.transforms import build_view


def _image(size=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_the_pool_is_fixmatchs_fourteen_ops_with_their_ranges():
    names = [op.__name__ for op, _, _ in ra.POOL]
    assert names == ["auto_contrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
                     "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y"]
    ranges = {op.__name__: (m, b) for op, m, b in ra.POOL}
    assert ranges["brightness"] == (0.9, 0.05) and ranges["posterize"] == (4, 4) and ranges["rotate"] == (30, 0)
    assert ranges["solarize"] == (256, 0) and ranges["shear_x"] == (0.3, 0) and ranges["translate_y"] == (0.3, 0)


def test_magnitudes_map_as_fixmatch_maps_them():
    img = _image()
    # posterize: int(v * 4 / 10) + 4 bits; v = 9 → 7 bits
    assert np.array_equal(np.asarray(ra.posterize(img, 9, 4, 4)), np.asarray(img) & 0b11111110)
    # solarize: threshold 256 - int(v * 256 / 10); v = 5 → 128
    want = np.where(np.asarray(img) >= 128, 255 - np.asarray(img), np.asarray(img))
    assert np.array_equal(np.asarray(ra.solarize(img, 5, 256, 0)), want)
    # brightness: enhance(v * 0.9 / 10 + 0.05); v = 5 → 0.5
    from PIL import ImageEnhance

    assert np.array_equal(np.asarray(ra.brightness(img, 5, 0.9, 0.05)),
                          np.asarray(ImageEnhance.Brightness(img).enhance(0.5)))
    # translate_x: v * 0.3 / 10 of the width, either way: v = 10 → 9 of 32 px
    random.seed(0)
    moved = np.asarray(ra.translate_x(img, 10, 0.3, 0))
    src = np.asarray(img)
    assert np.array_equal(moved[:, :23], src[:, 9:]) or np.array_equal(moved[:, 9:], src[:, :23])


def test_each_of_n_ops_applies_with_probability_half_at_a_magnitude_in_1_to_m_minus_1(monkeypatch):
    calls = []

    def record(img, v, max_v, bias):
        calls.append(v)
        return img

    monkeypatch.setattr(ra, "POOL", tuple((record, m, b) for _, m, b in ra.POOL))
    random.seed(1)
    np.random.seed(1)
    aug = ra.RandAugmentMC(n=2, m=10)
    draws = 2000
    for _ in range(draws):
        aug(_image(8))
    assert abs(len(calls) / (2 * draws) - 0.5) < 0.03  # each of the 2 ops applies half the time
    assert set(calls) == set(range(1, 10))  # randint(1, m): 1..m-1, as FixMatch draws it


def test_every_strong_image_gets_a_grey_cutout_of_half_the_side():
    random.seed(2)
    np.random.seed(2)
    aug = ra.RandAugmentMC(n=2, m=10)
    for k in range(50):
        img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))  # black: only the cutout is grey
        # Cutout comes last, so its square is grey whatever the ops did (none of them makes grey of black)
        out = np.asarray(aug(img)) if k % 2 else np.asarray(ra.cutout(img, 16))
        grey = (out == 127).all(axis=-1)
        rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
        # a square of side 16 (PIL's rectangle includes its far edge), clipped at the border to at least 8 x 8
        assert 8 <= len(rows) <= 17 and 8 <= len(cols) <= 17 and grey[rows][:, cols].all() and grey.sum() == \
            len(rows) * len(cols)


def test_the_strong_view_is_randaugment_mc_by_default_and_torchvisions_on_request():
    strong = build_view("strong", 32, hflip=False)
    assert any(isinstance(op, ra.RandAugmentMC) for op in strong.pil_ops) and strong.cutout is None
    tv = build_view("strong", 32, hflip=False, strong_aug="torchvision")
    assert not any(isinstance(op, ra.RandAugmentMC) for op in tv.pil_ops) and tv.cutout is not None
    x = strong.batch([_image(), _image(seed=1)])
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32
    with pytest.raises(ValueError, match="RandAugmentMC needs n >= 1"):
        ra.RandAugmentMC(n=0)
