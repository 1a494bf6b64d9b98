"""The LoFT losses and decision rule against values worked out by hand."""

import math

import torch

from loft_dist.algorithms.loft import (HARD, LABELED, OOD, REJECTED, SOFT, logit_adjusted_ce, loft_loss,
                                       pseudo_label_decision, soft_cross_entropy, zero_shot_keep)
from loft_dist.config import AlgorithmConfig


def test_logit_adjusted_ce_with_known_prior():
    # z = [0, 0], prior = [0.8, 0.2], tau = 1 → z' = [ln 0.8, ln 0.2]; softmax(z') = prior; CE(y=1) = -ln 0.2
    z = torch.zeros(1, 2)
    prior = torch.tensor([0.8, 0.2])
    assert math.isclose(float(logit_adjusted_ce(z, torch.tensor([1]), prior, 1.0)), -math.log(0.2), rel_tol=1e-6)
    # tau = 0 is plain CE: -ln 0.5
    assert math.isclose(float(logit_adjusted_ce(z, torch.tensor([1]), prior, 0.0)), math.log(2), rel_tol=1e-6)


def test_three_msp_bands_and_zero_shot_filter():
    probs = torch.tensor([
        [0.70, 0.20, 0.10],  # q = 0.70 >= 0.6 → hard, pred 0
        [0.60, 0.30, 0.10],  # q = 0.60 == c_hard → hard (>=)
        [0.10, 0.45, 0.45],  # q = 0.45 in (0.3, 0.6) → soft; argmax ties → first max index 1
        [0.30, 0.35, 0.35],  # q = 0.35 → soft
        [0.30, 0.30, 0.40],  # q = 0.40 → soft, but stage-1 says OOD below
        [0.34, 0.33, 0.33],  # q = 0.34 → soft
        [1 / 3, 1 / 3, 1 / 3],  # q = 0.333 → soft
        [0.3, 0.3, 0.3],  # q = 0.30 == c_ood → rejected (<=)
    ])
    keep = torch.tensor([True, True, True, True, False, True, True, True])
    d = pseudo_label_decision(probs, c_hard=0.6, c_ood=0.3, keep=keep)
    assert d["code"].tolist() == [HARD, HARD, SOFT, SOFT, OOD, SOFT, SOFT, REJECTED]
    assert d["pred"][:2].tolist() == [0, 0]
    assert d["weight"].tolist() == [1, 1, 1, 1, 0, 1, 1, 0]
    # soft_weight = msp multiplies each soft term by q
    w = pseudo_label_decision(probs, 0.6, 0.3, soft_weight="msp")["weight"]
    assert torch.allclose(w[2:4], torch.tensor([0.45, 0.35]))
    # c_ood = 0 (closed-world LoFT) rejects nothing
    assert (pseudo_label_decision(probs, 0.6, 0.0)["code"] != REJECTED).all()
    assert zero_shot_keep(torch.tensor([0.5, 0.7]), 0.6).tolist() == [False, True]
    assert zero_shot_keep(torch.tensor([0.5, 0.7]), 0.6, keep="below").tolist() == [True, False]


def test_soft_cross_entropy_against_full_target():
    # z = [ln 1, ln 3] → softmax = [0.25, 0.75]; target p = [0.5, 0.5] → -(0.5 ln .25 + 0.5 ln .75)
    z = torch.log(torch.tensor([[1.0, 3.0]]))
    want = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert math.isclose(float(soft_cross_entropy(z, torch.tensor([[0.5, 0.5]]))), want, rel_tol=1e-6)


def test_loft_loss_combines_terms_normalised_by_unlabeled_count():
    cfg = AlgorithmConfig(lambda_u=3.0, lambda_uc=1.0, tau=1.0)
    z = torch.log(torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0], [1.0, 1.0]]))
    code = torch.tensor([LABELED, HARD, SOFT, REJECTED])
    target = torch.tensor([0, 1, 0, 0])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])
    soft = torch.tensor([[0, 0], [0, 0], [0.5, 0.5], [0, 0]], dtype=torch.float32)
    prior = torch.tensor([0.5, 0.5])
    loss, parts = loft_loss(z, code, target, weight, soft, prior, cfg)
    l_s = math.log(2)  # uniform prior: LA is a constant shift; softmax [.5,.5], CE = ln 2
    l_hard = -math.log(0.75) / 3  # one hard row, 3 unlabeled rows in the batch
    l_soft = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) / 3
    assert math.isclose(parts["loss_s"], l_s, rel_tol=1e-5)
    assert math.isclose(parts["loss_hard"], l_hard, rel_tol=1e-5)
    assert math.isclose(parts["loss_soft"], l_soft, rel_tol=1e-5)
    assert math.isclose(float(loss), l_s + 3 * l_hard + l_soft, rel_tol=1e-5)


def test_stage1_kept_ids_read_the_zero_shot_table(tmp_path):
    """Online LoFT-OW's pool is the round-0 rows whose zero-shot MSP passes zs_threshold; the filter off keeps all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loft_dist.algorithms.loft import stage1_kept_ids
    from loft_dist.config import load_config

    pq.write_table(pa.table({"id": [5, 7, 9, 11], "zs_msp": [0.9, 0.59, 0.6, 0.1]}), tmp_path / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("{}")
    ow = load_config(None, ["algorithm.name=loft_ow", "algorithm.mode=online"])  # zs_threshold 0.6, keep above
    assert sorted(stage1_kept_ids(str(tmp_path), ow).tolist()) == [5, 9]
    below = load_config(None, ["algorithm.name=loft_ow", "algorithm.mode=online", "algorithm.zs_keep=below"])
    assert sorted(stage1_kept_ids(str(tmp_path), below).tolist()) == [7, 11]
    assert stage1_kept_ids(str(tmp_path), load_config(None, ["algorithm.mode=online"])) is None  # loft: no filter
