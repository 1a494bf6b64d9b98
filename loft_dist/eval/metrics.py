"""Evaluation metrics for loft_dist (SPEC PART F, Decision 7): classification, OOD, pseudo-labels.

Pure numpy. Every returned value is a plain Python int/float/str/list/dict or None — never NaN —
so a result can be written with ``json.dumps(..., allow_nan=False)``.
"""

from __future__ import annotations

import numpy as np

from loft_dist.data.decisions import DECISIONS  # noqa: E402 - one vocabulary of decisions
ACCEPTED = ("hard", "soft")


# --------------------------------------------------------------------------------------------
# small helpers (one per concept)
# --------------------------------------------------------------------------------------------
def _ratio(num, den):
    """num / den as a float, or None when den == 0."""
    return float(num) / float(den) if den else None


def _mean_or_none(values):
    """Mean of the non-None values, or None when there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _harmonic_mean(values):
    """Harmonic mean of non-negative values (0 if any is 0), or None when empty."""
    if not values:
        return None
    return 0.0 if min(values) == 0 else float(len(values) / sum(1.0 / v for v in values))


def _per_class_accuracy(y_true, y_pred, num_classes):
    """Recall of each class c = share of test samples with true == c predicted c; None if absent."""
    support = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    return [_ratio(hits[c], support[c]) for c in range(num_classes)]


def _macro_f1(y_true, y_pred):
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over classes in y_true ∪ y_pred
    (sklearn's ``f1_score(average="macro")`` convention: a class with TP = 0 scores 0)."""
    labels = np.union1d(y_true, y_pred)
    if labels.size == 0:
        return None
    f1 = []
    for c in labels:
        tp = np.sum((y_true == c) & (y_pred == c))
        fp = np.sum((y_true != c) & (y_pred == c))
        fn = np.sum((y_true == c) & (y_pred != c))
        f1.append(2.0 * tp / (2.0 * tp + fp + fn))
    return float(np.mean(f1))


def _group(classes, per_class_acc):
    """Summary of a group of classes: mean of their per-class accuracies (classes without test
    samples ignored); an empty group has accuracy None and empty True."""
    classes = [int(c) for c in classes]
    return {
        "classes": classes,
        "accuracy": _mean_or_none(per_class_acc[c] for c in classes),
        "empty": len(classes) == 0,
    }


def _frequency_groups(labeled_counts, many_threshold, few_threshold):
    """Many / Medium / Few classes by labeled count: > many, [few, many], < few (LoFT code)."""
    classes = np.arange(len(labeled_counts))
    return {
        "many": classes[labeled_counts > many_threshold],
        "medium": classes[(labeled_counts >= few_threshold) & (labeled_counts <= many_threshold)],
        "few": classes[labeled_counts < few_threshold],
    }


def _tertile_groups(labeled_counts):
    """Head / mid / tail: classes sorted by labeled count (descending, ties by class index) and
    split into 3 nearly equal parts (sizes differ by at most 1; none empty when C >= 3)."""
    order = np.argsort(-np.asarray(labeled_counts), kind="stable")
    head, mid, tail = np.array_split(order, 3)
    return {"head": np.sort(head), "mid": np.sort(mid), "tail": np.sort(tail)}


