"""Pretrained CLIP weights in every format users hold, read offline and without running anyone's code.

`model.pretrained` (with `model.name`) may be:
  (a) an open_clip pretrained tag, found in the local cache (`ViT-B-16` + `openai`, `laion2b_s34b_b88k`, …);
  (b) `model.name=hf-hub:ORG/NAME` from the local Hugging Face cache, or a local directory in the hub layout
      (open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin), as model.pretrained or
      as `model.name=local-dir:/dir`;
  (c) a state-dict file: .safetensors, or a torch .bin/.pt/.pth read with weights_only=True, with or without a
      `state_dict` wrapper and `module.` prefixes;
  (d) OpenAI's TorchScript archive (ViT-B-16.pt): its tensors are read from the zip by a restricted unpickler that
      builds nothing but tensors and plain attribute records, so the archive's code never runs. OpenAI weights
      need QuickGELU, which such a file turns on by itself.
A file that does not fit the architecture fails with one line naming the model and the first keys that differ.
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path

import torch

from loft_dist.errors import WeightsError

SCHEMAS = ("hf-hub:", "local-dir:")
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archive, not weights
SHOWN = 3  # keys named in an error line


class MissingWeightsError(WeightsError):
    """Pretrained weights are not available offline; the message says what to place where."""


# --------------------------------------------------------------------------------------------
# (d) TorchScript archives, read as data
# --------------------------------------------------------------------------------------------
class _Record:
    """What a TorchScript module object unpickles to here: its attributes, nothing callable."""

    def __setstate__(self, state):
        self.state = state


_ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("builtins", "set"), ("builtins", "frozenset")}


class _ArchiveUnpickler(pickle.Unpickler):
    """Resolves only tensors, storages and plain containers; every `__torch__.*` class becomes a _Record."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_Record,), {})
        if (module, name) in _ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a weights archive holds tensors only")

    def persistent_load(self, pid):
        _, storage_type, key, _, _ = pid
        data = self.archive.read(f"{self.prefix}/data/{key}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        raw = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=raw, dtype=dtype, _internal=True)


def is_torchscript(path: str | Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())


def _tensors_of(record, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, value in (record.state.items() if isinstance(getattr(record, "state", None), dict) else ()):
        if torch.is_tensor(value):
            out[prefix + name] = value.detach()
        elif isinstance(value, _Record):
            out.update(_tensors_of(value, f"{prefix}{name}."))
    return out


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by its dotted path (= its state-dict key)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        prefix = names[0].split("/", 1)[0]
        order = f"{prefix}/byteorder"
        if order in names and z.read(order).decode().strip() != "little":
            raise WeightsError(f"{path}: a big-endian TorchScript archive; convert it on the machine that wrote it")
        root = _ArchiveUnpickler(z.read(f"{prefix}/data.pkl"), z, prefix).load()
    return _tensors_of(root)


# --------------------------------------------------------------------------------------------
# (c) state-dict files
# --------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, origin) of a weights file: origin "openai" for a TorchScript archive, else "file"."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(path)), "file"
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file, said in one line
            raise WeightsError(f"model.pretrained={path}: not a readable safetensors file ({_first_line(e)}); "
                               f"copy it again") from e
    if is_torchscript(path):
        try:
            return read_torchscript(path), "openai"
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise WeightsError(f"model.pretrained={path}: a TorchScript archive whose tensors cannot be read as data "
                               f"({_first_line(e)})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"model.pretrained={path}: not a state dict torch reads safely (weights_only=True): "
                           f"{_first_line(e)}. Use a .safetensors, a torch state dict or OpenAI's TorchScript "
                           f"archive") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"model.pretrained={path} holds a {type(obj).__name__}, not a state dict")
    return _unwrap(obj), "file"


def _unwrap(obj: dict) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def load_into(model, state_dict: dict[str, torch.Tensor], name: str, path: str) -> None:
    """open_clip's own fix-ups (old text layout, logit_scale shape, position embeddings), then a strict load; a file
    that does not fit `name` raises one line with the first keys that differ."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed

    sd = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRAS}
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(sd, model)
    want = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - set(want)  # non-persistent buffers (attn_mask)
    sd = {k: v for k, v in sd.items() if k not in transient}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in sorted(set(sd) & set(want))
              if sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(keys[:SHOWN])}{' …' if len(keys) > SHOWN else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape file vs model", shapes))
                 if keys]
        raise WeightsError(f"model.pretrained={path} does not fit model.name={name}: {'; '.join(parts)}. Set "
                           f"model.name to the architecture the file was saved from")
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------
# (a), (b): what open_clip finds itself, offline
# --------------------------------------------------------------------------------------------
def hub_identifier(name: str, pretrained: str) -> str | None:
    """The open_clip identifier with a schema when the weights come with their own config: `hf-hub:…`,
    `local-dir:…`, or a hub-layout directory given as model.pretrained; else None."""
    if name.startswith(SCHEMAS):
        if pretrained:
            raise WeightsError(f"model.name={name} brings its own weights; leave model.pretrained empty "
                               f"(it is {pretrained!r})")
        return name
    if pretrained and Path(pretrained).is_dir():
        return f"local-dir:{Path(pretrained).resolve()}"
    return None


def check_hub_source(identifier: str) -> None:
    """The config and weights of a schema identifier are here, offline; else MissingWeightsError saying what to copy."""
    if identifier.startswith("local-dir:"):
        d = Path(identifier[len("local-dir:"):])
        if not (d / "open_clip_config.json").is_file() or not any((d / f).is_file() for f in HUB_FILES):
            raise MissingWeightsError(f"{d} is not an open_clip hub-layout directory: it needs open_clip_config.json "
                                      f"and one of {', '.join(HUB_FILES)}")
        return
    from huggingface_hub import try_to_load_from_cache

    repo = identifier[len("hf-hub:"):]
    found = [try_to_load_from_cache(repo, f) for f in ("open_clip_config.json", *HUB_FILES)]
    if not isinstance(found[0], str) or not any(isinstance(f, str) for f in found[1:]):
        raise MissingWeightsError(
            f"model.name={identifier} is not in the local Hugging Face cache and this machine is offline. On a "
            f"connected machine run `huggingface-cli download {repo}` and copy the cache (~/.cache/huggingface) here, "
            f"or copy the repo's files to a directory and set model.pretrained to it")


def tag_quick_gelu(name: str, tag: str) -> bool:
    """Whether open_clip's pretrained config of the tag was trained with QuickGELU (OpenAI's weights were)."""
    import open_clip

    return bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
