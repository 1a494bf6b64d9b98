"""FixMatch's mask and loss, and the supervised baselines' loss, against values worked out by hand."""

import math

import torch

from loft_dist.algorithms.fixmatch import fixmatch_loss, fixmatch_mask
from loft_dist.algorithms.loft import HARD, LABELED, REJECTED, SOFT, loft_loss, pseudo_label_decision
from loft_dist.algorithms.supervised import supervised_loss
from loft_dist.config import AlgorithmConfig, load_config


def test_fixmatch_mask_is_msp_at_least_threshold():
    probs = torch.tensor([
        [0.96, 0.02, 0.02],  # q = 0.96 >= 0.95 → 1
        [0.95, 0.03, 0.02],  # q = 0.95 == threshold → 1 (>=)
        [0.94, 0.05, 0.01],  # q = 0.94 → 0
        [0.50, 0.50, 0.00],  # q = 0.50 → 0
    ])
    assert fixmatch_mask(probs, 0.95).tolist() == [1.0, 1.0, 0.0, 0.0]
    # c_ood = c_hard leaves no soft band: the shared rule gives hard or rejected only
    d = pseudo_label_decision(probs, 0.95, 0.95)
    assert d["code"].tolist() == [HARD, HARD, REJECTED, REJECTED]
    assert d["weight"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_fixmatch_loss_plain_ce_plus_masked_hard_ce_over_all_unlabeled():
    cfg = load_config(None, ["algorithm.name=fixmatch"]).algorithm
    assert (cfg.c_hard, cfg.c_ood, cfg.lambda_u, cfg.lambda_uc, cfg.tau) == (0.95, 0.95, 1.0, 0.0, 0.0)
    z = torch.log(torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0], [1.0, 1.0]]))
    code = torch.tensor([LABELED, HARD, REJECTED, REJECTED])
    target = torch.tensor([0, 1, 0, 0])
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0])
    soft = torch.zeros(4, 2)
    prior = torch.tensor([0.8, 0.2])  # tau = 0: the prior does not enter
    loss, parts = fixmatch_loss(z, code, target, weight, soft, prior, cfg)
    l_s = math.log(2)  # softmax [.5, .5], y = 0
    l_u = -math.log(0.75) / 3  # one masked-in row of 3 unlabeled rows
    assert math.isclose(parts["loss_s"], l_s, rel_tol=1e-6)
    assert math.isclose(parts["loss_hard"], l_u, rel_tol=1e-6)
    assert math.isclose(float(loss), l_s + l_u, rel_tol=1e-6)
    # the LoFT loss under FixMatch's defaults is the same number (one family, one decision rule)
    assert math.isclose(float(loft_loss(z, code, target, weight, soft, prior, cfg)[0]), float(loss), rel_tol=1e-6)
    # tau = 1 turns the supervised term into logit adjustment: z' = [ln .8, ln .2] → CE(y=0) = -ln .8
    la = AlgorithmConfig(tau=1.0, lambda_u=1.0)
    assert math.isclose(fixmatch_loss(z, code, target, weight, soft, prior, la)[1]["loss_s"], -math.log(0.8),
                        rel_tol=1e-6)


def test_supervised_loss_uses_labeled_rows_only():
    z = torch.tensor([[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]])
    code = torch.tensor([LABELED, HARD, SOFT])
    target = torch.tensor([1, 1, 0])
    prior = torch.tensor([0.8, 0.2])
    loss, parts = supervised_loss(z, code, target, torch.ones(3), torch.zeros(3, 2), prior, AlgorithmConfig(tau=1.0))
    assert math.isclose(float(loss), -math.log(0.2), rel_tol=1e-6)  # LA: softmax(log prior) = prior
    loss, _ = supervised_loss(z, code, target, torch.ones(3), torch.zeros(3, 2), prior, AlgorithmConfig(tau=0.0))
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
