"""The views convert and normalize whole batches at once: the results must be those of torchvision's per-image
ToTensor + Normalize, bit for bit, for deterministic and (same seed) random views alike."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from loft_dist.data.transforms import CLIP_MEAN, CLIP_STD, Decoder, build_view, normalize, normalize_tensor

SIZE = 32


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


def _per_image(view: str, imgs, hflip: bool) -> torch.Tensor:
    """torchvision's own composition of the view, one image at a time."""
    pil = build_view(view, SIZE, hflip).pil_ops or [T.Resize((SIZE, SIZE), interpolation=T.InterpolationMode.BICUBIC)]
    tf = T.Compose([*pil, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    return torch.stack([tf(img) for img in imgs])


@pytest.mark.parametrize("view", ["clean", "weak", "rrc"])
def test_batched_view_equals_torchvision_per_image(view):
    imgs = _images(9)
    torch.manual_seed(3)
    got = build_view(view, SIZE, hflip=True).batch(imgs)
    torch.manual_seed(3)  # the random PIL ops draw in the same order, so random views match too
    want = _per_image(view, imgs, hflip=True)
    assert got.shape == (9, 3, SIZE, SIZE) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, want.numpy())


def test_torchvision_strong_view_cuts_out_one_mean_coloured_patch_per_image():
    torch.manual_seed(0)
    x = torch.from_numpy(build_view("strong", SIZE, hflip=True, strong_aug="torchvision").batch(_images(16)))
    # A normalized 8-bit pixel is never exactly 0 (the CLIP mean is not a multiple of 1/255): zeros are the patch.
    zero = (x == 0).all(dim=1).flatten(1).float().mean(1)
    assert ((zero >= 0.01) & (zero <= 0.16)).all(), zero  # RandomErasing scale (0.02, 0.15), rounded to pixels
    assert not torch.equal(x[0], x[1])


def test_clean_view_decodes_without_torch():
    """Ray Data's scoring decode tasks run the clean view: importing torch there costs each worker process ~3 s."""
    code = ("import sys; from loft_dist.data.transforms import Decoder; import numpy as np; "
            "from PIL import Image; import io; b = io.BytesIO(); Image.new('RGB', (40, 30)).save(b, 'PNG'); "
            "out = Decoder('clean', 32)({'image': np.array([b.getvalue()], dtype=object)}); "
            "assert out['image'].shape == (1, 3, 32, 32); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_decoder_gives_labeled_rows_their_own_view():
    imgs = _images(6, seed=1)
    data = []
    for img in imgs:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data.append(buf.getvalue())
    labels = np.array([0, -1, 3, -1, -1, 1])
    out = Decoder("strong", SIZE, hflip=True, labeled_view="clean")(
        {"image": np.array(data, dtype=object), "label": labels})
    clean = _per_image("clean", imgs, hflip=False).numpy()
    is_labeled = labels >= 0
    assert np.array_equal(out["image"][is_labeled], clean[is_labeled])
    assert not np.isclose(out["image"][~is_labeled], clean[~is_labeled]).all(axis=(1, 2, 3)).any()
    assert list(out["error"]) == [""] * 6


def test_normalize_tensor_is_normalize_bit_for_bit():
    """The scorer normalises uint8 batches on its device with torch; the values must be the numpy normalise's."""
    pixels = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    got = normalize_tensor(torch.from_numpy(pixels))
    assert got.shape == (5, 3, SIZE, SIZE) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(normalize(pixels)))