def _calibration(confidence, correct, n_bins):
    """ECE and reliability-diagram data with ``n_bins`` equal-width bins over [0, 1].

    Bin b covers (lo, hi] (the first bin also holds 0). ECE = Σ_b (n_b / N) |acc_b − conf_b|.
    Returns (ece, bins) where each bin is {"lo","hi","count","confidence","accuracy"}, with
    confidence/accuracy None for an empty bin; ece is None when there are no samples.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    n = len(confidence)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        conf = float(confidence[mask].mean()) if count else None
        acc = float(correct[mask].mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": conf, "accuracy": acc})
    return (float(ece) if n else None), bins


def _auroc(pos_scores, neg_scores):
    """P(score_pos > score_neg) + ½ P(score_pos = score_neg) via average ranks (Mann–Whitney U)."""
    scores = np.concatenate([pos_scores, neg_scores])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: (#smaller) + (count + 1) / 2
    avg_rank = np.cumsum(counts) - counts + (counts + 1) / 2.0
    rank_sum_pos = avg_rank[inverse[: len(pos_scores)]].sum()
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_precision(pos_scores, neg_scores):
    """AP = Σ_k (R_k − R_{k−1}) P_k over distinct score thresholds, descending (step-wise, no
    interpolation — sklearn's ``average_precision_score``)."""
    scores = np.concatenate([pos_scores, neg_scores])
    labels = np.concatenate([np.ones(len(pos_scores)), np.zeros(len(neg_scores))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # last index of each run of tied scores = one threshold
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[last]
    precision = tp / (last + 1)
    recall = tp / len(pos_scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _fpr_at_tpr(pos_scores, neg_scores, tpr=0.95):
    """Share of negatives with score >= t, where t is the highest threshold whose TPR (share of
    positives with score >= t) is >= ``tpr``: the k-th largest positive score, k = ceil(tpr·n)."""
    n_pos = len(pos_scores)
    k = max(1, int(np.ceil(round(tpr * n_pos, 9))))  # round() guards 0.95·20 = 18.999…
    threshold = np.sort(pos_scores)[::-1][k - 1]
    return float(np.mean(neg_scores >= threshold))


# --------------------------------------------------------------------------------------------
# public metrics
# --------------------------------------------------------------------------------------------
def classification_metrics(y_true, y_pred, msp, labeled_counts, many_threshold=100,
                           few_threshold=20, ece_bins=15) -> dict:
    """Top-1, balanced and per-class accuracy, macro-F1, Many/Medium/Few and tertile group
    accuracies (by labeled class counts), ECE and reliability-diagram bins.

    ``y_true``/``y_pred``: int class ids (N,); ``msp``: max softmax probability (N,) or None (then
    ece None and reliability []); ``labeled_counts``: labeled images per class (C,), which also
    fixes the number of classes. Class-averaged numbers use only classes present in ``y_true``.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    labeled_counts = np.asarray(labeled_counts).reshape(-1)
    num_classes = len(labeled_counts)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= num_classes):
        raise ValueError(f"y_true has labels outside [0, {num_classes})")

    n = int(y_true.size)
    correct = y_true == y_pred
    per_class = _per_class_accuracy(y_true, y_pred, num_classes)
    present = [a for a in per_class if a is not None]
    if msp is None:
        ece, reliability = None, []
    else:
        msp = np.asarray(msp, dtype=np.float64).reshape(-1)
        if msp.shape != y_true.shape:
            raise ValueError(f"msp {msp.shape} and y_true {y_true.shape} differ in shape")
        ece, reliability = _calibration(msp, correct, ece_bins)
    groups = _frequency_groups(labeled_counts, many_threshold, few_threshold)
    return {
        "n": n,
        "accuracy": float(correct.mean()) if n else None,
        "balanced_accuracy": _mean_or_none(present),
        "macro_f1": _macro_f1(y_true, y_pred),
        "per_class_accuracy": per_class,
        "worst_class_accuracy": float(min(present)) if present else None,
        "harmonic_mean_accuracy": _harmonic_mean(present),
        "geometric_mean_accuracy": float(np.prod(present) ** (1.0 / len(present))) if present else None,
        "groups": {name: _group(cls, per_class) for name, cls in groups.items()},
        "tertiles": {name: _group(cls, per_class)
                     for name, cls in _tertile_groups(labeled_counts).items()},
        "ece": ece,
        "reliability": reliability,
    }


def ood_metrics(score_id, score_ood) -> dict:
    """AUROC, AUPR-in, AUPR-out and FPR@95%TPR for an ID-vs-OOD score (higher = more ID, e.g. MSP).

    AUROC counts ties as ½; AUPR is average precision (ID positive with ``score`` for aupr_in,
    OOD positive with ``-score`` for aupr_out); FPR95 is the share of OOD scoring >= the threshold
    at which ID recall first reaches 0.95. All None when either side is empty.
    """
    score_id = np.asarray(score_id, dtype=np.float64).reshape(-1)
    score_ood = np.asarray(score_ood, dtype=np.float64).reshape(-1)
    out = {"n_id": int(score_id.size), "n_ood": int(score_ood.size)}
    if score_id.size == 0 or score_ood.size == 0:
        return {**out, "auroc": None, "aupr_in": None, "aupr_out": None, "fpr95": None}
    return {
        **out,
        "auroc": _auroc(score_id, score_ood),
        "aupr_in": _average_precision(score_id, score_ood),
        "aupr_out": _average_precision(-score_ood, -score_id),
        "fpr95": _fpr_at_tpr(score_id, score_ood, 0.95),
    }


def pseudo_label_metrics(decision, pred, true_label, num_classes) -> dict:
    """Quality of a pseudo-labelling round: decision counts, coverage, precision (overall, hard,
    soft, per class), per-class recall and how many true-OOD images were admitted.

    ``decision``: strings among hard/soft/ood/rejected; ``pred``: predicted class ids;
    ``true_label``: true class ids with -1 for true OOD images, or None (then only counts).
    Coverage = accepted ID images / ID images. Precision counts admitted OOD images as wrong.
    """
    decision = np.asarray(decision).astype(str).reshape(-1)
    unknown = set(np.unique(decision)) - set(DECISIONS)
    if unknown:
        raise ValueError(f"unknown decisions {sorted(unknown)}; expected {DECISIONS}")
    accepted = np.isin(decision, ACCEPTED)
    out = {
        "n": int(decision.size),
        "counts": {d: int(np.sum(decision == d)) for d in DECISIONS},
        "accepted": int(accepted.sum()),
    }
    if true_label is None:
        return out

    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    true_label = np.asarray(true_label, dtype=np.int64).reshape(-1)
    if not (pred.shape == true_label.shape == decision.shape):
        raise ValueError("decision, pred and true_label must have the same length")
    is_id = true_label >= 0
    right = pred == true_label  # False for every true-OOD row (true_label == -1)
    hard, soft = decision == "hard", decision == "soft"
    ood_total = int((~is_id).sum())
    ood_admitted = int((accepted & ~is_id).sum())
    return {
        **out,
        "id_total": int(is_id.sum()),
        "coverage": _ratio((accepted & is_id).sum(), is_id.sum()),
        "precision": _ratio((accepted & right).sum(), accepted.sum()),
        "hard_precision": _ratio((hard & right).sum(), hard.sum()),
        "soft_precision": _ratio((soft & right).sum(), soft.sum()),
        "ood_admitted": ood_admitted,
        "ood_total": ood_total,
        "ood_rejected_rate": _ratio(ood_total - ood_admitted, ood_total),
        "precision_per_class": [
            _ratio((accepted & (pred == c) & (true_label == c)).sum(), (accepted & (pred == c)).sum())
            for c in range(num_classes)
        ],
        "recall_per_class": [
            _ratio((accepted & (pred == c) & (true_label == c)).sum(), (true_label == c).sum())
            for c in range(num_classes)
        ],
        # accepted (right or wrong) by TRUE class: how much of each class the round used at all
        "coverage_per_class": [_ratio((accepted & (true_label == c)).sum(), (true_label == c).sum())
                               for c in range(num_classes)],
        "accepted_per_class": [int((accepted & (pred == c)).sum()) for c in range(num_classes)],
    }
