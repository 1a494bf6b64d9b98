"""ULFine (reconstructed; SPEC PART B, Decision 5): prototype adaptive fitting (PAF), an orthogonality loss on the
text prototypes, and dual logit fusion (DLF) of a text-prototype head and a linear-probe head.

The model is `ULFineClassifier`, a wrapper around the method-agnostic `ClipClassifier`: its cosine head holds
the text prototypes c^t (initialised from "a photo of a {class}."), and a second head, linear, sits beside it.
The prototypes seen by the classifier are head.weight + paf_shift: gradients (the CE losses and the
orthogonality loss) train head.weight through the optimizer, while PAF's momentum moves a buffer,
paf_shift, so that no optimizer (DeepSpeed ZeRO keeps its own master copy of the weights) undoes it.

Per step (offline and online alike), after the optimizer step:
    c^v_k   = normalize(mean of normalised features of the labeled rows of class k, over every rank)
    P_u^k   = confident (hard) pseudo-labels of class k (paf.stat pl_count), or the teacher's probability
              mass (mean_conf). Offline: over the whole round's table, the labels of the last round's model, fixed
              for the round (SPEC Decision 5; `start_round`); online: summed over the per-step decisions so far.
    alpha_k = mu * P_u^k / max_i P_u^i        (mu = paf.momentum; 0 while no class has any)
    c^t_k  <- (1 - alpha_k) c^t_k + alpha_k ||c^t_k|| c^v_k     (classes with labeled rows in the step)
Loss: each head's LoFT-family loss (the shared decision rule; FixMatch's hard band by default) + paf.orth_weight
* ||P^ P^T - I||_F^2 over the L2-normalised prototypes. With "train" in dlf.use_for one loss on the fused
logits replaces the two per-head losses. Fused logits z = z_text + z_lin (dlf.rule sum) make the pseudo-labels
and the test predictions by default.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loft_dist.algorithms.loft import HARD, LABELED, loft_loss
from loft_dist.config import DLF_RULES
from loft_dist.errors import WeightsError

ULFINE_FILE = "ulfine.safetensors"  # linear head + paf_shift, beside the classifier's head.safetensors


# --------------------------------------------------------------------------------------------
# the pieces, each a pure function (unit-tested against hand-computed values)
# --------------------------------------------------------------------------------------------
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


def paf_alpha(pu: torch.Tensor, momentum: float) -> torch.Tensor:
    """alpha_k = mu * P_u^k / max_i P_u^i; all zero while no class has a pseudo-label statistic."""
    top = pu.max()
    return momentum * pu / top if top > 0 else torch.zeros_like(pu)


def prototype_adaptive_fitting(prototypes: torch.Tensor, feat_sum: torch.Tensor, count: torch.Tensor,
                               alpha: torch.Tensor) -> torch.Tensor:
    """c_k <- (1 - alpha_k) c_k + alpha_k ||c_k|| c^v_k, c^v_k = normalize(feat_sum_k / count_k), where count_k > 0.

    `feat_sum` sums L2-normalised features of labeled rows per class; classes without rows keep c_k. The
    norm factor keeps the prototype's length, so the update moves only its direction (all a cosine head sees).
    """
    visual = F.normalize(feat_sum / count.clamp_min(1)[:, None], dim=-1)
    moved = (1.0 - alpha[:, None]) * prototypes + alpha[:, None] * prototypes.norm(dim=-1, keepdim=True) * visual
    return torch.where((count > 0)[:, None], moved, prototypes)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
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
        self.pu_fixed = False  # offline: P_u^k is the round table's, set once by start_round
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


def load_ulfine(cfg, class_names: list[str], checkpoint: str | None) -> ULFineClassifier:
    """The classifier of a checkpoint dir (or the initial one) with ULFine's extra head; P_u starts at zero."""
    from safetensors.torch import load_file

    from loft_dist.models.checkpoint import load_classifier

    model = ULFineClassifier(load_classifier(cfg.model, cfg.peft, class_names, checkpoint))
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


# --------------------------------------------------------------------------------------------
# what the training loop and the scorer call
# --------------------------------------------------------------------------------------------
def logits_for(out: dict, purpose: str, acfg) -> torch.Tensor:
    """Fused logits where `purpose` (pseudo_label | train | test) is in dlf.use_for, else the text-prototype ones."""
    if purpose in acfg.dlf.use_for:
        return fuse_logits(out["text"], out["lin"], acfg.dlf.rule, acfg.dlf.weight)
    return out["text"]


def ulfine_loss(out: dict, code: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, soft: torch.Tensor,
                prior: torch.Tensor, acfg) -> tuple[torch.Tensor, dict[str, float]]:
    heads = [logits_for(out, "train", acfg)] if "train" in acfg.dlf.use_for else [out["text"], out["lin"]]
    total = acfg.paf.orth_weight * out["orth"]
    parts: dict[str, float] = {}
    for z in heads:
        head_loss, head_parts = loft_loss(z, code, target, weight, soft, prior, acfg)
        total = total + head_loss
        for k, v in head_parts.items():
            if k != "loss":
                parts[k] = parts.get(k, 0.0) + v
    parts["loss_orth"] = float(out["orth"].detach())
    parts["loss"] = float(total.detach())
    return total, parts


loss = ulfine_loss


@torch.no_grad()
def start_round(model: ULFineClassifier, pool_stats: dict | None, acfg) -> None:
    """Offline: P_u^k from the round's whole table (pseudo_labels.class_statistics), not from the rows streamed so far,
    so alpha_k rests on every pseudo-label of the last round's model from the first step on."""
    if pool_stats is not None:
        model.pu.copy_(torch.tensor(pool_stats[acfg.paf.stat], dtype=model.pu.dtype))
        model.pu_fixed = True


@torch.no_grad()
def after_step(model: ULFineClassifier, out: dict, code: torch.Tensor, target: torch.Tensor, soft: torch.Tensor,
               acfg) -> None:
    """PAF from this step's rows on every rank (one all-reduce, so every rank applies the same update)."""
    import torch.distributed as dist

    for name in ("pu", "paf_shift"):  # DeepSpeed's bf16/fp16 cast covers buffers too; the statistics stay fp32
        if getattr(model, name).dtype != torch.float32:
            setattr(model, name, getattr(model, name).float())
    num_classes = model.pu.numel()
    feat = F.normalize(out["feat"].detach().float(), dim=-1)
    labeled = code == LABELED
    onehot = F.one_hot(target[labeled], num_classes).float()
    feat_sum = onehot.t() @ feat[labeled]
    count = onehot.sum(0)
    if acfg.paf.stat == "pl_count":
        stat = F.one_hot(target[code == HARD], num_classes).float().sum(0)
    else:  # mean_conf: teacher probability mass of every pool row that carries one (codes >= 0)
        stat = soft[code >= 0].float().sum(0)
    packed = torch.cat([feat_sum.flatten(), count, stat])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    dim = feat.shape[1]
    feat_sum = packed[: num_classes * dim].view(num_classes, dim)
    count, stat = packed[num_classes * dim: num_classes * (dim + 1)], packed[num_classes * (dim + 1):]
    if not model.pu_fixed:
        model.pu += stat
    before = model.step_prototypes
    model.paf_shift += prototype_adaptive_fitting(before, feat_sum, count, paf_alpha(model.pu, acfg.paf.momentum)) - before
