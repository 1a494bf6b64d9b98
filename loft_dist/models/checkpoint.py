"""Checkpoint format shared by training, scoring and export (DESIGN §3), loadable without Ray.

<dir>/adapter/{adapter_config.json, adapter_model.safetensors} (lora: peft's format; other methods: ours, see
models/adapters.py; none: no adapter dir), <dir>/head.safetensors, <dir>/train_state.json, and from training
<dir>/deepspeed/ (DeepSpeed's engine state).
Everything is read with safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from loft_dist.errors import WeightsError
from loft_dist.models.adapters import load_adapter, save_adapter
from loft_dist.models.clip import ClipClassifier, build_classifier

HEAD_FILE = "head.safetensors"
STATE_FILE = "train_state.json"
# DeepSpeed's own checkpoint (optimizer state for an exact resume): training writes it, export leaves it out.
DS_DIR = "deepspeed"


def save_weights(model: ClipClassifier, directory: str | Path, state: dict | None = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_adapter(model.visual, d)
    save_file({"weight": model.head.weight.detach().contiguous().cpu()}, str(d / HEAD_FILE))
    if state is not None:
        (d / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_weights(model: ClipClassifier, directory: str | Path) -> ClipClassifier:
    """Load adapter + head weights of a checkpoint dir into a classifier built with the same config."""
    d = Path(directory)
    head_path = d / HEAD_FILE
    if not head_path.is_file():
        raise WeightsError(f"{head_path} not found: {d} is not a loft_dist checkpoint")
    load_adapter(model.visual, d)
    model.head.weight.data.copy_(load_file(str(head_path))["weight"])
    return model


def load_classifier(model_cfg, peft_cfg, class_names: list[str], directory: str | Path | None) -> ClipClassifier:
    model = build_classifier(model_cfg, peft_cfg, class_names)
    if directory:
        load_weights(model, directory)
    return model.eval()
