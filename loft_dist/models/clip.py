"""The open_clip backbone, its text prototypes and the classifier that training and scoring share.

The one door in is `build_classifier(model_cfg, peft_cfg, class_names)`. Nothing here imports Ray or
training code, so a checkpoint can be used for inference anywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loft_dist.errors import ConfigError
from loft_dist.models.standin import resolve_pretrained
from loft_dist.models.weights import (MissingWeightsError, check_hub_source, hub_identifier, load_into,  # noqa: F401
                                      read_state_dict, tag_quick_gelu)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@functools.cache
def _register_configs() -> None:
    """Our model configs join open_clip's registry once per process, on first use (also in Ray workers)."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_model_name(name: str, pretrained: str = "") -> None:
    """A ConfigError unless `name` is an open_clip model or one of MODEL_CONFIG_DIR's, or (hf-hub:, local-dir:, a
    hub-layout model.pretrained dir) brings its own config, found offline. Cheap (no model is built):
    `runtime.preflight` calls it before Ray starts, so that no actor or worker is the first to fail on it."""
    import difflib

    hub = hub_identifier(name, pretrained)
    if hub:
        check_hub_source(hub)
        return
    _register_configs()
    import open_clip

    models = open_clip.list_models()
    if name in models:
        return
    lower = {m.lower(): m for m in models}
    close = [lower[m] for m in difflib.get_close_matches(str(name).lower().replace("/", "-"), list(lower), n=3)]
    hint = f"; did you mean {' or '.join(close)}?" if close else "."
    raise ConfigError(f"model.name={name!r} is neither an open_clip model nor a config in {MODEL_CONFIG_DIR}{hint} "
                      f"Set model.name to one of open_clip.list_models() (e.g. ViT-B-16), hf-hub:ORG/NAME, or add "
                      f"<name>.json there")


def is_weights_file(pretrained: str) -> bool:
    return bool(pretrained) and (pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained) \
        and not Path(pretrained).is_dir()


def check_weights_file(name: str, pretrained: str) -> None:
    pretrained = resolve_pretrained(name, pretrained)
    if is_weights_file(pretrained) and not Path(pretrained).is_file():
        raise MissingWeightsError(
            f"model.pretrained={pretrained!r}: no such file. Place the {name} weights there (a .safetensors, "
            f"a torch state dict, or OpenAI's TorchScript archive such as ViT-B-16.pt), or set model.pretrained to "
            f"the file's path (on a cluster: a path every node sees)")


def create_clip(name: str, pretrained: str = "", force_quick_gelu: bool = False):
    """An open_clip model: random init (pretrained=""), a weights file of any format (models/weights.py), a hub
    identifier or hub-layout dir, a pretrained tag from the cache, or `standin` (the cached CLIP stand-in trained
    here, models/standin.py; not CLIP); offline, never unpickling code."""
    import open_clip

    pretrained = resolve_pretrained(name, pretrained)
    check_model_name(name, pretrained)
    hub = hub_identifier(name, pretrained)
    if hub:
        return open_clip.create_model(hub, force_quick_gelu=force_quick_gelu)
    check_weights_file(name, pretrained)
    if is_weights_file(pretrained):
        state_dict, origin = read_state_dict(pretrained)
        # OpenAI's archive: its weights were trained with QuickGELU, whatever model.name says
        model = open_clip.create_model(name, force_quick_gelu=force_quick_gelu or origin == "openai")
        load_into(model, state_dict, name, pretrained)
        return model
    if not pretrained:
        return open_clip.create_model(name, force_quick_gelu=force_quick_gelu)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ConfigError(f"model.pretrained={pretrained!r} is not a pretrained tag of {name}; tags: "
                          f"{', '.join(tags) or 'none'}")
    try:
        return open_clip.create_model(name, pretrained=pretrained,
                                      force_quick_gelu=force_quick_gelu or tag_quick_gelu(name, pretrained))
    except (RuntimeError, OSError, ValueError) as e:
        raise MissingWeightsError(
            f"model.pretrained={pretrained!r} for {name} is not in the local cache and this machine is offline. "
            f"Download the weights on a connected machine (open_clip.create_model({name!r}, "
            f"pretrained={pretrained!r})), copy the file here and set model.pretrained=/path/to/file") from e


def tokenizer_name(name: str, pretrained: str) -> str:
    """What open_clip's tokenizer is looked up by: the hub identifier when the weights bring their own config."""
    return hub_identifier(name, pretrained) or name


@torch.no_grad()
def text_prototypes(clip, name: str, class_names: list[str], prompt: str) -> torch.Tensor:
    """t_c = normalize(CLIP_text(prompt.format(class_c))), shape (C, embed_dim); `name` as tokenizer_name gives it."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name, context_length=clip.context_length)
    tokens = tokenizer([prompt.format(c.replace("_", " ")) for c in class_names])
    return F.normalize(clip.encode_text(tokens).float(), dim=-1)


class CosineHead(nn.Module):
    """logits = s * <x/||x||, w_c/||w_c||> (SPEC A.0.1), no bias."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).t()


class ClipClassifier(nn.Module):
    """Image tower (frozen, with adapters) + cosine head on the pre-projection CLS feature.

    Keeps CLIP's projection, text prototypes and logit scale as buffers for zero-shot scoring.
    """

    def __init__(self, visual: nn.Module, head: CosineHead, proj: torch.Tensor, text: torch.Tensor,
                 logit_scale: float):
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("zs_proj", proj.detach().clone().float())
        self.register_buffer("zs_text", text.detach().clone().float())
        self.zs_logit_scale = float(logit_scale)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP zero-shot: logit_scale * cos(f proj, t_c)."""
        img = F.normalize(self.features(images) @ self.zs_proj, dim=-1)
        return self.zs_logit_scale * img @ self.zs_text.t()


def build_classifier(model_cfg, peft_cfg, class_names: list[str]) -> ClipClassifier:
    """Backbone → text prototypes → head init w_c = normalize(t_c proj^T) → frozen visual + adapter."""
    from loft_dist.models.adapters import apply_adapter

    # Random-init backbones must be identical in every worker, actor and later process: seed their init.
    with torch.random.fork_rng():
        torch.manual_seed(model_cfg.init_seed)
        clip = create_clip(model_cfg.name, model_cfg.pretrained, model_cfg.force_quick_gelu)
    clip.eval()
    visual = clip.visual
    if getattr(visual, "proj", None) is None:
        raise ConfigError(f"model.name={model_cfg.name!r}: loft_dist needs a ViT image tower with a projection "
                         f"(open_clip ViT models); this model has none")
    text = text_prototypes(clip, tokenizer_name(model_cfg.name, model_cfg.pretrained), class_names, model_cfg.prompt)
    proj = visual.proj.detach().clone().float()
    head = CosineHead(F.normalize(text @ proj.t(), dim=-1), model_cfg.head_scale)
    logit_scale = float(clip.logit_scale.detach().exp())
    visual.proj = None  # the classifier reads ln_post(CLS), before CLIP's projection
    for p in visual.parameters():
        p.requires_grad_(False)
    visual = apply_adapter(visual, peft_cfg, num_classes=len(class_names))
    return ClipClassifier(visual, head, proj, text, logit_scale)


def trainable_summary(model: nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}
