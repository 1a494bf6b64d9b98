"""Pretrained weights in every format users hold (models/weights.py), each written here in that exact format from
random weights and loaded through `model.pretrained` / `model.name`, offline: the loaded tensors equal the source."""

from __future__ import annotations

import json
import pickle
import zipfile

import open_clip
import pytest
import torch

from loft_dist.errors import WeightsError
from loft_dist.models.clip import _register_configs, create_clip
from loft_dist.models.weights import MissingWeightsError, read_torchscript

TINY = "loft-tiny-vit"


def _source(name: str = TINY, seed: int = 7, quick_gelu: bool = False):
    """A model whose weights differ from create_clip's default random init (another seed)."""
    _register_configs()
    torch.manual_seed(seed)
    return open_clip.create_model(name, force_quick_gelu=quick_gelu).eval()


def _assert_same(model, source) -> None:
    got, want = model.state_dict(), source.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _quick_gelu(model) -> bool:
    return isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "pt_wrapped"])
def test_state_dict_files(tmp_path, fmt):
    src = _source()
    sd = src.state_dict()
    path = tmp_path / {"safetensors": "w.safetensors", "bin": "w.bin", "pt_wrapped": "w.pt"}[fmt]
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "bin":
        torch.save(sd, path)
    else:  # a training script's checkpoint: {"state_dict": DDP's module.-prefixed keys, ...}
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    model = create_clip(TINY, str(path))
    _assert_same(model, src)
    assert not _quick_gelu(model)


def _openai_archive(path, src) -> None:
    """A TorchScript archive laid out as OpenAI's: CLIP's modules at the top level, its key names, and the three
    int buffers OpenAI's model carries (input_resolution, context_length, vocab_size)."""

    class OpenAIStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, child in src.named_children():
                setattr(self, n, child)
            for n, p in src.named_parameters(recurse=False):
                self.register_parameter(n, p)
            for k, v in {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}.items():
                self.register_buffer(k, torch.tensor(v))

        def forward(self, image):
            return self.visual(image)

    torch.jit.trace(OpenAIStyle(), (torch.zeros(1, 3, 32, 32),), check_trace=False).save(str(path))


def test_openai_torchscript_archive_is_read_as_data_and_turns_quick_gelu_on(tmp_path):
    src = _source(quick_gelu=True)
    path = tmp_path / "ViT-B-16.pt"
    _openai_archive(path, src)
    with pytest.raises(Exception):  # what open_clip's own loader does with it: torch refuses the archive
        torch.load(path, weights_only=True)
    tensors = read_torchscript(path)
    assert {"input_resolution", "context_length", "vocab_size", "visual.conv1.weight"} <= set(tensors)
    model = create_clip(TINY, str(path))  # model.name without -quickgelu: the file's origin decides
    _assert_same(model, src)
    assert _quick_gelu(model)


def test_an_archive_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/code/__torch__/model.py", "")
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(WeightsError, match=r"model.pretrained=.*evil.pt.*refusing posix.system"):
        create_clip(TINY, str(path))
    assert not (tmp_path / "pwned").exists()


def _hub_dir(d, src, name: str = TINY):
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config(name)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


def test_hub_layout_directory_as_pretrained_or_local_dir(tmp_path):
    src = _source()
    d = _hub_dir(tmp_path / "hub", src)
    _assert_same(create_clip(TINY, str(d)), src)
    _assert_same(create_clip(f"local-dir:{d}"), src)
    (d / "open_clip_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="not an open_clip hub-layout directory"):
        create_clip(TINY, str(d))


def _hf_cache(monkeypatch, cache, repo: str, files: dict) -> None:
    """A Hugging Face cache holding one snapshot of `repo`, offline, as `huggingface-cli download` leaves it."""
    from huggingface_hub import constants

    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hf_hub_name_from_the_local_cache(tmp_path, monkeypatch):
    src = _source()
    d = _hub_dir(tmp_path / "files", src)
    _hf_cache(monkeypatch, tmp_path / "cache", "acme/tiny-clip",
              {n: (lambda dst, n=n: dst.write_bytes((d / n).read_bytes()))
               for n in ("open_clip_config.json", "open_clip_model.safetensors")})
    _assert_same(create_clip("hf-hub:acme/tiny-clip"), src)
    with pytest.raises(MissingWeightsError, match=r"hf-hub:acme/other is not in the local Hugging Face cache"):
        create_clip("hf-hub:acme/other")


@pytest.mark.slow
def test_open_clip_tag_from_the_local_cache_vit_b_16(tmp_path, monkeypatch):
    """(a) with the real architecture: ViT-B-16's `openai` tag resolves to its Hugging Face repo in the cache."""
    from safetensors.torch import save_file

    src = _source("ViT-B-16", quick_gelu=True)
    repo = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].rstrip("/")
    _hf_cache(monkeypatch, tmp_path / "cache", repo, {"open_clip_model.safetensors": lambda dst: save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, str(dst))})
    model = create_clip("ViT-B-16", "openai")
    _assert_same(model, src)
    assert _quick_gelu(model)  # the tag's weights are OpenAI's: QuickGELU, as the tag's config says


def test_a_file_of_another_architecture_fails_in_one_line(tmp_path):
    from safetensors.torch import save_file

    sd = _source().state_dict()
    sd["visual.extra.weight"] = torch.zeros(2)
    sd["visual.conv1.weight"] = torch.zeros(3, 3)
    del sd["visual.ln_post.bias"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError) as e:
        create_clip(TINY, str(tmp_path / "w.safetensors"))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"model.pretrained={tmp_path / 'w.safetensors'} does not fit "
                                                      f"model.name={TINY}: missing visual.ln_post.bias (1); "
                                                      f"unexpected visual.extra.weight (1); shape file vs model "
                                                      f"visual.conv1.weight (3, 3) vs"), message
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.bin: not a state dict torch reads safely \(weights_only=True\)"):
        create_clip(TINY, str(tmp_path / "junk.bin"))
