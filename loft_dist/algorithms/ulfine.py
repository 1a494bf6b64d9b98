"""ULFine (reconstructed; SPEC PART B, Decision 5): prototype adaptive fitting (PAF), an orthogonality loss on the
text prototypes, and dual logit fusion (DLF) of a text-prototype head and a linear-probe head.

The model is `models.ulfine.ULFineClassifier`, a wrapper around the method-agnostic `ClipClassifier`: its cosine
head holds the text prototypes c^t (initialised from "a photo of a {class}."), and a second head, linear, sits
beside it. Gradients (the CE losses and the orthogonality loss) train the prototypes through the optimizer; PAF's
momentum moves them through a buffer the optimizer does not own. This module is the method: the PAF rule, the loss,
which logits serve which purpose, and `METHOD`, the object the registry returns for algorithm.name=ulfine.

Per step (offline and online alike), after the optimizer step:
    c^v_k   = normalize(mean of normalised features of the labeled rows of class k, over every rank)
    P_u^k   = confident (hard) pseudo-labels of class k (paf.stat pl_count), or the teacher's probability
              mass (mean_conf). Offline: over the whole round's table, the labels of the last round's model, fixed
              for the round (SPEC Decision 5; `METHOD.start_round`); online: summed over the per-step decisions so far.
    alpha_k = mu * P_u^k / max_i P_u^i        (mu = paf.momentum; 0 while no class has any)
    c^t_k  <- (1 - alpha_k) c^t_k + alpha_k ||c^t_k|| c^v_k     (classes with labeled rows in the step)
Loss: each head's LoFT-family loss (the shared decision rule; FixMatch's hard band by default) + paf.orth_weight
* ||P^ P^T - I||_F^2 over the L2-normalised prototypes. With "train" in dlf.use_for one loss on the fused
logits replaces the two per-head losses. Fused logits z = z_text + z_lin (dlf.rule sum) make the pseudo-labels
and the test predictions by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loft_dist.algorithms.base import ClassifierMethod
from loft_dist.algorithms.loft import HARD, LABELED, loft_loss
from loft_dist.models.ulfine import ULFineClassifier, fuse_logits, load_ulfine


# --------------------------------------------------------------------------------------------
# the pieces, each a pure function (unit-tested against hand-computed values)
# --------------------------------------------------------------------------------------------
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
# the method
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


class ULFineMethod(ClassifierMethod):
    """ULFine's model (ULFineClassifier), its loss, DLF's logits per purpose, and PAF around the steps."""

    def __init__(self):
        super().__init__(ulfine_loss)

    def build(self, cfg, class_names: list[str], checkpoint) -> ULFineClassifier:
        return load_ulfine(cfg.model, cfg.peft, class_names, checkpoint)

    def save(self, model: ULFineClassifier, directory, state: dict | None = None) -> None:
        model.save(directory, state)

    def logits(self, out: dict, purpose: str, acfg) -> torch.Tensor:
        return logits_for(out, purpose, acfg)

    def start_round(self, model: ULFineClassifier, pool_stats: dict | None, acfg) -> None:
        start_round(model, pool_stats, acfg)

    def after_step(self, model: ULFineClassifier, out: dict, code, target, soft, acfg) -> None:
        after_step(model, out, code, target, soft, acfg)


METHOD = ULFineMethod()
