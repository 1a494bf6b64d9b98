import numpy as np
import pytest

from loft_dist.data.protocol import long_tail_counts, split_long_tailed, unlabeled_counts


def test_long_tail_counts_match_hand_computed_values():
    # n_c = int(N1 * gamma^(-c/(C-1))): C=3, N1=100, gamma=100 → 100, floor(100/10)=10, floor(100/100)=1
    assert long_tail_counts(100, 100, 3) == [100, 10, 1]
    # C=5, N1=50, gamma=10: 50*10^(-k/4) for k=0..4 = 50, 28.11.., 15.81.., 8.89.., 5 → 50, 28, 15, 8, 5
    assert long_tail_counts(50, 10, 5) == [50, 28, 15, 8, 5]
    # CIFAR-100-LT N1=50, gamma=10: first 50, last floor(50/10)=5, monotone non-increasing
    c = long_tail_counts(50, 10, 100)
    assert c[0] == 50 and c[-1] == 5 and all(a >= b for a, b in zip(c, c[1:]))


def _released_make_imb_data(max_num, class_num, gamma):
    """The released code's function (DARP/ACR's make_imb_data), line for line."""
    mu = np.power(1 / gamma, 1 / (class_num - 1))
    class_num_list = []
    for i in range(class_num):
        if i == (class_num - 1):
            class_num_list.append(int(max_num / gamma))
        else:
            class_num_list.append(int(max_num * np.power(mu, i)))
    return list(class_num_list)


def test_long_tail_counts_truncate_as_the_released_code_does():
    # float error truncated, not rounded away: 50 * 8^(-33/99) is 24.999… in the released code's arithmetic
    assert long_tail_counts(50, 8, 100)[33] == 24
    for n1 in (1, 4, 50, 150, 500, 1500):
        for gamma in (1, 2, 8, 10, 15, 20, 50, 100, 150):
            for c in (2, 3, 10, 100, 127):
                assert long_tail_counts(n1, gamma, c) == _released_make_imb_data(n1, c, gamma), (n1, gamma, c)


def test_unlabeled_profiles():
    assert unlabeled_counts(400, 10, 5, "consistent") == long_tail_counts(400, 10, 5)
    assert unlabeled_counts(400, 10, 5, "reversed") == long_tail_counts(400, 10, 5)[::-1]
    assert unlabeled_counts(400, 10, 5, "uniform") == [400] * 5


def test_split_counts_disjointness_and_overlap_convention():
    labels = np.repeat(np.arange(3), 30)
    n, m = [10, 5, 2], [8, 4, 3]
    s = split_long_tailed(labels, n, m, test=5, labeled_in_unlabeled=False, seed=0)
    for c in range(3):
        assert (labels[s["labeled"]] == c).sum() == n[c]
        assert (labels[s["unlabeled"]] == c).sum() == m[c]
        assert (labels[s["test"]] == c).sum() == 5
    assert not set(s["labeled"]) & set(s["unlabeled"]) and not set(s["test"]) & set(s["unlabeled"])
    o = split_long_tailed(labels, n, m, test=5, labeled_in_unlabeled=True, seed=0)
    assert set(o["labeled"]) <= set(o["unlabeled"]) and len(o["unlabeled"]) == sum(n) + sum(m)
    again = split_long_tailed(labels, n, m, test=5, labeled_in_unlabeled=False, seed=0)
    assert all((again[k] == s[k]).all() for k in s)


def test_split_names_the_class_that_is_too_small():
    with pytest.raises(ValueError, match="class 1 has 2 images but the protocol needs"):
        split_long_tailed(np.array([0, 0, 0, 1, 1]), [1, 1], [1, 1], test=1, labeled_in_unlabeled=False, seed=0)
