"""ULFine (reconstructed) pieces against values worked out by hand: DLF rules, orthogonality loss, PAF's alpha_k and
momentum update, the combined loss, the per-step PAF with its P_u statistic, and the checkpoint round trip."""

import math

import pytest
import numpy as np
import torch
import torch.nn as nn

from loft_dist.algorithms import inference_logits, load_model, method_of
from loft_dist.algorithms.loft import HARD, LABELED, REJECTED, loft_loss
from loft_dist.algorithms.ulfine import after_step, logits_for, paf_alpha, prototype_adaptive_fitting, ulfine_loss
from loft_dist.models.ulfine import ULFINE_FILE, fuse_logits, orthogonality_loss
from loft_dist.config import load_config


def ulfine_cfg(*overrides):
    return load_config(None, ["algorithm.name=ulfine", *overrides]).algorithm


def test_dual_logit_fusion_rules():
    zt, zl = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert fuse_logits(zt, zl, "sum").tolist() == [[1.0, 2.0]]
    assert torch.allclose(fuse_logits(zt, zl, "weighted", 0.25), torch.tensor([[0.75, 0.5]]))
    # prob: log(0.5 softmax([1, 0]) + 0.5 softmax([0, 2]))
    e = math.e
    p = [0.5 * e / (e + 1) + 0.5 / (1 + e ** 2), 0.5 / (e + 1) + 0.5 * e ** 2 / (1 + e ** 2)]
    assert torch.allclose(fuse_logits(zt, zl, "prob", 0.5), torch.log(torch.tensor([p])), atol=1e-6)
    assert torch.allclose(torch.softmax(fuse_logits(zt, zl, "prob", 0.5), -1), torch.tensor([p]), atol=1e-6)
    # the ends of the prob rule are one head alone
    assert torch.allclose(fuse_logits(zt, zl, "prob", 0.0), torch.log_softmax(zt, -1))
    assert torch.allclose(fuse_logits(zt, zl, "prob", 1.0), torch.log_softmax(zl, -1))
    with pytest.raises(ValueError, match="dlf.rule"):
        fuse_logits(zt, zl, "max")


def test_fused_logits_are_used_where_dlf_use_for_says():
    out = {"text": torch.tensor([[1.0, 0.0]]), "lin": torch.tensor([[0.0, 2.0]])}
    cfg = ulfine_cfg()  # default: pseudo_label and test
    assert logits_for(out, "pseudo_label", cfg).tolist() == [[1.0, 2.0]]
    assert logits_for(out, "test", cfg).tolist() == [[1.0, 2.0]]
    assert logits_for(out, "train", cfg).tolist() == [[1.0, 0.0]]
    cfg = ulfine_cfg("algorithm.dlf.use_for=[train]")
    assert logits_for(out, "test", cfg).tolist() == [[1.0, 0.0]]


def test_orthogonality_loss():
    # rows [1,0] and [1,1]/√2: Gram off-diagonals 1/√2 → ||G - I||_F^2 = 2 * 1/2 = 1
    assert math.isclose(float(orthogonality_loss(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))), 1.0, rel_tol=1e-6)
    assert float(orthogonality_loss(torch.eye(3) * 5)) == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert math.isclose(float(orthogonality_loss(torch.tensor([[2.0, 0.0], [3.0, 0.0]]))), 2.0, rel_tol=1e-6)


def test_paf_alpha():
    assert torch.allclose(paf_alpha(torch.tensor([4.0, 2.0, 0.0, 1.0]), 0.1), torch.tensor([0.1, 0.05, 0.0, 0.025]))
    assert paf_alpha(torch.zeros(3), 0.1).tolist() == [0.0, 0.0, 0.0]  # no pseudo-label yet: no move


def test_prototype_adaptive_fitting_momentum_update():
    protos = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    feat_sum = torch.tensor([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])  # class 0: two rows at [0, 1]; class 2: one at [1, 0]
    count = torch.tensor([2.0, 0.0, 1.0])
    alpha = torch.tensor([0.5, 0.5, 0.25])
    new = prototype_adaptive_fitting(protos, feat_sum, count, alpha)
    # class 0: 0.5 [2, 0] + 0.5 * ||[2, 0]|| * [0, 1] = [1, 1]; class 1: no labeled row, unchanged;
    # class 2: 0.75 [1, 1] + 0.25 * √2 * [1, 0]
    want = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.75 + 0.25 * math.sqrt(2), 0.75]])
    assert torch.allclose(new, want, atol=1e-6)


class _Stub(nn.Module):
    def __init__(self, prototypes):
        super().__init__()
        self.register_buffer("pu", torch.zeros(len(prototypes)))
        self.register_buffer("paf_shift", torch.zeros_like(prototypes))
        self.step_prototypes = prototypes
        self.pu_fixed = False


