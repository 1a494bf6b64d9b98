"""FixMatch (Sohn et al. 2020) as SPEC Decision 6 runs it: hard pseudo-labels where the teacher's MSP reaches
c_hard (0.95), plain cross-entropy, no soft band.

The mask is the shared decision rule with c_ood = c_hard (`fixmatch_mask`); the loss is
L = CE(z_x + tau log pi, y) + lambda_u * (1 / mu B) sum_j 1[q_j >= c_hard] CE(z_s_j, yhat_j), with tau = 0
(plain CE) and lambda_u = 1 by default (METHODS["fixmatch"].defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loft_dist.algorithms.loft import HARD, LABELED, logit_adjusted_ce, pseudo_label_decision


def fixmatch_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """1[max_c p_c >= threshold] as a float mask (the decision rule with no soft band)."""
    return (pseudo_label_decision(probs, threshold, threshold)["code"] == HARD).float()


def fixmatch_loss(logits: torch.Tensor, code: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  soft_target: torch.Tensor, prior: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised CE over labeled rows + lambda_u * masked hard CE summed over hard rows / all unlabeled rows.

    Rows of any other decision (soft, rejected, ood, undecodable) count in the unlabeled batch size only,
    FixMatch's mean over the whole unlabeled batch.
    """
    labeled, hard = code == LABELED, code == HARD
    n_u = max(int((~labeled).sum()), 1)
    zero = logits.sum() * 0.0
    l_s = logit_adjusted_ce(logits[labeled], target[labeled], prior, cfg.tau).mean() if labeled.any() else zero
    l_u = (F.cross_entropy(logits[hard], target[hard], reduction="none") * weight[hard]).sum() / n_u \
        if hard.any() else zero
    loss = l_s + cfg.lambda_u * l_u
    return loss, {"loss": float(loss.detach()), "loss_s": float(l_s.detach()), "loss_hard": float(l_u.detach())}


loss = fixmatch_loss
