"""Per-round evaluation: metrics.json from the predictions, pseudo-labels and train metrics a round wrote.

It reads outputs only and starts no job: the round driver scores the test (and OOD test) split first.
"""

from __future__ import annotations

import numpy as np

from loft_dist import storage
from loft_dist.data.pseudo_labels import is_complete, read_columns
from loft_dist.eval.metrics import classification_metrics, ood_metrics, pseudo_label_metrics
from loft_dist.models.standin import zero_shot_label

PREDICTION_COLUMNS = ["true_label", "pred", "msp", "error"]


def prediction_metrics(cfg, table: str, labeled_counts: list[int], ood_table: str | None = None) -> tuple[dict, dict]:
    """(classification metrics of a scored split's readable ID rows, OOD metrics against ood_table's rows or None);
    what a round's evaluation and `loft-dist evaluate` both report."""
    p = read_columns(table, PREDICTION_COLUMNS)
    ok = (p["error"] == "") & (p["true_label"] >= 0)
    e = cfg.eval
    metrics = classification_metrics(p["true_label"][ok], p["pred"][ok], p["msp"][ok], labeled_counts,
                                     e.many_threshold, e.few_threshold, e.ece_bins)
    if ood_table is None or not is_complete(ood_table):
        return metrics, None
    o = read_columns(ood_table, PREDICTION_COLUMNS)
    return metrics, ood_metrics(p["msp"][ok], o["msp"][o["error"] == ""])


def evaluate_round(cfg, layout: storage.RunLayout, round_idx: int, *, classes: list[str], labeled_counts: list[int],
                   mode: str) -> dict:
    """The round's predictions of test (required) and ood_test (when scored) → its metrics.json."""
    r = round_idx
    test, ood = prediction_metrics(cfg, layout.predictions(r, "test"), labeled_counts, layout.predictions(r, "ood_test"))
    metrics = {
        "round": round_idx,
        "model": zero_shot_label(cfg.model.pretrained) if mode == "zero_shot" else f"checkpoint of round {round_idx}",
        "test": test,
    }
    if ood is not None:
        metrics["ood_test"] = ood
    table = layout.pseudo_labels(r)
    if is_complete(table):
        pl = read_columns(table, ["decision", "pred", "true_label", "msp", "zs_msp"])
        metrics["pseudo_labels"] = pseudo_label_metrics(pl["decision"], pl["pred"], pl["true_label"], len(classes))
        is_ood = pl["true_label"] < 0
        if is_ood.any() and (~is_ood).any():  # how well the pool's own scores separate ID from OOD
            metrics["pool_ood"] = {"msp": ood_metrics(pl["msp"][~is_ood], pl["msp"][is_ood])}
            if not np.isnan(pl["zs_msp"]).any():
                metrics["pool_ood"]["zs_msp"] = ood_metrics(pl["zs_msp"][~is_ood], pl["zs_msp"][is_ood])
    if storage.is_file(layout.train_metrics(r)):
        metrics["train"] = storage.read_json(layout.train_metrics(r))
    storage.write_json(layout.metrics(r), metrics)
    return metrics
