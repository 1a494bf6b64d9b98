"""Hand-computed checks for loft_dist.eval.metrics (classification, OOD, pseudo-label)."""

import json
import math

import numpy as np
import pytest

from loft_dist.eval.metrics import classification_metrics, ood_metrics, pseudo_label_metrics


def assert_json_clean(d):
    json.dumps(d, allow_nan=False)  # raises ValueError on NaN/inf, TypeError on numpy ints


# ------------------------------------------------------------------ classification
def test_accuracy_balanced_per_class_worst():
    # class 0: 6 samples, 5 right; class 1: 2 samples, 1 right; class 2: 2 samples, 2 right;
    # class 3: no test samples.
    y_true = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 0, 0, 1, 1, 0, 2, 2]
    m = classification_metrics(y_true, y_pred, None, labeled_counts=[10, 10, 10, 10])
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(8 / 10)  # 5 + 1 + 2 right of 10
    assert m["per_class_accuracy"] == pytest.approx([5 / 6, 1 / 2, 1.0, None])
    assert m["per_class_accuracy"][3] is None
    # balanced = (5/6 + 1/2 + 1) / 3 = (14/6) / 3 = 7/9 ; class 3 is not counted
    assert m["balanced_accuracy"] == pytest.approx(7 / 9)
    assert m["worst_class_accuracy"] == pytest.approx(0.5)
    # harmonic = 3 / (6/5 + 2 + 1) = 3 / 4.2 = 5/7 ; geometric = (5/6 * 1/2 * 1)^(1/3)
    assert m["harmonic_mean_accuracy"] == pytest.approx(5 / 7)
    assert m["geometric_mean_accuracy"] == pytest.approx((5 / 12) ** (1 / 3))
    assert m["ece"] is None and m["reliability"] == []
    assert_json_clean(m)


def test_macro_f1_by_hand_and_vs_sklearn():
    from sklearn.metrics import f1_score

    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 3]
    # class 0: TP 1 (idx0), FP 1 (idx4), FN 1 (idx1) -> F1 = 2/(2+1+1) = 0.5
    # class 1: TP 2 (idx2,3), FP 1 (idx1), FN 0    -> F1 = 4/(4+1)   = 0.8
    # class 2: TP 0, FP 0, FN 2                   -> 0
    # class 3: TP 0, FP 1 (idx5), FN 0            -> 0 (predicted-only class counts, as in sklearn)
    # macro = (0.5 + 0.8 + 0 + 0) / 4 = 0.325
    m = classification_metrics(y_true, y_pred, None, labeled_counts=[5, 5, 5, 5])
    assert m["macro_f1"] == pytest.approx(0.325)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_ece_three_bins():
    # bins (0,1/3], (1/3,2/3], (2/3,1]
    msp = [0.2, 0.5, 0.6, 0.9, 0.8, 0.7]
    y_true = [0, 0, 0, 0, 0, 0]
    y_pred = [1, 0, 1, 0, 0, 1]  # correct = F T F T T F
    # bin0: {0.2}           n=1 conf 0.2  acc 0    gap 0.2
    # bin1: {0.5, 0.6}      n=2 conf 0.55 acc 0.5  gap 0.05
    # bin2: {0.9, 0.8, 0.7} n=3 conf 0.8  acc 2/3  gap 2/15
    # ECE = 1/6*0.2 + 2/6*0.05 + 3/6*2/15 = (0.2 + 0.1 + 0.4)/6 = 7/60
    m = classification_metrics(y_true, y_pred, msp, labeled_counts=[3, 3], ece_bins=3)
    assert m["ece"] == pytest.approx(7 / 60)
    rel = m["reliability"]
    assert [b["count"] for b in rel] == [1, 2, 3]
    assert [b["confidence"] for b in rel] == pytest.approx([0.2, 0.55, 0.8])
    assert [b["accuracy"] for b in rel] == pytest.approx([0.0, 0.5, 2 / 3])
    assert rel[0]["lo"] == 0.0 and rel[2]["hi"] == 1.0
    assert rel[1]["lo"] == pytest.approx(1 / 3) and rel[1]["hi"] == pytest.approx(2 / 3)


