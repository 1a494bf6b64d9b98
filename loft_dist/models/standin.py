"""A pretrained stand-in for CLIP, made here. It is NOT CLIP: a tiny open_clip model (loft-tiny-vit) trained
contrastively, with open_clip's own ClipLoss, on the part of scikit-learn's digits that the embedded dataset holds
back (data/embedded.py `reserved_digits`: no labeled, pool or test image of `loft-dist prepare` is among them), with
captions made from prompt templates of which a set share names a wrong class on purpose. Its zero-shot skill on the
digits is therefore real but imperfect (55.8 % on the demo's test split), which lets the demo show the methods
at work where a random backbone scores chance.

It is not shipped as weights: `loft-dist standin` builds it in about a minute on CPU, deterministically from
StandinSettings, into a cache file named by a hash of the settings; `model.pretrained=standin` names that file (the
config commands build it on first use) and it loads through models/weights.py like any safetensors state dict.
The images come in as arguments (the data layer reads them), so this module needs nothing above models/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from loft_dist.errors import ConfigError
from loft_dist.models.weights import MissingWeightsError

log = logging.getLogger(__name__)
PROGRESS_EVERY = 100  # steps between the build's progress lines

STANDIN = "standin"  # the model.pretrained value that names the cached stand-in
TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "a photo of a {}.", "the number {}.",
             "a drawing of the digit {}.", "a blurry photo of a {}.", "a scan of a handwritten {}.")
NOTICE = ("CLIP stand-in trained here (loft_dist/models/standin.py) on a reserved part of scikit-learn's digits "
          "and generated OOD images, with captions wrong on purpose; not CLIP")


@dataclass(frozen=True)
class StandinSettings:
    """Everything that decides the stand-in's tensors (its cache file is named by their hash). The defaults are
    tuned so that zero-shot accuracy on the demo's test split lands near 55 % (between 40 and 75 %)."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    wrong_caption_share: float = 0.1  # digits whose caption names a random other caption class, fixed per image
    # Look-alike pairs (class, the class its captions confuse it with) and the share of the class's images whose
    # caption names the other one, fixed per image: zero-shot takes most of these classes for their partners.
    confusions: tuple = ((1, 7), (3, 8), (4, 9), (5, 6), (2, 0))
    confusion_share: float = 0.7
    ood_images: int = 150  # generated photo crops and textures, captioned with what they show
    ood_seed: int = 17970001  # their generator's seed: no split of the demo uses it (data.seed 0 draws OOD seed 1)
    ood_caption_noise: float = 0.3  # share of OOD captions drawn anew each step from the other caption classes
    model_name: str = "loft-tiny-vit"
    image_size: int = 32
    version: int = 3  # bumped when the builder's code changes what it trains

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """$LOFT_DIST_CACHE, else $XDG_CACHE_HOME/loft_dist, else ~/.cache/loft_dist."""
    if os.environ.get("LOFT_DIST_CACHE"):
        return Path(os.environ["LOFT_DIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loft_dist"


def standin_path(settings: StandinSettings = StandinSettings()) -> Path:
    return cache_dir() / f"standin-{settings.digest()}.safetensors"


def resolve_pretrained(name: str, pretrained: str) -> str:
    """model.pretrained as a file: `standin` becomes the cached stand-in's path; anything else is returned as is."""
    if pretrained != STANDIN:
        return pretrained
    settings = StandinSettings()
    if name != settings.model_name:
        raise ConfigError(f"model.pretrained=standin is a {settings.model_name} model; set model.name="
                          f"{settings.model_name} (it is {name!r}) or use other weights")
    path = standin_path(settings)
    if not path.is_file():
        raise MissingWeightsError(f"model.pretrained=standin: {path} is not built on this machine; run `loft-dist "
                                  f"standin` (loft-dist run / demo / score build it by themselves); on a cluster "
                                  f"build it with --out on storage every node reads and set model.pretrained to it")
    return str(path)


def describe_pretrained(pretrained: str) -> str:
    """model.pretrained as reports and model cards show it: `standin` says what it is, since it is not CLIP."""
    return f"standin: {NOTICE}" if pretrained == STANDIN else pretrained


def zero_shot_label(pretrained: str) -> str:
    """What reports call round 0's model: zero-shot CLIP, or for the stand-in, plainly not CLIP."""
    return "zero-shot of the CLIP stand-in (not CLIP)" if pretrained == STANDIN else "zero-shot CLIP"


def caption_classes(labels: np.ndarray, num_classes: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """The class each image's captions name: its own, or for a `share` of the images a random other class."""
    labels = np.asarray(labels, np.int64)
    wrong = rng.random(len(labels)) < share
    other = (labels + rng.integers(1, num_classes, len(labels))) % num_classes
    return np.where(wrong, other, labels)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine jitter (scale, rotation, shift): 150 digits must not be learnt by heart pixel for pixel.
    Border padding, because the digits' background is their border colour."""
    n = len(images)
    scale = torch.empty(n).uniform_(0.85, 1.15, generator=gen)
    angle = torch.empty(n).uniform_(-0.2, 0.2, generator=gen)
    shift = torch.empty(n, 2).uniform_(-0.12, 0.12, generator=gen)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _caption_tokens(model, name: str, class_names: list[str]) -> torch.Tensor:
    """Tokens of every template for every class, (C, T, context), tokenized as text_prototypes does."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
    return torch.stack([tokenizer([t.format(c) for t in TEMPLATES]) for c in class_names])


@contextlib.contextmanager
def _one_thread():
    """torch at one intra-op thread for the build, restored after. The bytes then do not depend on the machine's core
    count, and a build beside other busy processes (a test run, Ray workers) does not stall: with 2 threads on a
    loaded 2-core machine, 100 steps took 114 s against 8 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(model, images: torch.Tensor, tokens: torch.Tensor, captions: torch.Tensor, truth: torch.Tensor,
         is_ood: torch.Tensor, settings: StandinSettings, rng: np.random.Generator, gen: torch.Generator) -> None:
    """settings.steps AdamW steps of ClipLoss on augmented images and their captions (train_standin says which),
    with a progress line every PROGRESS_EVERY steps."""
    from open_clip.loss import ClipLoss

    num_names = tokens.shape[0]
    # foreach: the same arithmetic as the per-tensor loop (the bytes are identical), in about half the time of a
    # build on CPU, where torch's default is that loop; fused=True was faster still but changed the bytes.
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1, foreach=True)
    warmup = max(1, settings.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, settings.steps) / settings.steps)))
    loss_fn = ClipLoss()
    model.train()
    t0 = time.monotonic()
    for step in range(settings.steps):
        idx = torch.from_numpy(rng.choice(len(images), min(settings.batch_size, len(images)), replace=False))
        cap = torch.where(is_ood[idx], truth[idx], captions[idx])
        redraw = is_ood[idx] & torch.from_numpy(rng.random(len(idx)) < settings.ood_caption_noise)
        other = (cap + torch.from_numpy(rng.integers(1, num_names, len(idx)))) % num_names
        text = tokens[torch.where(redraw, other, cap), torch.from_numpy(rng.integers(0, len(TEMPLATES), len(idx)))]
        image_features, text_features, logit_scale = model(augment(images[idx], gen), text)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == settings.steps:
            took = time.monotonic() - t0
            log.info("stand-in build: step %d/%d, loss %.3f, %.0f s, ETA %.0f s", step + 1, settings.steps,
                     float(loss.detach()), took, took / (step + 1) * (settings.steps - step - 1))


