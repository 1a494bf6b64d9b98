"""FixMatch's RandAugmentMC (Sohn et al. 2020; the strong view of SPEC A.0.4: n = 2, m = 10, its op pool, Cutout).

Per image: n ops drawn with replacement from the pool of 14; each is applied with probability 1/2 at a magnitude v
drawn uniformly from 1..m-1 (FixMatch draws `randint(1, m)`, whose upper bound is exclusive), mapped onto the op's
range as v / 10 * max + bias; the signed ops (rotate, shear, translate) flip their sign with probability 1/2.
Cutout then always greys out a square (fill 127) of half the image side centred at a uniform random point and
clipped at the border: FixMatch's 16 px on its 32 px images. The randomness is Python's `random` and numpy's global
generators, as in FixMatch, so a worker's seeds decide it.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

PARAMETER_MAX = 10
CUTOUT_SHARE = 0.5  # of the image side
GREY = (127, 127, 127)


def _float(v: int, max_v: float) -> float:
    return float(v) * max_v / PARAMETER_MAX


def _int(v: int, max_v: float) -> int:
    return int(v * max_v / PARAMETER_MAX)


def _signed(v):
    return -v if random.random() < 0.5 else v


def auto_contrast(img, v, max_v, bias):
    return ImageOps.autocontrast(img)


def brightness(img, v, max_v, bias):
    return ImageEnhance.Brightness(img).enhance(_float(v, max_v) + bias)


def color(img, v, max_v, bias):
    return ImageEnhance.Color(img).enhance(_float(v, max_v) + bias)


def contrast(img, v, max_v, bias):
    return ImageEnhance.Contrast(img).enhance(_float(v, max_v) + bias)


def equalize(img, v, max_v, bias):
    return ImageOps.equalize(img)


def identity(img, v, max_v, bias):
    return img


def posterize(img, v, max_v, bias):
    return ImageOps.posterize(img, _int(v, max_v) + bias)


def rotate(img, v, max_v, bias):
    return img.rotate(_signed(_int(v, max_v) + bias))


def sharpness(img, v, max_v, bias):
    return ImageEnhance.Sharpness(img).enhance(_float(v, max_v) + bias)


def shear_x(img, v, max_v, bias):
    return img.transform(img.size, Image.AFFINE, (1, _signed(_float(v, max_v) + bias), 0, 0, 1, 0))


def shear_y(img, v, max_v, bias):
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, _signed(_float(v, max_v) + bias), 1, 0))


def solarize(img, v, max_v, bias):
    return ImageOps.solarize(img, 256 - (_int(v, max_v) + bias))


def translate_x(img, v, max_v, bias):
    shift = int(_signed(_float(v, max_v) + bias) * img.size[0])
    return img.transform(img.size, Image.AFFINE, (1, 0, shift, 0, 1, 0))


def translate_y(img, v, max_v, bias):
    shift = int(_signed(_float(v, max_v) + bias) * img.size[1])
    return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, shift))


# (op, max, bias): FixMatch's fixmatch_augment_pool
POOL = (
    (auto_contrast, None, None),
    (brightness, 0.9, 0.05),
    (color, 0.9, 0.05),
    (contrast, 0.9, 0.05),
    (equalize, None, None),
    (identity, None, None),
    (posterize, 4, 4),
    (rotate, 30, 0),
    (sharpness, 0.9, 0.05),
    (shear_x, 0.3, 0),
    (shear_y, 0.3, 0),
    (solarize, 256, 0),
    (translate_x, 0.3, 0),
    (translate_y, 0.3, 0),
)


def cutout(img: Image.Image, side: int) -> Image.Image:
    """A grey side x side square centred at a uniform random point, clipped at the border (FixMatch's CutoutAbs)."""
    w, h = img.size
    x0, y0 = np.random.uniform(0, w), np.random.uniform(0, h)
    x0, y0 = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
    x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), GREY)
    return img


class RandAugmentMC:
    def __init__(self, n: int = 2, m: int = 10):
        if n < 1 or not 1 <= m <= PARAMETER_MAX:
            raise ValueError(f"RandAugmentMC needs n >= 1 and 1 <= m <= {PARAMETER_MAX}, got n={n}, m={m}")
        self.n, self.m = n, m

    def __call__(self, img: Image.Image) -> Image.Image:
        for op, max_v, bias in random.choices(POOL, k=self.n):
            v = np.random.randint(1, self.m)
            if random.random() < 0.5:
                img = op(img, v, max_v, bias)
        return cutout(img, int(min(img.size) * CUTOUT_SHARE))
