"""FixMatch (Sohn et al. 2020) as SPEC Decision 6 runs it: hard pseudo-labels where the teacher's MSP reaches
c_hard (0.95), plain cross-entropy, no soft band.

FixMatch is LoFT's loss under FixMatch's settings (METHODS["fixmatch"].defaults), not a loss of its own: with
c_ood = c_hard the shared decision rule leaves no soft row (`fixmatch_mask`), lambda_uc = 0 and tau = 0, so
L = CE(z_x, y) + lambda_u * (1 / mu B) sum_j 1[q_j >= c_hard] CE(z_s_j, yhat_j).
"""

from __future__ import annotations

import torch

from loft_dist.algorithms.base import ClassifierMethod
from loft_dist.algorithms.loft import HARD, loft_loss, pseudo_label_decision


def fixmatch_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """1[max_c p_c >= threshold] as a float mask (the decision rule with no soft band)."""
    return (pseudo_label_decision(probs, threshold, threshold)["code"] == HARD).float()


fixmatch_loss = loft_loss
METHOD = ClassifierMethod(loft_loss)