def test_after_step_counts_confident_pseudo_labels_and_moves_prototypes():
    cfg = ulfine_cfg("algorithm.paf.momentum=0.5")
    model = _Stub(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = {"feat": torch.tensor([[0.0, 3.0], [5.0, 5.0], [1.0, 1.0]])}
    code = torch.tensor([LABELED, HARD, REJECTED])
    target = torch.tensor([0, 0, 1])
    soft = torch.tensor([[0.0, 0.0], [0.7, 0.3], [0.4, 0.6]])
    after_step(model, out, code, target, soft, cfg)
    # P_u = [1, 0] (one hard label of class 0) → alpha = [0.5, 0]; class 0's labeled feature is [0, 1]:
    # c_0 = 0.5 [1, 0] + 0.5 [0, 1]; class 1 has no labeled row
    assert model.pu.tolist() == [1.0, 0.0]
    assert torch.allclose(model.paf_shift, torch.tensor([[-0.5, 0.5], [0.0, 0.0]]))
    after_step(model, out, code, target, soft, cfg)
    assert model.pu.tolist() == [2.0, 0.0]  # summed over the round

    cfg = ulfine_cfg("algorithm.paf.momentum=0.5", "algorithm.paf.stat=mean_conf")
    model = _Stub(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    after_step(model, out, code, target, soft, cfg)
    assert torch.allclose(model.pu, torch.tensor([1.1, 0.9]))  # teacher mass of both pool rows
    assert torch.allclose(model.paf_shift[0], torch.tensor([-0.5, 0.5]))  # alpha_0 = 0.5 * 1.1 / 1.1


def test_offline_rounds_take_p_u_from_the_whole_table_not_the_rows_streamed(tmp_path):
    import pyarrow as pa

    from loft_dist.algorithms.ulfine import start_round
    from loft_dist.data.pseudo_labels import class_statistics, commit_table

    # a table of 5 pool rows (one stage-1 ood row, which is never in the pool) with top-2 probabilities
    staged = tmp_path / "staged"
    staged.mkdir()
    lists = lambda rows, t: pa.array(rows, type=pa.list_(t))  # noqa: E731
    pa.parquet.write_table(pa.table({
        "id": [1, 2, 3, 4, 5], "decision": ["hard", "hard", "soft", "rejected", "ood"], "pred": [1, 1, 0, 2, 0],
        "probs": lists([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5], [0.4, 0.6], [1.0, 0.0]], pa.float32()),
        "probs_idx": lists([[1, 0], [1, 2], [0, 1], [2, 0], [0, 1]], pa.int32())}), staged / "part-0.parquet")
    commit_table(staged, tmp_path / "table")
    stats = class_statistics(tmp_path / "table", 3)
    assert stats["pl_count"] == [0.0, 2.0, 0.0]
    np.testing.assert_allclose(stats["mean_conf"], [0.1 + 0.5 + 0.6, 0.9 + 0.8 + 0.5, 0.2 + 0.4], rtol=1e-6)

    cfg = ulfine_cfg("algorithm.paf.momentum=0.5")
    model = _Stub(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    start_round(model, {"pl_count": [4.0, 2.0, 0.0], "mean_conf": [1.0, 1.0, 1.0]}, cfg)
    out = {"feat": torch.tensor([[0.0, 3.0], [5.0, 5.0]])}
    # the step's hard row is of class 2; P_u stays the table's, so alpha = 0.5 * [1, .5, 0]
    after_step(model, out, torch.tensor([LABELED, HARD]), torch.tensor([0, 2]), torch.zeros(2, 3), cfg)
    assert model.pu.tolist() == [4.0, 2.0, 0.0]
    assert torch.allclose(model.paf_shift[0], torch.tensor([-0.5, 0.5]))  # alpha_0 = 0.5 from the table's counts


def test_ulfine_loss_is_per_head_losses_plus_weighted_orthogonality():
    cfg = ulfine_cfg("algorithm.c_hard=0.6", "algorithm.c_ood=0.3", "algorithm.lambda_uc=1.0")
    z_t = torch.log(torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0]]))
    z_l = torch.log(torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]))
    out = {"text": z_t, "lin": z_l, "orth": torch.tensor(2.0)}
    code = torch.tensor([LABELED, HARD, 1])
    target = torch.tensor([0, 1, 0])
    weight = torch.ones(3)
    soft = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    prior = torch.tensor([0.5, 0.5])
    loss, parts = ulfine_loss(out, code, target, weight, soft, prior, cfg)
    want = float(loft_loss(z_t, code, target, weight, soft, prior, cfg)[0]) + \
        float(loft_loss(z_l, code, target, weight, soft, prior, cfg)[0]) + 0.1 * 2.0
    assert math.isclose(float(loss), want, rel_tol=1e-6) and parts["loss_orth"] == 2.0
    cfg = ulfine_cfg("algorithm.dlf.use_for=[train]", "algorithm.paf.orth_weight=0")
    loss, _ = ulfine_loss(out, code, target, weight, soft, prior, cfg)
    assert math.isclose(float(loss), float(loft_loss(z_t + z_l, code, target, weight, soft, prior, cfg)[0]),
                        rel_tol=1e-6)


def test_checkpoint_round_trip_keeps_linear_head_and_paf_shift(tmp_path):
    full = load_config(None, ["algorithm.name=ulfine"])
    classes = [f"c{i}" for i in range(4)]
    model = load_model(full, classes, None)
    assert model.linear.weight.abs().sum() == 0  # zero init: fused logits start as the text head's
    torch.manual_seed(0)
    with torch.no_grad():
        model.linear.weight.normal_()
        model.linear.bias.normal_()
        model.paf_shift.normal_()
        model.clip.head.weight.add_(1.0)
    method_of(full.algorithm).save(model, tmp_path, {"epoch": 0})
    assert (tmp_path / ULFINE_FILE).is_file() and (tmp_path / "head.safetensors").is_file()
    again = load_model(full, classes, str(tmp_path))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for purpose in ("pseudo_label", "test"):
            assert torch.allclose(inference_logits(full.algorithm, model.eval(), x, purpose),
                                  inference_logits(full.algorithm, again, x, purpose), atol=1e-5)
    # a checkpoint of another method has no linear head: say so
    loft = load_config(None, [])
    method_of(loft.algorithm).save(load_model(loft, classes, None), tmp_path / "loft")
    with pytest.raises(FileNotFoundError, match="algorithm.name=ulfine"):
        load_model(full, classes, str(tmp_path / "loft"))