def test_ece_empty_bin_is_none():
    # 2 bins: [0,0.5] empty; (0.5,1]: msp 0.9, 0.95, one right -> conf 0.925 acc 0.5 -> ECE 0.425
    m = classification_metrics([0, 0], [0, 1], [0.9, 0.95], labeled_counts=[1, 1], ece_bins=2)
    assert m["reliability"][0] == {"lo": 0.0, "hi": 0.5, "count": 0, "confidence": None, "accuracy": None}
    assert m["reliability"][1]["count"] == 2
    assert m["ece"] == pytest.approx(0.425)
    assert_json_clean(m)


def test_many_medium_few_with_empty_group_and_tertiles():
    # CIFAR-100-LT-like: every class has <= 100 labels, so "many" is empty.
    counts = [50, 40, 30, 20, 10, 5]
    # many: > 100 -> {} ; medium: 20..100 -> {0,1,2,3} ; few: < 20 -> {4,5}
    y_true = [0, 1, 1, 2, 4, 5, 5]
    y_pred = [0, 1, 0, 1, 4, 5, 0]
    # per class: c0 1/1, c1 1/2, c2 0/1, c3 no samples, c4 1/1, c5 1/2
    m = classification_metrics(y_true, y_pred, None, labeled_counts=counts)
    g = m["groups"]
    assert g["many"] == {"classes": [], "accuracy": None, "empty": True}
    assert g["medium"]["classes"] == [0, 1, 2, 3] and g["medium"]["empty"] is False
    assert g["medium"]["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # c3 ignored
    assert g["few"]["classes"] == [4, 5]
    assert g["few"]["accuracy"] == pytest.approx((1 + 0.5) / 2)
    # tertiles: counts already descending -> head {0,1}, mid {2,3}, tail {4,5}
    t = m["tertiles"]
    assert [t[k]["classes"] for k in ("head", "mid", "tail")] == [[0, 1], [2, 3], [4, 5]]
    assert t["head"]["accuracy"] == pytest.approx(0.75)  # (1 + 0.5)/2
    assert t["mid"]["accuracy"] == pytest.approx(0.0)  # c2 = 0, c3 has no samples
    assert t["tail"]["accuracy"] == pytest.approx(0.75)  # (1 + 0.5)/2
    assert not any(t[k]["empty"] for k in t)
    s = json.dumps(m, allow_nan=False)
    assert "NaN" not in s


def test_group_boundaries_and_group_without_test_samples():
    # 150 > 100 -> many; 100 and 20 are medium (inclusive); 19 -> few
    m = classification_metrics([0], [0], None, labeled_counts=[150, 100, 20, 19])
    assert m["groups"]["many"]["classes"] == [0]
    assert m["groups"]["medium"]["classes"] == [1, 2]
    assert m["groups"]["few"]["classes"] == [3]
    assert m["groups"]["many"]["accuracy"] == 1.0
    # medium/few have classes but no test samples: accuracy None, not empty
    assert m["groups"]["medium"] == {"classes": [1, 2], "accuracy": None, "empty": False}
    assert_json_clean(m)


def test_tertiles_unsorted_counts_and_small_c():
    counts = [5, 50, 20, 40, 10, 30, 1]
    # descending by count: 1(50) 3(40) 5(30) | 2(20) 4(10) | 0(5) 6(1)  (7 = 3 + 2 + 2)
    m = classification_metrics([0, 1], [0, 1], None, labeled_counts=counts)
    t = m["tertiles"]
    assert t["head"]["classes"] == [1, 3, 5]
    assert t["mid"]["classes"] == [2, 4]
    assert t["tail"]["classes"] == [0, 6]
    # C = 2: one tertile is empty -> reported as such, not NaN
    m2 = classification_metrics([0, 1], [0, 1], None, labeled_counts=[10, 3])
    assert m2["tertiles"]["tail"] == {"classes": [], "accuracy": None, "empty": True}
    assert m2["tertiles"]["head"]["classes"] == [0] and m2["tertiles"]["mid"]["classes"] == [1]
    assert_json_clean(m2)


def test_empty_test_set_has_no_nan():
    m = classification_metrics([], [], [], labeled_counts=[3, 2, 1], ece_bins=3)
    assert m["n"] == 0 and m["accuracy"] is None and m["balanced_accuracy"] is None
    assert m["ece"] is None and m["macro_f1"] is None
    assert_json_clean(m)


# ------------------------------------------------------------------ OOD
def test_ood_hand_computed_with_tie():
    s_id = [0.9, 0.6, 0.4]
    s_ood = [0.6, 0.2]
    m = ood_metrics(s_id, s_ood)
    # AUROC: 6 (id, ood) pairs: .9>.6 1, .9>.2 1, .6=.6 1/2, .6>.2 1, .4<.6 0, .4>.2 1 -> 4.5/6
    assert m["auroc"] == pytest.approx(0.75)
    # AUPR-in (ID positive, descending score):
    #  >=.9: TP1 FP0 P=1   R=1/3
    #  >=.6: TP2 FP1 P=2/3 R=2/3   (tie .6 = one threshold)
    #  >=.4: TP3 FP1 P=3/4 R=1
    #  >=.2: TP3 FP2 P=3/5 R=1     (dR = 0)
    #  AP = 1/3*1 + 1/3*2/3 + 1/3*3/4 = 1/3 + 2/9 + 1/4 = 29/36
    assert m["aupr_in"] == pytest.approx(29 / 36)
    # AUPR-out (OOD positive, score -s): -.2(O) -.4(I) -.6(O,I tie) -.9(I)
    #  >=-.2: TP1 FP0 P=1 R=1/2 ; >=-.4: P=1/2 R=1/2 ; >=-.6: TP2 FP2 P=1/2 R=1 ; >=-.9: dR=0
    #  AP = 1/2*1 + 1/2*1/2 = 3/4
    assert m["aupr_out"] == pytest.approx(0.75)
    # FPR95: k = ceil(0.95*3) = 3 -> threshold = 3rd-largest ID score = .4 ; OOD >= .4: {.6} -> 1/2
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["n_id"] == 3 and m["n_ood"] == 2


def test_fpr95_twenty_id_scores():
    s_id = np.arange(1, 21, dtype=float)  # 1..20
    # TPR first >= 0.95 at 19/20 -> threshold = 19th largest = 2.0
    # OOD >= 2: {2, 3} of 4 -> 0.5
    m = ood_metrics(s_id, [0.0, 1.5, 2.0, 3.0])
    assert m["fpr95"] == pytest.approx(0.5)
    # tie at the threshold: ID = [5,5,5,...] all equal -> threshold 5, OOD >= 5 counts
    m = ood_metrics([5.0] * 10, [4.0, 5.0, 6.0, 1.0])
    assert m["fpr95"] == pytest.approx(2 / 4)
    assert m["auroc"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # per ID: wins vs 4 and 1, tie vs 5


def test_ood_empty_side_gives_none():
    for a, b in (([], [0.1]), ([0.1], []), ([], [])):
        m = ood_metrics(a, b)
        assert m["auroc"] is None and m["aupr_in"] is None
        assert m["aupr_out"] is None and m["fpr95"] is None
        assert_json_clean(m)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_ap_match_sklearn(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 200, size=2)
    s_id = rng.normal(0.5, 1.0, n_id)
    s_ood = rng.normal(0.0, 1.0, n_ood)
    if seed % 2:  # coarse scores -> many ties
        s_id, s_ood = np.round(s_id, 1), np.round(s_ood, 1)
    y = np.r_[np.ones(n_id), np.zeros(n_ood)]
    s = np.r_[s_id, s_ood]
    m = ood_metrics(s_id, s_ood)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)


# ------------------------------------------------------------------ pseudo-labels
def test_pseudo_label_metrics_with_ood_admitted():
    #        row:   0       1       2       3       4       5       6      7           8           9
    decision = ["hard", "hard", "hard", "soft", "soft", "soft", "ood", "rejected", "rejected", "ood"]
    pred = [0, 1, 1, 0, 2, 2, 1, 2, 0, 1]
    true = [0, 1, 2, 0, -1, -1, -1, 2, 1, 1]
    m = pseudo_label_metrics(decision, pred, true, num_classes=4)
    assert m["n"] == 10
    assert m["counts"] == {"hard": 3, "soft": 3, "ood": 2, "rejected": 2}
    assert m["accepted"] == 6
    # ID rows (true >= 0): 0,1,2,3,7,8,9 = 7 ; accepted ID: 0,1,2,3 -> coverage 4/7
    assert m["id_total"] == 7
    assert m["coverage"] == pytest.approx(4 / 7)
    # accepted right: rows 0,1,3 of 6 accepted (OOD rows 4,5 count as wrong) -> 1/2
    assert m["precision"] == pytest.approx(0.5)
    assert m["hard_precision"] == pytest.approx(2 / 3)  # rows 0,1 right, 2 wrong
    assert m["soft_precision"] == pytest.approx(1 / 3)  # row 3 right, 4,5 OOD
    # true OOD: rows 4,5,6 ; admitted 4,5 ; rejected rate 1/3
    assert m["ood_total"] == 3 and m["ood_admitted"] == 2
    assert m["ood_rejected_rate"] == pytest.approx(1 / 3)
    # precision per class, among accepted with pred == c:
    #  c0: rows 0,3 -> both true 0 -> 1 ; c1: rows 1,2 -> 1/2 ; c2: rows 4,5 (OOD) -> 0 ; c3: none
    assert m["precision_per_class"] == pytest.approx([1.0, 0.5, 0.0, None])
    assert m["precision_per_class"][3] is None
    # recall per class, among ID with true == c, accepted AND pred == c:
    #  c0: rows 0,3 -> 2/2 ; c1: rows 1,8,9 -> row 1 -> 1/3 ; c2: rows 2,7 -> 0/2 ; c3: none
    assert m["recall_per_class"] == pytest.approx([1.0, 1 / 3, 0.0, None])
    assert m["recall_per_class"][3] is None
    assert_json_clean(m)


def test_pseudo_label_metrics_without_truth_and_bad_decision():
    m = pseudo_label_metrics(np.array(["hard", "ood", "soft", "soft"]), [0, 1, 2, 0], None, 3)
    assert m == {"n": 4, "counts": {"hard": 1, "soft": 2, "ood": 1, "rejected": 0}, "accepted": 3}
    # no OOD and nothing accepted -> rates are None, not NaN
    m = pseudo_label_metrics(["rejected", "ood"], [0, 1], [0, 1], 2)
    assert m["precision"] is None and m["ood_rejected_rate"] is None
    assert m["coverage"] == 0.0
    assert_json_clean(m)
    with pytest.raises(ValueError):
        pseudo_label_metrics(["hard", "maybe"], [0, 0], None, 1)


def test_pseudo_label_coverage_and_accepted_per_class_by_hand():
    from loft_dist.eval.metrics import pseudo_label_metrics

    # class 0: 3 ID images, 2 accepted (one predicted 1) → coverage 2/3; class 1: 1 image, accepted → 1/1
    # accepted predictions: pred 0 twice (rows 0 and the OOD row 4), pred 1 twice (rows 1, 3) → [2, 2]
    decision = ["hard", "soft", "rejected", "hard", "soft"]
    pred = [0, 1, 0, 1, 0]
    true = [0, 0, 0, 1, -1]
    m = pseudo_label_metrics(decision, pred, true, 2)
    assert m["coverage_per_class"] == [2 / 3, 1.0]
    assert m["accepted_per_class"] == [2, 2]
