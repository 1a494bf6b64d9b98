"""Trainable parameters of every peft.method on the tiny model and on ViT-B/16 (random init: counts only).

    python bench/adapter_params.py            # prints the BENCHMARKS.md section (markdown)

Adapter = trainable tensors of the image tower; backbone = the frozen tower (CLIP's projection excluded, the
classifier reads the pre-projection feature); share = adapter / backbone (full: the tower itself, 100 %);
`trainable_summary` = (adapter + head) / (tower + head), as models/clip.py reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import warnings

import torch

from loft_dist.config import load_config
from loft_dist.models.adaptformer import auto_bottleneck
from loft_dist.models.adapters import METHODS, adapter_spec
from loft_dist.models.clip import build_classifier, create_clip, trainable_summary

# (model, number of classes): the embedded tiny run (10 digits) and CIFAR-100 on the paper backbone.
SETUPS = [("loft-tiny-vit", 10), ("ViT-B-16", 100)]


def count(model) -> dict:
    adapter = sum(p.numel() for p in model.visual.parameters() if p.requires_grad)
    tower = sum(p.numel() for p in model.visual.parameters())
    full = adapter_spec(model.visual).method == "full"
    backbone = tower if full else tower - adapter
    return {"adapter": adapter, "head": model.head.weight.numel(), "backbone": backbone,
            "share": adapter / backbone, "summary": trainable_summary(model)["share"]}


def describe(method: str, spec, peft) -> str:
    h = spec.hparams
    if method == "lora":
        return f"r={h['r']}, alpha={peft.alpha}, targets {'+'.join(peft.target_modules)}"
    if method == "adaptformer":
        return f"r={h['r']} (auto), {len(h['layers'])} blocks"
    if method == "vpt":
        return f"{h['vpt_tokens']} tokens x {len(h['layers'])} blocks"
    return {"bitfit": "biases in blocks", "ln": "LayerNorms in blocks", "full": "whole tower",
            "none": "head only (LP)"}[method]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    warnings.filterwarnings("ignore")
    cfg = load_config()
    rows = []
    for name, n_classes in SETUPS:
        model_cfg = dataclasses.replace(cfg.model, name=name)
        n_layers = create_clip(name).visual.transformer.layers
        classes = [f"class_{i}" for i in range(n_classes)]
        for method in METHODS:
            # build_classifier has no class count to give apply_adapter, so resolve the auto rule (peft.r: 0) here.
            r = auto_bottleneck(n_classes, n_layers) if method == "adaptformer" else cfg.peft.r
            peft = dataclasses.replace(cfg.peft, method=method, r=r)
            model = build_classifier(model_cfg, peft, classes)
            c = count(model)
            rows.append(f"| {name} (C={n_classes}) | {method} | {describe(method, adapter_spec(model.visual), peft)} "
                        f"| {c['adapter']:,} | {c['head']:,} | {c['backbone']:,} | {100 * c['share']:.3f} % "
                        f"| {100 * c['summary']:.3f} % |")
    import open_clip
    import peft as peft_lib

    print("## Adapters: trainable parameters\n")
    print("Command: `python bench/adapter_params.py` (random-init weights; counts do not depend on them). "
          f"torch {torch.__version__}, open_clip {open_clip.__version__}, peft {peft_lib.__version__}, "
          f"Python {platform.python_version()}, {platform.machine()}.\n")
    print("Adapter = trainable tensors of the image tower; backbone = the frozen tower without CLIP's projection; "
          "share = adapter / backbone; `trainable_summary` = (adapter + head) / (tower + head).\n")
    print("| model | peft.method | setting | adapter params | head params | backbone params | adapter / backbone "
          "| trainable_summary share |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
