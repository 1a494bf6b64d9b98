"""Adapters behind apply_adapter: what trains, what starts as the frozen model, gradients, checkpoint round trips,
and AdaptFormer / VPT-deep against their equations (SPEC A.0.1)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from loft_dist.config import load_config
from loft_dist.errors import WeightsError
from loft_dist.models.adaptformer import AdaptFormerBlock, add_adaptformer, auto_bottleneck
from loft_dist.models.adapters import ADAPTER_DIR, CONFIG_FILE, adapter_spec, apply_adapter
from loft_dist.models.checkpoint import load_weights, save_weights
from loft_dist.models.clip import build_classifier, create_clip, trainable_summary

METHODS = ["lora", "adaptformer", "vpt", "bitfit", "ln", "full", "none"]
STARTS_AS_FROZEN = ["lora", "adaptformer", "bitfit", "ln", "full", "none"]  # VPT's prompts change the input at once
CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


_built: dict = {}


def build(cfg, method: str, **peft):
    """A fresh classifier; building is seeded, so copies of one build stand in for rebuilding (tests run 3x faster)."""
    key = (method, tuple(sorted((k, str(v)) for k, v in peft.items())))
    if key not in _built:
        _built[key] = build_classifier(cfg.model, dataclasses.replace(cfg.peft, method=method, **peft), CLASSES)
    return copy.deepcopy(_built[key]).eval()


def adapter_params(model) -> dict:
    """Trainable parameters of the tower (the adapter's own; for full: the whole tower)."""
    return {n: p for n, p in model.visual.named_parameters() if p.requires_grad}


def backbone_share(model) -> float:
    """Adapter parameters over the frozen backbone's (for full: the whole tower over itself)."""
    adapter = sum(p.numel() for p in adapter_params(model).values())
    backbone = sum(p.numel() for p in model.visual.parameters()) - (0 if adapter_spec(model.visual).method == "full"
                                                                       else adapter)
    return adapter / backbone


def is_adapter_name(method: str, name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return {
        "lora": "lora_" in name,
        "adaptformer": ".adaptformer." in name,
        "vpt": name.endswith("vpt_prompts"),
        "bitfit": ".resblocks." in name and leaf.endswith("bias"),
        "ln": ".resblocks." in name and ".ln_tuning_layers." in name,  # peft trains a copy of each block LayerNorm
        "full": True,
        "none": False,
    }[method]


@torch.no_grad()
def perturb(model, scale: float = 0.1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------ what trains
@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_and_head_train(cfg, method):
    model = build(cfg, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable
    tower = {n for n, _ in model.visual.named_parameters()}
    expected = {f"visual.{n}" for n in tower if is_adapter_name(method, n)}
    assert trainable - {"head.weight"} == expected
    assert method == "none" or expected

    summary = trainable_summary(model)
    n_adapter = sum(p.numel() for p in adapter_params(model).values())
    assert summary["trainable"] == n_adapter + model.head.weight.numel()
    share = backbone_share(model)
    if method == "full":
        assert share == 1.0
    else:
        assert 0.0 <= share < 0.2, f"{method} trains {share:.1%} of the tiny backbone"


@pytest.mark.parametrize("method", METHODS)
def test_starts_as_the_frozen_model_where_the_spec_says(cfg, images, method):
    frozen = build(cfg, "none")
    model = build(cfg, method)
    with torch.no_grad():
        expected, got = frozen(images), model(images)
    if method in STARTS_AS_FROZEN:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    else:
        assert not torch.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "adaptformer", "vpt"])
def test_adapter_init_is_seeded_by_config_not_by_the_global_rng(cfg, method):
    peft = dataclasses.replace(cfg.peft, method=method)
    torch.manual_seed(1)
    a = adapter_params(build_classifier(cfg.model, peft, CLASSES))
    torch.manual_seed(2)  # as a worker of another rank would
    b = adapter_params(build_classifier(cfg.model, peft, CLASSES))
    c = adapter_params(build_classifier(cfg.model, dataclasses.replace(peft, init_seed=1), CLASSES))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_zero_initialisations(cfg):
    model = build(cfg, "adaptformer")
    for block in model.visual.transformer.resblocks:
        a = block.adaptformer
        assert torch.count_nonzero(a.up_proj.weight) == 0 and torch.count_nonzero(a.up_proj.bias) == 0
        assert torch.count_nonzero(a.down_proj.bias) == 0 and torch.count_nonzero(a.down_proj.weight) > 0
        assert a.scale.item() == 1.0 and a.scale.numel() == 1
    lora = build(cfg, "lora")
    b = [p for n, p in lora.visual.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) == 0 for p in b)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_gradient_reaches_the_adapter(cfg, images, method):
    model = build(cfg, method).train()
    F.cross_entropy(model(images), torch.arange(4)).backward()
    params = adapter_params(model)
    assert all(p.grad is not None for p in params.values())
    assert sum(p.grad.abs().sum().item() for p in params.values()) > 0
    assert model.head.weight.grad is not None
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen


@pytest.mark.parametrize("method", ["adaptformer", "lora"])
def test_zero_init_adapters_get_gradient_everywhere_once_moved(cfg, images, method):
    # At init the zero up-projection (AdaptFormer) / B (LoRA) blocks the gradient of everything before it;
    # after one step away from zero every adapter tensor must receive gradient.
    model = build(cfg, method).train()
    F.cross_entropy(model(images), torch.arange(4)).backward()
    zero_side = [n for n in adapter_params(model) if "up_proj" in n or "lora_B" in n]
    assert all(adapter_params(model)[n].grad.abs().sum() > 0 for n in zero_side)
    model.zero_grad()
    perturb(model)
    F.cross_entropy(model(images), torch.arange(4)).backward()
    dead = [n for n, p in adapter_params(model).items() if p.grad.abs().sum() == 0]
    assert not dead


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(cfg, images, method, tmp_path):
    model = build(cfg, method)
    perturb(model)
    with torch.no_grad():
        expected = model(images)
    save_weights(model, tmp_path, {"epoch": 0})
    if method == "none":
        assert not (tmp_path / ADAPTER_DIR).exists()
    else:
        assert (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert (tmp_path / ADAPTER_DIR / CONFIG_FILE).is_file()
    fresh = build(cfg, method)
    with torch.no_grad():
        assert not torch.equal(fresh(images), expected)
        load_weights(fresh, tmp_path)
        assert torch.equal(fresh(images), expected)


def test_load_rejects_another_adapter(cfg, tmp_path):
    save_weights(build(cfg, "adaptformer", r=8), tmp_path / "af")
    save_weights(build(cfg, "lora"), tmp_path / "lora")
    with pytest.raises(WeightsError, match="differ"):
        load_weights(build(cfg, "adaptformer", r=4), tmp_path / "af")
    with pytest.raises(WeightsError, match="'adaptformer' adapter but peft.method='none'"):
        load_weights(build(cfg, "none"), tmp_path / "af")
    with pytest.raises(WeightsError, match="'lora' adapter but peft.method='vpt'"):
        load_weights(build(cfg, "vpt"), tmp_path / "lora")
    with pytest.raises(WeightsError, match="rank"):
        load_weights(build(cfg, "lora", r=4), tmp_path / "lora")
    with pytest.raises(WeightsError):
        load_weights(build(cfg, "adaptformer"), tmp_path / "lora" / ADAPTER_DIR)
    save_weights(build(cfg, "ln"), tmp_path / "ln")
    with pytest.raises(WeightsError, match=r"LN tuning of .*resblocks\.1\.ln_1.* by peft.layers"):
        load_weights(build(cfg, "ln", layers=[0]), tmp_path / "ln")


@pytest.mark.parametrize("method,peft_type", [("lora", "LORA"), ("ln", "LN_TUNING")])
def test_adapters_peft_has_are_saved_as_peft_checkpoints(cfg, images, method, peft_type, tmp_path):
    """LoRA and LN tuning are written in peft's own format: peft alone loads them onto a fresh open_clip tower."""
    import json

    from peft import PeftModel

    model = build(cfg, method)
    perturb(model)
    save_weights(model, tmp_path)
    assert json.loads((tmp_path / ADAPTER_DIR / CONFIG_FILE).read_text())["peft_type"] == peft_type
    # the frozen tower alone (the seeded init every build shares), with the adapter put on by peft
    tower = PeftModel.from_pretrained(build(cfg, "none").visual, str(tmp_path / ADAPTER_DIR))
    with torch.no_grad():
        assert torch.allclose(tower(images), model.visual(images), atol=1e-6)


# ------------------------------------------------------------------ AdaptFormer and VPT against their equations
@pytest.mark.parametrize("batch_first", [True, False])
def test_adaptformer_block_equation_with_layer_scale_and_mask(batch_first):
    torch.manual_seed(0)
    d, n, b = 16, 5, 3
    block = ResidualAttentionBlock(d, 2, mlp_ratio=2.0, ls_init_value=0.3, batch_first=batch_first).eval()
    add_adaptformer(block, r=4)
    assert isinstance(block, AdaptFormerBlock)
    a = block.adaptformer
    with torch.no_grad():  # every LayerNorm away from identity affine, so feeding LN2(h) instead of h shows
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn((b, n, d) if batch_first else (n, b, d))
    mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
    with torch.no_grad():
        attn = block.attn(block.ln_1(x), block.ln_1(x), block.ln_1(x), need_weights=False, attn_mask=mask)[0]
        h = x + block.ls_1(attn)
        adapter = a.scale * a.up_proj(torch.relu(a.down_proj(a.ln(h))))
        expected = h + block.ls_2(block.mlp(block.ln_2(h))) + adapter
        torch.testing.assert_close(block(x, attn_mask=mask), expected)


def test_adaptformer_only_on_listed_layers(cfg):
    model = build(cfg, "adaptformer", layers=[1])
    blocks = model.visual.transformer.resblocks
    assert type(blocks[0]) is ResidualAttentionBlock and isinstance(blocks[1], AdaptFormerBlock)
    lora = build(cfg, "lora", layers=[1])
    names = [n for n in adapter_params(lora)]
    assert names and all(".resblocks.1." in n for n in names)


def test_vpt_deep_inserts_after_cls_and_drops_at_each_block_output(cfg, images):
    model = build(cfg, "vpt", vpt_tokens=3)
    visual = model.visual
    prompts = visual.transformer.vpt_prompts
    assert prompts.shape == (len(visual.transformer.resblocks), 3, visual.transformer.width)
    with torch.no_grad():
        x = visual._embeds(images)
        for i, block in enumerate(visual.transformer.resblocks):
            x = torch.cat([x[:, :1], prompts[i].expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
            x = block(x)
            x = torch.cat([x[:, :1], x[:, 4:]], dim=1)
        expected = visual.ln_post(x)[:, 0]
        torch.testing.assert_close(visual(images), expected)


# ------------------------------------------------------------------ automatic bottleneck
def test_auto_bottleneck_rule():
    assert auto_bottleneck(100, 12) == 4  # 100 / 24 = 4.17
    assert auto_bottleneck(127, 12) == 4  # 127 / 24 = 5.29
    assert auto_bottleneck(1000, 12) == 32  # 41.7
    assert auto_bottleneck(10, 12) == 1  # below 1: clamped to 2**0


def test_auto_bottleneck_needs_num_classes(cfg):
    visual = create_clip(cfg.model.name).visual
    peft = dataclasses.replace(cfg.peft, method="adaptformer", r=0)
    with pytest.raises(ValueError, match="num_classes"):
        apply_adapter(visual, peft)
    apply_adapter(visual, peft, num_classes=40)  # 40 / (2 * 2 blocks) = 10 -> 2**3
    assert adapter_spec(visual).hparams["r"] == 8
    assert visual.transformer.resblocks[0].adaptformer.down_proj.out_features == 8


def test_vit_b16_adaptformer_matches_the_paper_setup(cfg):
    """ViT-B/16, C=100: r=4 in all 12 blocks, 12 * (LN 2d + down d*r+r + up r*d+d + scale 1) parameters."""
    visual = create_clip("ViT-B-16").visual
    visual.proj = None
    apply_adapter(visual, dataclasses.replace(cfg.peft, method="adaptformer", r=0), num_classes=100)
    d, r = 768, 4
    n = sum(p.numel() for p in visual.parameters() if p.requires_grad)
    assert adapter_spec(visual).hparams == {"layers": list(range(12)), "r": r}
    assert n == 12 * (2 * d + d * r + r + r * d + d + 1) == 101_436
    backbone = sum(p.numel() for p in visual.parameters()) - n
    assert backbone == 85_799_424  # ViT-B/16 image tower without CLIP's 768x512 projection
    assert n / backbone == pytest.approx(0.00118, abs=1e-5)  # 0.118 % of the backbone trains
    down = torch.cat([b.adaptformer.down_proj.weight.flatten() for b in visual.transformer.resblocks])
    assert down.std().item() == pytest.approx(1 / math.sqrt(3 * d), rel=0.05)  # kaiming_normal, a=sqrt(5)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key", [("peft.method=adapter", "peft.method"), ("peft.r=-1", "peft.r"),
                                           ("peft.layers=[]", "peft.layers"), ("peft.layers=[-1]", "peft.layers"),
                                           ("peft.vpt_tokens=0", "peft.vpt_tokens"),
                                           ("peft.dropout=1.0", "peft.dropout")])
def test_peft_config_rejects(override, key):
    from loft_dist.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_layers_beyond_the_tower_are_rejected_when_building(cfg):
    with pytest.raises(ValueError, match=r"peft.layers=\[2\].*has 2"):
        build_classifier(cfg.model, dataclasses.replace(cfg.peft, method="adaptformer", layers=[2]), CLASSES)
