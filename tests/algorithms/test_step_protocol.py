"""The papers' step (SPEC A.0.2 / A.2 step 5): B labeled rows + mu x B pool rows, and the pool terms divided by the
mu x B pool rows, whatever each row's decision. Offline (the table decided) and online (the weak view decides now)
steps give SPEC's loss on the same batch: hand-worked values, and an independent numpy reading of the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loft_dist.algorithms import method_of
from loft_dist.algorithms.loft import HARD, LABELED, REJECTED, SOFT
from loft_dist.config import load_config
from loft_dist.train.loop import offline_batch, online_batch

B, MU, C = 4, 7, 10
LN10 = math.log(10)


def _identity_engine(x):
    """The model's logits are the `image` rows themselves: the test chooses every logit."""
    return x.float()


def _labeled(logits: torch.Tensor, targets) -> dict:
    n = len(logits)
    return {"image": logits, "code": torch.full((n,), LABELED), "target": torch.as_tensor(targets),
            "weight": torch.ones(n), "soft": torch.zeros(n, C)}


def _offline_pool(logits: torch.Tensor, codes, targets, soft: torch.Tensor, weights=None) -> dict:
    codes = torch.as_tensor(codes)
    w = torch.as_tensor(weights, dtype=torch.float32) if weights is not None else \
        ((codes == HARD) | (codes == SOFT)).float()
    return {"image": logits, "code": codes, "target": torch.as_tensor(targets), "weight": w, "soft": soft}


def _loss(name: str, labeled: dict, pool: dict, *extra: str):
    a = load_config(None, [f"algorithm.name={name}", *extra]).algorithm
    out, code, target, weight, soft = offline_batch(_identity_engine, labeled, pool, "cpu")
    prior = torch.full((C,), 1.0 / C)
    return method_of(a).loss(out, code, target, weight, soft, prior, a)[0].item(), a


def test_fixmatch_with_12_of_28_pool_rows_hard_divides_by_all_28():
    # all logits 0: every CE is ln 10, and with a uniform prior so is the logit-adjusted one
    labeled = _labeled(torch.zeros(B, C), [0, 1, 2, 3])
    codes = [HARD] * 12 + [REJECTED] * 16
    pool = _offline_pool(torch.zeros(MU * B, C), codes, [5] * 28, torch.zeros(28, C))
    loss, a = _loss("fixmatch", labeled, pool, "algorithm.tau=1")
    assert a.lambda_u == 1.0
    # L = L_s + lambda_u * (1 / 28) * 12 * ln 10 = ln 10 * (1 + 12/28) = 3.2894...
    assert loss == pytest.approx(LN10 * (1 + 12 / 28), abs=1e-6)
    assert loss == pytest.approx(3.289407, abs=1e-6)
    assert abs(loss - 2 * LN10) > 1.0  # what dividing by the 12 accepted rows gave (4.6052)


def test_loft_ow_with_1_hard_22_soft_5_rejected_divides_by_all_28():
    labeled = _labeled(torch.zeros(B, C), [0, 1, 2, 3])
    codes = [HARD] + [SOFT] * 22 + [REJECTED] * 5
    soft = torch.softmax(torch.randn(28, C, generator=torch.Generator().manual_seed(0)), -1)
    pool = _offline_pool(torch.zeros(MU * B, C), codes, [3] * 28, soft)
    loss, a = _loss("loft_ow", labeled, pool)
    assert (a.lambda_u, a.lambda_uc) == (3.0, 1.0)
    # zero logits: CE against any distribution p is ln 10 too. L = ln 10 * (1 + 3 * 1/28 + 1 * 22/28) = 4.3585...
    assert loss == pytest.approx(LN10 * (1 + 3 / 28 + 22 / 28), abs=1e-6)
    assert loss == pytest.approx(4.358465, abs=1e-6)


def _spec_loss(zx, y, zs, p_teacher, prior, a, hard_mask, soft_mask) -> float:
    """SPEC A.0.2 in numpy, written from the formula: means over ALL mu x B pool rows."""
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    l_x = -log_softmax(zx + a.tau * np.log(prior))[np.arange(len(y)), y].mean()
    yhat = p_teacher.argmax(axis=1)
    ls = log_softmax(zs)
    l_u = (-ls[np.arange(len(yhat)), yhat] * hard_mask).mean()
    l_uc = (-(p_teacher * ls).sum(axis=1) * soft_mask).mean()
    return float(l_x + a.lambda_u * l_u + a.lambda_uc * l_uc)


@pytest.mark.parametrize("name", ["loft", "loft_ow", "fixmatch"])
def test_offline_and_online_steps_give_spec_loss_on_the_same_batch(name):
    g = torch.Generator().manual_seed(1)
    zx = torch.randn(B, C, generator=g)
    y = torch.tensor([0, 3, 3, 9])
    # weak-view logits spread so that every band occurs (scaled rows are confident, flat rows are not)
    zw = torch.randn(MU * B, C, generator=g) * torch.linspace(0.1, 6.0, MU * B)[:, None]
    zs = torch.randn(MU * B, C, generator=g)
    a = load_config(None, [f"algorithm.name={name}", "algorithm.c_hard=0.6", "algorithm.c_ood=0.3"]
                    + (["algorithm.c_ood=0.6"] if name == "fixmatch" else [])).algorithm
    p = torch.softmax(zw / a.temperature, -1)
    q = p.max(-1).values
    hard = (q >= a.c_hard).numpy()
    soft = ((q > a.c_ood) & (q < a.c_hard)).numpy()
    assert hard.any() and (~hard & ~soft).any() and (name == "fixmatch" or soft.any())
    prior = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03])
    want = _spec_loss(zx.numpy().astype(np.float64), y.numpy(), zs.numpy().astype(np.float64),
                      p.numpy().astype(np.float64), prior.numpy(), a, hard, soft)

    # offline: the table's decisions (computed by the teacher earlier), the strong view in the stream
    codes = np.where(hard, HARD, np.where(soft, SOFT, REJECTED))
    off = offline_batch(_identity_engine, _labeled(zx, y), _offline_pool(zs, codes, p.argmax(-1), p), "cpu")
    got_off = method_of(a).loss(*off, prior, a)[0].item()
    # online: the same weak view decided inside the step
    pool = {"image_weak": zw, "image": zs, "ok": torch.ones(MU * B, dtype=torch.int8)}
    on = online_batch(_identity_engine, method_of(a), a, _labeled(zx, y), pool, "cpu")
    got_on = method_of(a).loss(*on, prior, a)[0].item()
    assert got_off == pytest.approx(want, rel=1e-5) and got_on == pytest.approx(want, rel=1e-5)


def test_top_k_soft_targets_are_scattered_on_the_device():
    labeled = _labeled(torch.zeros(1, C), [0])
    pool = _offline_pool(torch.zeros(2, C), [SOFT, HARD], [1, 2], torch.tensor([[0.75, 0.25], [1.0, 0.0]]))
    pool["soft_idx"] = torch.tensor([[4, 7], [2, 0]])
    _, code, _, _, soft = offline_batch(_identity_engine, labeled, pool, "cpu")
    assert code.tolist() == [LABELED, SOFT, HARD]
    want = torch.zeros(3, C)
    want[1, 4], want[1, 7], want[2, 2] = 0.75, 0.25, 1.0
    assert torch.equal(soft, want)
