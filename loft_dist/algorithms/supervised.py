"""The supervised baselines of SPEC Decision 6 — LP (head only), LFT (LIFT: adapter + head), FFT (every weight) —
and zero-shot CLIP, which trains nothing. Only labeled rows reach their loss: the round driver gives them no
pseudo-labels (`METHODS[...].pseudo_labels` is False); what trains is `peft.method` (none | an adapter | full).
"""

from __future__ import annotations

import torch

from loft_dist.algorithms.base import ClassifierMethod
from loft_dist.algorithms.loft import LABELED, logit_adjusted_ce


def supervised_loss(logits: torch.Tensor, code: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                    soft_target: torch.Tensor, prior: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean CE(z + tau * log(pi), y) over the labeled rows: logit-adjusted (LIFT) with tau 1, plain CE with tau 0."""
    labeled = code == LABELED
    loss = logit_adjusted_ce(logits[labeled], target[labeled], prior, cfg.tau).mean() if labeled.any() \
        else logits.sum() * 0.0  # a batch of undecodable rows only: no loss, graph still connected
    value = float(loss.detach())
    return loss, {"loss": value, "loss_s": value}


METHOD = ClassifierMethod(supervised_loss)
