"""Checkpoint format shared by training, scoring and export (DESIGN §3), loadable without Ray.

<dir>/adapter/{adapter_config.json, adapter_model.safetensors} (lora: peft's format; other methods: ours, see
models/adapters.py; none: no adapter dir), <dir>/head.safetensors, <dir>/train_state.json, and from training
<dir>/deepspeed/ (DeepSpeed's engine state).
Everything is read with safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from loft_dist.errors import WeightsError
from loft_dist.models.adapters import ADAPTER_DIR, load_adapter, save_adapter
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


def check_weight_files(directory: str | Path) -> None:
    """Every weights file of a checkpoint dir (its own and its adapter's) opens as safetensors, whole: a WeightsError
    naming the file otherwise (safetensors checks the header and the file size; the values are not read)."""
    d = Path(directory)
    for f in sorted(d.glob("*.safetensors")) + sorted((d / ADAPTER_DIR).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as t:
                t.keys()
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{f} is not a readable safetensors file ({e}): the checkpoint {d} is corrupt or was "
                               f"copied incompletely; copy it again from the run dir it was trained in "
                               f"(rounds/r<k>/checkpoint)") from e


def head_classes(directory: str | Path) -> int:
    """The number of classes a checkpoint's head was trained for (read from the file's header only)."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise WeightsError(f"{path} not found: {directory} is not a loft_dist checkpoint")
    check_weight_files(directory)
    with safe_open(str(path), "pt") as t:
        return int(t.get_slice("weight").get_shape()[0])


def load_weights(model: ClipClassifier, directory: str | Path) -> ClipClassifier:
    """Load adapter + head weights of a checkpoint dir into a classifier built with the same config."""
    d = Path(directory)
    head_path = d / HEAD_FILE
    if not head_path.is_file():
        raise WeightsError(f"{head_path} not found: {d} is not a loft_dist checkpoint")
    check_weight_files(d)
    head = load_file(str(head_path))["weight"]
    (n, dim), (saved_n, saved_dim) = model.head.weight.shape, head.shape
    if saved_dim != dim:
        raise WeightsError(f"{head_path} holds a head for {saved_dim}-d features, but model.name builds {dim}-d "
                           f"ones: the checkpoint was trained on another backbone; set model.name (and "
                           f"model.pretrained) to those it was trained with")
    if saved_n != n:
        raise WeightsError(f"{head_path} holds a head for {saved_n} classes, but {n} class names were given: the "
                           f"checkpoint was trained on other classes; use it with the class names it was trained on")
    load_adapter(model.visual, d)
    model.head.weight.data.copy_(head)
    return model


def load_classifier(model_cfg, peft_cfg, class_names: list[str], directory: str | Path | None) -> ClipClassifier:
    model = build_classifier(model_cfg, peft_cfg, class_names)
    if directory:
        load_weights(model, directory)
    return model.eval()
