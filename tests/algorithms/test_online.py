"""The online step's pseudo-labelling: teacher on the weak view (detached), student rows = labeled + strong view."""

import torch

from loft_dist.algorithms import method_of
from loft_dist.algorithms.loft import HARD, LABELED, REJECTED, SOFT
from loft_dist.config import load_config
from loft_dist.data.pseudo_labels import IGNORED
from loft_dist.train.loop import online_batch


def test_online_batch_pseudo_labels_the_weak_view_and_trains_the_strong_view():
    a = load_config(None, ["algorithm.name=loft_ow", "algorithm.mode=online"]).algorithm  # c_hard .6, c_ood .3
    labeled = {"image": torch.zeros(1, 1), "code": torch.tensor([LABELED]), "target": torch.tensor([1]),
               "weight": torch.ones(1), "soft": torch.zeros(1, 2)}
    pool = {"image_weak": torch.zeros(3, 1), "image": torch.zeros(3, 1), "ok": torch.tensor([1, 1, 0])}
    # rows: labeled | weak x3 | strong x3; weak softmaxes: [.8,.2] hard, [.5,.5] soft, [.9,.1] undecodable
    logits = torch.log(torch.tensor([[1.0, 1.0], [0.8, 0.2], [0.5, 0.5], [0.9, 0.1],
                                     [0.1, 0.9], [0.2, 0.8], [0.3, 0.7]])).requires_grad_()
    seen = {}

    def engine(images):
        seen["n"] = len(images)
        return logits * 1.0

    out, code, target, weight, soft = online_batch(engine, method_of(a), a, labeled, pool, "cpu")
    assert seen["n"] == 7  # one forward over labeled, weak and strong
    assert torch.allclose(out, logits[[0, 4, 5, 6]])  # the student sees labeled + strong rows
    assert code.tolist() == [LABELED, HARD, SOFT, IGNORED]
    assert target.tolist() == [1, 0, 0, 0]
    assert weight.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert torch.allclose(soft[1:], torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.9, 0.1]]))
    assert not soft.requires_grad  # the teacher's targets carry no gradient
    # c_ood rejects low-MSP rows: [.5, .5] is rejected at c_ood 0.5 (q <= c_ood)
    a.c_ood = 0.5
    assert online_batch(engine, method_of(a), a, labeled, pool, "cpu")[1].tolist()[2] == REJECTED


def test_online_batch_without_pool_rows_trains_the_labeled_rows():
    a = load_config(None, ["algorithm.mode=online"]).algorithm
    labeled = {"image": torch.zeros(2, 1), "code": torch.tensor([LABELED, LABELED]), "target": torch.tensor([1, 0]),
               "weight": torch.ones(2), "soft": torch.zeros(2, 2)}
    out, code, target, _, _ = online_batch(lambda x: torch.zeros(len(x), 2), method_of(a), a, labeled, None, "cpu")
    assert out.shape == (2, 2) and code.tolist() == [LABELED, LABELED] and target.tolist() == [1, 0]
