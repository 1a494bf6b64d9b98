"""The labeled/unlabeled split protocols of the papers: per-class counts and index selection.

lt (SPEC D.1, CIFAR-LT): labeled and pool counts fall off geometrically from N1 / M1.
percent (SPEC D.2, ImageNet-127): a fixed share of each class is labeled, the rest is the pool.
"""

from __future__ import annotations

import math

import numpy as np


def long_tail_counts(n1: int, gamma: float, num_classes: int) -> list[int]:
    """The released code's `make_imb_data`: n_c = int(N1 * mu^c) with mu = (1/gamma)^(1/(C-1)) for c < C-1, and
    n_{C-1} = int(N1/gamma); class 0 is the head.

    Truncated as it truncates, float error included (N1 = 50, gamma = 8, C = 100: class 33 is int(24.999…) = 24,
    not the 25 of exact arithmetic), so the splits hold the papers' image counts.
    """
    import numpy as np

    if num_classes == 1:
        return [int(n1)]
    mu = np.power(1 / gamma, 1 / (num_classes - 1))
    return [int(n1 * np.power(mu, c)) for c in range(num_classes - 1)] + [int(n1 / gamma)]


def unlabeled_counts(m1: int, gamma_u: float, num_classes: int, dist: str) -> list[int]:
    """The pool's per-class profile: `consistent` follows the labeled LT order, `reversed` flips it, `uniform` is M1 each."""
    if dist == "uniform":
        return [int(m1)] * num_classes
    counts = long_tail_counts(m1, gamma_u, num_classes)
    return counts[::-1] if dist == "reversed" else counts


def percent_counts(class_sizes: list[int], percent: float) -> tuple[list[int], list[int]]:
    """(labeled, unlabeled) per class: round-half-up(percent/100 * N_c) labeled, at least 1 (a class without
    labels has prior 0 and breaks the logit-adjusted loss); the rest of the class is unlabeled."""
    labeled = [min(n, max(1, int(math.floor(n * percent / 100.0 + 0.5)))) for n in class_sizes]
    return labeled, [n - k for n, k in zip(class_sizes, labeled)]


class ClassTooSmall(ValueError):
    """A class has fewer images than the protocol takes from it; `cls` is its index."""

    def __init__(self, message: str, cls: int):
        super().__init__(message)
        self.cls = cls


def split_long_tailed(labels: np.ndarray, labeled: list[int], unlabeled: list[int], test: int,
                      labeled_in_unlabeled: bool, seed: int) -> dict[str, np.ndarray]:
    """Pick indices per class: the first `test` of a seeded permutation go to test, then labeled, then unlabeled.

    With `labeled_in_unlabeled` (the DARP/ACR code convention) the pool is the first n_c + m_c of the
    class, i.e. it also holds the labeled images. Raises ClassTooSmall naming the class that is too small.
    The seeded permutation (not the papers' "first n_c indices") lets a seed draw another split.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {"labeled": [], "unlabeled": [], "test": []}
    for c, (n_c, m_c) in enumerate(zip(labeled, unlabeled)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        need = test + n_c + m_c
        if len(idx) < need:
            raise ClassTooSmall(f"class {c} has {len(idx)} images but the protocol needs {need} "
                                f"(test {test} + labeled {n_c} + unlabeled {m_c}); lower data.n1 / data.m1 / "
                                f"data.test_per_class", c)
        out["test"].append(idx[:test])
        lab = idx[test:test + n_c]
        out["labeled"].append(lab)
        rest = idx[test + n_c:test + n_c + m_c]
        out["unlabeled"].append(np.concatenate([lab, rest]) if labeled_in_unlabeled else rest)
    return {k: np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64) for k, v in out.items()}
