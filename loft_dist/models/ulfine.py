"""ULFine's classifier (SPEC PART B): the method-agnostic `ClipClassifier` with a second, linear head beside its
text-prototype head, and dual logit fusion (DLF) of the two. The training rules that move it (prototype adaptive
fitting, the losses) are the method's, in algorithms/ulfine.py.

The prototypes the classifier sees are head.weight + paf_shift: gradients train head.weight through the optimizer,
while PAF moves a buffer, paf_shift, so that no optimizer (DeepSpeed ZeRO keeps its own master copy of the
weights) undoes it. Files: the classifier's (models/checkpoint.py) plus ULFINE_FILE with the linear head and
paf_shift.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loft_dist.config import DLF_RULES
from loft_dist.errors import WeightsError

ULFINE_FILE = "ulfine.safetensors"  # linear head + paf_shift, beside the classifier's head.safetensors


def fuse_logits(z_text: torch.Tensor, z_lin: torch.Tensor, rule: str = "sum", weight: float = 0.5) -> torch.Tensor:
    """DLF: sum z_t + z_l; weighted (1-w) z_t + w z_l; prob log((1-w) softmax(z_t) + w softmax(z_l))."""
    if rule == "sum":
        return z_text + z_lin
    if rule == "weighted":
        return (1.0 - weight) * z_text + weight * z_lin
    if rule == "prob":
        # log of a mixture via logsumexp: exact where a share is 0 (log 0 = -inf drops that head)
        parts = torch.stack([math.log(1.0 - weight) + F.log_softmax(z_text, dim=-1) if weight < 1 else
                             torch.full_like(z_text, -math.inf),
                             math.log(weight) + F.log_softmax(z_lin, dim=-1) if weight > 0 else
                             torch.full_like(z_lin, -math.inf)])
        return torch.logsumexp(parts, dim=0)
    raise ValueError(f"dlf.rule={rule!r}; one of {DLF_RULES}")


def orthogonality_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """||P^ P^T - I||_F^2 with P^ the row-normalised prototypes (C, d)."""
    p = F.normalize(prototypes, dim=-1)
    gram = p @ p.t()
    return ((gram - torch.eye(len(p), dtype=gram.dtype, device=gram.device)) ** 2).sum()


class ULFineClassifier(nn.Module):
    """ClipClassifier + linear head; forward returns {"text", "lin", "feat"} per row and "orth" per batch."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        num_classes, dim = clip.head.weight.shape
        self.linear = nn.Linear(dim, num_classes)
        # Zero init: fused logits start as the text-prototype logits, so round 1's teacher is the text head.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("paf_shift", torch.zeros(num_classes, dim))
        self.register_buffer("pu", torch.zeros(num_classes))  # P_u^k of this round (reset each round)
        self.pu_fixed = False  # offline: P_u^k is the round table's, set once when the round starts
        self.step_prototypes = None  # the prototypes of the last training forward, for PAF after the step

    def forward(self, images: torch.Tensor) -> dict:
        feat = self.clip.features(images)
        # fp32 whatever the engine's precision: PAF's small momentum steps would round away in bf16.
        prototypes = self.clip.head.weight.float() + self.paf_shift.float()
        if self.training:
            # Read here, where ZeRO-3 has gathered head.weight; PAF then moves the pre-step prototype while the
            # optimizer applies the gradient step, both from the same state.
            self.step_prototypes = prototypes.detach()
        z_text = self.clip.head.scale * F.normalize(feat.float(), dim=-1) @ F.normalize(prototypes, dim=-1).t()
        return {"text": z_text, "lin": self.linear(feat), "feat": feat, "orth": orthogonality_loss(prototypes)}

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.zero_shot_logits(images)

    def save(self, directory, state: dict | None = None) -> None:
        from safetensors.torch import save_file

        from loft_dist.models.checkpoint import save_weights

        save_weights(self.clip, directory, state)
        tensors = {"linear.weight": self.linear.weight, "linear.bias": self.linear.bias, "paf_shift": self.paf_shift}
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(Path(directory) / ULFINE_FILE))


def load_ulfine(model_cfg, peft_cfg, class_names: list[str], checkpoint: str | None) -> ULFineClassifier:
    """The classifier of a checkpoint dir (or the initial one) with ULFine's extra head; P_u starts at zero."""
    from safetensors.torch import load_file

    from loft_dist.models.checkpoint import load_classifier

    model = ULFineClassifier(load_classifier(model_cfg, peft_cfg, class_names, checkpoint))
    if checkpoint:
        path = Path(checkpoint) / ULFINE_FILE
        if not path.is_file():
            raise WeightsError(f"{path} not found: {checkpoint} was not trained with algorithm.name=ulfine "
                               f"(it has no linear head); use it with the algorithm.name it was trained with, or "
                               f"use a checkpoint of a ulfine run")
        t = load_file(str(path))
        with torch.no_grad():
            model.linear.weight.copy_(t["linear.weight"])
            model.linear.bias.copy_(t["linear.bias"])
            model.paf_shift.copy_(t["paf_shift"])
    return model.eval()

