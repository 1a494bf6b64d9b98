"""Parameter-efficient adapters on the image tower, behind one `apply_adapter(visual, peft_cfg)`."""

from __future__ import annotations

import torch.nn as nn

ADAPTER_DIR = "adapter"


def apply_adapter(visual: nn.Module, peft_cfg) -> nn.Module:
    """Wrap the frozen image tower with the configured adapter; only adapter parameters require grad."""
    if peft_cfg.method == "none":
        return visual
    if peft_cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout,
                            target_modules=list(peft_cfg.target_modules), bias="none")
        return get_peft_model(visual, config)
    raise ValueError(f"peft.method={peft_cfg.method!r} is not supported; one of: lora, none")


def adapter_state(visual: nn.Module) -> dict | None:
    """The adapter's own tensors (peft format), or None when the tower has no adapter."""
    from peft import PeftModel, get_peft_model_state_dict

    return get_peft_model_state_dict(visual) if isinstance(visual, PeftModel) else None
