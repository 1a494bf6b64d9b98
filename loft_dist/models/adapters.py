"""Parameter-efficient adapters on the image tower, behind one `apply_adapter(visual, peft_cfg)`, and their files.

Methods (`peft.method`): lora (peft's LoRA), ln (peft's LN tuning of the block LayerNorms), adaptformer,
vpt (deep), bitfit (block biases), full (every tower weight), none (frozen tower: linear probing). `peft.layers`
picks the blocks (None = all).

Files under <checkpoint>/adapter/: the adapters peft has (lora, ln) keep peft's own format
(adapter_model.safetensors + adapter_config.json, loadable with peft's PeftModel.from_pretrained on the open_clip
tower); the others store their trainable tensors (full: the whole tower state) under their
`visual.state_dict()` names in adapter_model.safetensors, with our adapter_config.json (format "loft_dist",
method + hyperparameters; docs/weights.md). `none` writes no adapter directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from loft_dist.errors import ConfigError, WeightsError

ADAPTER_DIR = "adapter"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
METHODS = ("lora", "adaptformer", "vpt", "bitfit", "ln", "full", "none")
FORMAT = "loft_dist"
PEFT_METHODS = {"LORA": "lora", "LN_TUNING": "ln"}  # peft_type in peft's adapter_config.json -> peft.method


@dataclass
class AdapterSpec:
    """What `apply_adapter` did to a tower: the method, its resolved hyperparameters, its own parameter names."""

    method: str
    hparams: dict = field(default_factory=dict)
    names: tuple = ()  # state-dict names of the adapter's tensors (non-peft methods; full: every tensor)


def apply_adapter(visual: nn.Module, peft_cfg, num_classes: Optional[int] = None) -> nn.Module:
    """Freeze the image tower and add the configured adapter; only adapter parameters require grad.

    `num_classes` is needed only by the automatic bottleneck (`peft.r: 0`, lora and adaptformer).
    Returns the tower to use (a PeftModel for lora, the same module otherwise); `adapter_spec` describes it.
    """
    if peft_cfg.method not in METHODS:
        raise ConfigError(f"peft.method={peft_cfg.method!r} is not supported; one of: {', '.join(METHODS)}")
    visual.requires_grad_(False)
    blocks = visual.transformer.resblocks
    layers = _resolve_layers(peft_cfg.layers, len(blocks))
    # Workers seed their RNG by rank before building; the adapter init (AdaptFormer down_proj, LoRA A,
    # VPT prompts) must not depend on it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(peft_cfg.init_seed)
        return _apply(visual, peft_cfg, num_classes, blocks, layers)


def _apply(visual: nn.Module, peft_cfg, num_classes: Optional[int], blocks: nn.ModuleList,
           layers: list[int]) -> nn.Module:
    method = peft_cfg.method

    if method == "ln":
        from peft import LNTuningConfig, get_peft_model

        # Every LayerNorm inside the chosen blocks, by its full name (peft matches a list entry exactly).
        targets = [f"transformer.resblocks.{i}.{m}" for i in layers
                   for m, mod in blocks[i].named_modules() if isinstance(mod, nn.LayerNorm)]
        visual = get_peft_model(visual, LNTuningConfig(target_modules=targets))
        visual.loft_adapter = AdapterSpec("ln", {"target_modules": sorted(targets)})
        return visual

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        r = _bottleneck(peft_cfg, num_classes, len(blocks))
        partial = layers != list(range(len(blocks)))
        config = LoraConfig(r=r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                            target_modules=list(peft_cfg.target_modules), bias="none",
                            layers_to_transform=layers if partial else None,
                            layers_pattern="resblocks" if partial else None)
        visual = get_peft_model(visual, config)
        visual.loft_adapter = AdapterSpec("lora", {"r": r, "layers": layers})
        return visual

    hparams: dict = {"layers": layers}
    if method == "adaptformer":
        from loft_dist.models.adaptformer import add_adaptformer

        r = _bottleneck(peft_cfg, num_classes, len(blocks))
        for i in layers:
            add_adaptformer(blocks[i], r)
        hparams["r"] = r
        names = [n for n, _ in visual.named_parameters() if ".adaptformer." in n]
    elif method == "vpt":
        from loft_dist.models.vpt import add_deep_prompts

        add_deep_prompts(visual, peft_cfg.vpt_tokens, layers)
        hparams["vpt_tokens"] = peft_cfg.vpt_tokens
        names = ["transformer.vpt_prompts"]
    elif method == "bitfit":
        # LIFT's bias tuning: every bias inside the blocks, LayerNorm biases included.
        names = [f"transformer.resblocks.{i}.{n}" for i in layers
                 for n, _ in blocks[i].named_parameters() if n.endswith("bias")]
    elif method == "full":
        hparams = {}
        names = list(visual.state_dict())
    else:  # none
        hparams, names = {}, []

    params = dict(visual.named_parameters())
    for n in names:
        if n in params:
            params[n].requires_grad_(True)
    visual.loft_adapter = AdapterSpec(method, hparams, tuple(names))
    return visual


def adapter_spec(visual: nn.Module) -> AdapterSpec:
    spec = getattr(visual, "loft_adapter", None)
    if spec is None:
        raise ValueError("this image tower did not go through apply_adapter; build it with build_classifier")
    return spec


def adapter_state(visual: nn.Module) -> dict | None:
    """The tensors a checkpoint stores for the tower's adapter (lora, ln: peft's state dict), or None for `none`."""
    spec = adapter_spec(visual)
    if spec.method == "none":
        return None
    if spec.method in PEFT_METHODS.values():
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(visual)
    state = visual.state_dict()
    return {n: state[n] for n in spec.names}


def save_adapter(visual: nn.Module, directory: str | Path) -> None:
    """Write <directory>/adapter/ for the tower's adapter (nothing for `none`)."""
    spec = adapter_spec(visual)
    if spec.method == "none":
        return
    d = Path(directory) / ADAPTER_DIR
    if spec.method in PEFT_METHODS.values():
        visual.save_pretrained(str(d))
        return
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in adapter_state(visual).items()}, str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "method": spec.method, **spec.hparams}, indent=2))


