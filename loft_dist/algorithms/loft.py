"""LoFT / LoFT-OW (SPEC A.0.2, A.2, A.3): the logit-adjusted supervised loss, the MSP pseudo-label decision
(hard / soft / rejected, plus stage-1 zero-shot OOD), and the hard / soft pseudo-label losses.

The decision rule is `pseudo_label_decision`: the scorer (offline rounds) calls it, and so does any
per-step (online) loop. Decision codes travel as small ints inside batches and as strings in tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loft_dist.algorithms.base import ClassifierMethod
from loft_dist.data.decisions import DECISIONS, HARD, LABELED, OOD, REJECTED, SOFT  # noqa: F401 - re-exported


def logit_adjusted_ce(logits: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-sample CE(z + tau * log(pi), y); pi = labeled class prior (Menon et al.; SPEC L_x)."""
    return F.cross_entropy(logits + tau * torch.log(prior.clamp_min(1e-12)), targets, reduction="none")


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-sample CE against a full soft target distribution p: -sum_c p_c log softmax(z)_c."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def zero_shot_keep(zs_msp: torch.Tensor, threshold: float, keep: str = "above") -> torch.Tensor:
    """Stage-1 filter of LoFT-OW: keep samples whose zero-shot MSP is >= threshold ("above") or < it ("below")."""
    return zs_msp >= threshold if keep == "above" else zs_msp < threshold


def stage1_kept_ids(zs_table: str, cfg):
    """Pool ids that pass LoFT-OW's stage-1 zero-shot filter in the round-0 table; None when the filter is off."""
    a = cfg.algorithm
    if not a.zs_filter:
        return None
    import numpy as np

    from loft_dist.data.pseudo_labels import read_columns

    z = read_columns(zs_table, ["id", "zs_msp"])
    return z["id"][zero_shot_keep(torch.from_numpy(z["zs_msp"].astype(np.float32)), a.zs_threshold, a.zs_keep).numpy()]


def pseudo_label_decision(probs: torch.Tensor, c_hard: float, c_ood: float, soft_weight: str = "one",
                          keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three MSP bands of SPEC A.2 step 4 on teacher probabilities p (N, C).

    q = max_c p_c >= c_hard → hard (target argmax p, weight 1); c_ood < q < c_hard → soft (target p,
    weight 1, or q with soft_weight="msp"); q <= c_ood → rejected (weight 0), unless q >= c_hard: c_ood = c_hard
    is FixMatch's mask 1[q >= c_hard] with no soft band. Rows with keep == False (stage-1 zero-shot filter)
    are `ood` (weight 0) whatever their MSP.
    """
    msp, pred = probs.max(dim=-1)
    code = torch.full_like(pred, SOFT)
    code[msp <= c_ood] = REJECTED  # c_ood = 0 rejects nothing
    code[msp >= c_hard] = HARD  # after REJECTED: with c_ood = c_hard (FixMatch) the tie q = c_hard is hard
    if keep is not None:
        code[~keep] = OOD
    weight = torch.zeros_like(msp)
    weight[code == HARD] = 1.0
    weight[code == SOFT] = msp[code == SOFT] if soft_weight == "msp" else 1.0
    return {"pred": pred, "msp": msp, "code": code, "weight": weight}


def loft_loss(logits: torch.Tensor, code: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
              soft_target: torch.Tensor, prior: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_s + lambda_u * L_hard + lambda_uc * L_soft over one batch mixing labeled and pseudo-labeled rows.

    L_s is the mean logit-adjusted CE over the labeled rows; both unlabeled terms are sums over their rows
    divided by the number of unlabeled rows in the batch (SPEC: normalised by the whole unlabeled batch).
    """
    labeled = code == LABELED
    hard, soft = code == HARD, code == SOFT
    n_u = max(int((~labeled).sum()), 1)
    zero = logits.sum() * 0.0  # keeps the graph connected when a term has no rows
    l_s = logit_adjusted_ce(logits[labeled], target[labeled], prior, cfg.tau).mean() if labeled.any() else zero
    l_hard = (F.cross_entropy(logits[hard], target[hard], reduction="none") * weight[hard]).sum() / n_u \
        if hard.any() else zero
    l_soft = (soft_cross_entropy(logits[soft], soft_target[soft]) * weight[soft]).sum() / n_u if soft.any() else zero
    loss = l_s + cfg.lambda_u * l_hard + cfg.lambda_uc * l_soft
    return loss, {"loss": float(loss.detach()), "loss_s": float(l_s.detach()), "loss_hard": float(l_hard.detach()),
                  "loss_soft": float(l_soft.detach())}


METHOD = ClassifierMethod(loft_loss)
