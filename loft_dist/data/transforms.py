"""Image decoding and the views of training and scoring (clean / weak / strong / rrc), as Ray Data batch functions.

One place decodes images: training and scoring both call `decode_batch`. A record that cannot be
decoded is not dropped here: its `error` column says why, and the caller quarantines it.

Only the random views import torch and torchvision: the clean view (scoring, evaluation) is PIL + numpy,
so a Ray Data decode task does not pay ~3 s and ~600 MB of torch per worker process for it.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from loft_dist.config import STRONG_AUGS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIEWS = ("clean", "weak", "strong", "rrc")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes → RGB PIL image (grayscale, palette, CMYK, 16-bit and alpha images are converted)."""
    if data is None or len(data) == 0:
        raise ValueError("empty image bytes")
    img = Image.open(io.BytesIO(data))
    img.load()  # forces a full decode so truncated files fail here, not later
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / max(float(arr.max()), 1.0) * 255.0
        img = Image.fromarray(arr.astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert copies even an RGB image


class View:
    """One view of SPEC A.0.4 in two parts: per-image PIL ops (flips, crops, RandAugment) that end at a
    size x size RGB image, then ToTensor + CLIP Normalize (+ Cutout for strong) done on the whole batch at once.

    Per image, ToTensor and Normalize cost 3/4 of a clean 32 px view (170 of 230 us); on a stacked uint8 batch
    they are one vectorised op, with the same float32 results as torchvision's (tests compare them bit for bit).
    """

    def __init__(self, size: int, pil_ops: list | None = None, cutout: bool = False):
        self.size, self.pil_ops = size, pil_ops
        self.cutout = None
        if cutout:  # Cutout of RandAugmentMC: on the normalized image, so erased pixels are 0 = the CLIP mean
            from torchvision import transforms as T

            self.cutout = T.RandomErasing(p=1.0, scale=(0.02, 0.15), value=0)

    def pil(self, img: Image.Image) -> Image.Image:
        if self.pil_ops is not None:
            for op in self.pil_ops:
                img = op(img)
            return img
        s = (self.size, self.size)  # the clean view: torchvision's Resize on PIL is this resize (a copy if equal)
        return img if img.size == s else img.resize(s, Image.Resampling.BICUBIC)

    def pixels(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images → the view's uint8 (N, S, S, 3) pixels, before normalization."""
        return np.stack([np.asarray(self.pil(img), dtype=np.uint8) for img in images])

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        x = normalize(pixels)
        if self.cutout is not None:
            import torch

            for i in range(len(x)):
                x[i] = self.cutout(torch.from_numpy(x[i])).numpy()
        return x

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images → float32 (N, 3, S, S), normalized."""
        return self.normalize(self.pixels(images))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.batch([img])[0]


_MEAN, _STD = np.float32(CLIP_MEAN), np.float32(CLIP_STD)  # broadcast over the channels-last batch


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) → float32 (N, 3, S, S): torchvision's ToTensor + Normalize(CLIP mean, std)."""
    x = pixels.astype(np.float32)
    x /= 255
    x -= _MEAN
    x /= _STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def normalize_tensor(pixels):
    """`normalize` on a torch uint8 (N, S, S, 3) tensor, on its device: the same float32 values, channels-last in
    memory. A scorer copies the 4x smaller uint8 batch to the GPU and normalises it there (numpy's normalise of a
    224 px batch of 256 costs more than ViT-B/16's bf16 forward on an H200)."""
    import torch

    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device)
    x = pixels.to(torch.float32)
    x /= 255
    x -= mean
    x /= std
    return x.permute(0, 3, 1, 2)


def clean_pixels(source, size: int, indices=None) -> np.ndarray:
    """Images of an in-memory source (`encoded(i)`), decoded and resized by the clean view that every evaluated image
    goes through: (N, 3, size, size) normalized float32, for `indices` (default: all)."""
    view = build_view("clean", size, hflip=False)
    idx = range(len(source)) if indices is None else indices
    return view.batch([decode_image(source.encoded(int(i))) for i in idx])


def build_view(view: str, size: int, hflip: bool, strong_aug: str = "randaugment_mc") -> View:
    """The view pipelines of SPEC A.0.4 (FixMatch weak/strong, RandomResizedCrop for labeled data). The strong view
    is weak + FixMatch's RandAugmentMC(2, 10) with its Cutout (data.strong_aug=randaugment_mc), or weak +
    torchvision's RandAugment(2, 10) + RandomErasing on the normalized image (torchvision)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; one of {VIEWS}")
    if view == "clean":
        return View(size)
    from torchvision import transforms as T

    flip = [T.RandomHorizontalFlip()] if hflip else []
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)
    weak = [*flip, resize, T.RandomCrop(size, padding=int(0.125 * size), padding_mode="reflect")]
    if view == "weak":
        return View(size, weak)
    if view == "strong" and strong_aug == "randaugment_mc":
        from loft_dist.data.randaugment import RandAugmentMC

        return View(size, [*weak, RandAugmentMC(n=2, m=10)])
    if view == "strong":
        if strong_aug != "torchvision":
            raise ValueError(f"unknown strong_aug {strong_aug!r}; one of {STRONG_AUGS}")
        return View(size, [*weak, T.RandAugment(num_ops=2, magnitude=10)], cutout=True)
    return View(size, [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), *flip])


def decode_all(images) -> tuple[dict[int, Image.Image], list[str]]:
    """({row: image} for the rows that decode, per-row reason: "" for good rows, the error for bad ones)."""
    decoded: dict[int, Image.Image] = {}
    errors = []
    for i, data in enumerate(images):
        try:
            decoded[i] = decode_image(data)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad record, reported by reason
            # Without object addresses ("<_io.BytesIO object at 0x7f…>"), equal failures read equal and group.
            errors.append(_ADDRESS.sub("", f"{type(e).__name__}: {e}")[:200])
            continue
        errors.append("")
    return decoded, errors


class Decoder:
    """Batch function for `map_batches`: replaces the `image` bytes column by float32 (N, 3, S, S) views.

    `labeled_view` (if set) is used for rows with label >= 0, `view` for the others. The output has an
    `error` column: "" for good rows, the reason for rows that failed to decode (their image is zeros).
    With `normalized=False` the column holds the views' uint8 (N, S, S, 3) pixels instead, a quarter of the
    bytes through Ray's object store; the consumer applies `normalize` (views without Cutout only).
    """

    def __init__(self, view: str, image_size: int, hflip: bool = False, labeled_view: str | None = None,
                 normalized: bool = True, strong_aug: str = "randaugment_mc"):
        self.size, self.normalized = image_size, normalized
        self.view = build_view(view, image_size, hflip, strong_aug)
        self.labeled_view = build_view(labeled_view, image_size, hflip, strong_aug) if labeled_view else None
        if not normalized and any(v is not None and v.cutout is not None for v in (self.view, self.labeled_view)):
            raise ValueError("the strong view's Cutout works on normalized images: decode it with normalized=True")

    def __call__(self, batch: dict) -> dict:
        images = batch.pop("image")
        labels = batch.get("label")
        s = self.size
        out = np.zeros((len(images), 3, s, s), np.float32) if self.normalized else np.zeros((len(images), s, s, 3),
                                                                                            np.uint8)
        decoded, errors = decode_all(images)
        labeled = {i for i in decoded if self.labeled_view is not None and labels is not None and labels[i] >= 0}
        for view, rows in ((self.labeled_view, sorted(labeled)), (self.view, sorted(set(decoded) - labeled))):
            if rows:
                imgs = [decoded[i] for i in rows]
                out[rows] = view.batch(imgs) if self.normalized else view.pixels(imgs)
        batch["image"] = out
        batch["error"] = np.asarray(errors, dtype=object)
        return batch


def decode_batch(batch: dict, view: str, image_size: int, hflip: bool = False, labeled_view: str | None = None,
                 normalized: bool = True, strong_aug: str = "randaugment_mc") -> dict:
    """Function form of `Decoder` for Ray Data task stages (building the transforms per batch is cheap)."""
    return Decoder(view, image_size, hflip, labeled_view, normalized, strong_aug)(batch)