def load_adapter(visual: nn.Module, directory: str | Path) -> None:
    """Load <directory>/adapter/ into a tower built with the same peft config; raise on any mismatch."""
    spec = adapter_spec(visual)
    d = Path(directory) / ADAPTER_DIR
    saved = _saved_config(d)
    saved_method = saved.get("method", "none")
    if saved_method != spec.method:
        raise WeightsError(f"checkpoint {directory} holds a {saved_method!r} adapter but peft.method={spec.method!r}: "
                           f"it was trained with another method; use it with the algorithm.name and peft.method it was "
                           f"trained with (algorithm.name=lp implies peft.method=none, fft full)")
    if spec.method == "none":
        return
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{weights} not found; the checkpoint's adapter directory is incomplete")
    tensors = load_file(str(weights))

    if spec.method in PEFT_METHODS.values():
        from peft import set_peft_model_state_dict

        if spec.method == "lora" and saved.get("r") != spec.hparams["r"]:
            raise WeightsError(f"{d}: LoRA rank {saved.get('r')} in the checkpoint, {spec.hparams['r']} in peft.r")
        if spec.method == "ln" and saved.get("target_modules") != spec.hparams["target_modules"]:
            raise WeightsError(f"{d}: LN tuning of {saved.get('target_modules')} in the checkpoint, of "
                               f"{spec.hparams['target_modules']} by peft.layers; set peft.layers to the blocks it "
                               f"was trained with")
        result = set_peft_model_state_dict(visual, tensors)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise WeightsError(f"{weights} does not match peft config (unexpected keys: {unexpected[:3]}...)")
        return

    differ = {k: (saved.get(k), v) for k, v in spec.hparams.items() if saved.get(k) != v}
    if differ:
        raise WeightsError(f"{d}: adapter hyperparameters differ (checkpoint, config): {differ}")
    missing, unexpected = set(spec.names) - set(tensors), set(tensors) - set(spec.names)
    if missing or unexpected:
        raise WeightsError(f"{weights} does not match the {spec.method} adapter (missing: {sorted(missing)[:3]}, "
                         f"unexpected: {sorted(unexpected)[:3]})")
    visual.load_state_dict(tensors, strict=spec.method == "full")


def _saved_config(d: Path) -> dict:
    """Our adapter_config.json as is; peft's is read as its method (lora, ln); no directory means `none`."""
    path = d / CONFIG_FILE
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    if config.get("format") == FORMAT:
        return config
    method = PEFT_METHODS.get(str(config.get("peft_type", "")).upper())
    if method == "lora":
        return {"method": "lora", "r": config.get("r")}
    if method == "ln":
        return {"method": "ln", "target_modules": sorted(config.get("target_modules") or [])}
    raise WeightsError(f"{path} is neither a loft_dist adapter config nor one of peft's "
                       f"{' / '.join(PEFT_METHODS)} adapters (peft_type {config.get('peft_type')!r})")


def _resolve_layers(layers, n_blocks: int) -> list[int]:
    if layers is None:
        return list(range(n_blocks))
    if len(layers) == 0:
        raise ConfigError("peft.layers=[] selects no block; use null for every block")
    bad = [i for i in layers if not 0 <= int(i) < n_blocks]
    if bad:
        raise ConfigError(f"peft.layers={list(layers)} names blocks {bad} but the image tower has {n_blocks} "
                         f"(0..{n_blocks - 1})")
    return sorted({int(i) for i in layers})


def _bottleneck(peft_cfg, num_classes: Optional[int], n_layers: int) -> int:
    if peft_cfg.r > 0:
        return int(peft_cfg.r)
    if not num_classes:
        raise ConfigError("peft.r=0 (automatic bottleneck) needs the number of classes: "
                         "apply_adapter(visual, peft_cfg, num_classes=C)")
    from loft_dist.models.adaptformer import auto_bottleneck

    return auto_bottleneck(num_classes, n_layers)