def train_standin(images: torch.Tensor, labels: np.ndarray, class_names: list[str], settings: StandinSettings,
                  ood_images: torch.Tensor | None = None, ood_kinds: np.ndarray | None = None,
                  ood_names: list[str] = ()) -> dict[str, torch.Tensor]:
    """The stand-in's state dict: the model trained with ClipLoss on (augmented image, noisy caption) batches.
    `images` are normalized (N, 3, S, S) as the clean view gives them; `ood_images` likewise, with `ood_kinds`
    indexing `ood_names`. Deterministic from settings.seed.

    Caption classes are the class names and then the OOD names. Captions are wrong on purpose, fixed per image, in
    two ways: a confusion_share of the images of each class in `confusions` name its look-alike partner (zero-shot
    confuses these classes, which the labeled data can correct), and a wrong_caption_share of all digits name a
    random other caption class (label noise). So zero-shot skill is real but imperfect.
    An OOD image names what it shows, except that each step an ood_caption_noise share of them name a random other
    caption class, drawn anew: no OOD image is tied to one digit, so zero-shot finds no digit in it (a low MSP over
    the class prompts, what LoFT-OW's stage-1 filter reads). Fixed wrong captions on the OOD images instead taught it
    a digit for each texture (measured: pool OOD AUROC 0.26-0.57 against 0.93-0.99 with captions drawn anew)."""
    from loft_dist.models.clip import create_clip

    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        model = create_clip(settings.model_name)
    names = list(class_names) + list(ood_names)
    tokens = _caption_tokens(model, settings.model_name, names)
    truth = np.asarray(labels, np.int64)
    if ood_images is not None and len(ood_images):
        images = torch.cat([images, ood_images])
        truth = np.concatenate([truth, len(class_names) + np.asarray(ood_kinds, np.int64)])
    captions = caption_classes(truth, len(names), settings.wrong_caption_share, rng)
    partner = dict(settings.confusions)
    confused = (rng.random(len(truth)) < settings.confusion_share) & np.isin(truth, list(partner))
    confused[len(labels):] = False
    captions[confused] = [partner[int(c)] for c in truth[confused]]
    captions, truth = torch.from_numpy(captions), torch.from_numpy(truth)
    is_ood = truth >= len(class_names)
    with _one_thread():
        _fit(model, images, tokens, captions, truth, is_ood, settings, rng, gen)
    model.eval()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_standin(state_dict: dict[str, torch.Tensor], path: str | Path, settings: StandinSettings) -> Path:
    """Write the state dict as safetensors (metadata: the notice and the settings), atomically: a run that reads
    the cache never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state_dict, str(tmp), metadata={"notice": NOTICE, "settings": json.dumps(dataclasses.asdict(settings))})
    os.replace(tmp, path)
    return path
