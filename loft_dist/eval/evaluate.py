"""Per-round evaluation: metrics.json from the predictions, pseudo-labels and train metrics a round wrote.

It reads outputs only and starts no job: the round driver scores the test (and OOD test) split first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loft_dist.data.pseudo_labels import is_complete, read_columns
from loft_dist.data.store import write_json_atomic
from loft_dist.eval.metrics import classification_metrics, ood_metrics, pseudo_label_metrics

PREDICTION_COLUMNS = ["true_label", "pred", "msp", "error"]


def evaluate_round(cfg, round_dir: Path, *, classes: list[str], labeled_counts: list[int], round_idx: int,
                   mode: str) -> dict:
    """round_dir/predictions/test (required) and /ood_test (when scored) → round_dir/metrics.json."""
    preds = {split: read_columns(round_dir / "predictions" / split, PREDICTION_COLUMNS)
             for split in ("test", "ood_test") if split == "test" or is_complete(round_dir / "predictions" / split)}
    t = preds["test"]
    ok = t["error"] == ""
    e = cfg.eval
    metrics = {
        "round": round_idx,
        "model": "zero-shot CLIP" if mode == "zero_shot" else f"checkpoint of round {round_idx}",
        "test": classification_metrics(t["true_label"][ok], t["pred"][ok], t["msp"][ok], labeled_counts,
                                       e.many_threshold, e.few_threshold, e.ece_bins),
    }
    if "ood_test" in preds:
        o = preds["ood_test"]
        metrics["ood_test"] = ood_metrics(t["msp"][ok], o["msp"][o["error"] == ""])
    table = round_dir / "pseudo_labels"
    if is_complete(table):
        pl = read_columns(table, ["decision", "pred", "true_label", "msp", "zs_msp"])
        metrics["pseudo_labels"] = pseudo_label_metrics(pl["decision"], pl["pred"], pl["true_label"], len(classes))
        is_ood = pl["true_label"] < 0
        if is_ood.any() and (~is_ood).any():  # how well the pool's own scores separate ID from OOD
            metrics["pool_ood"] = {"msp": ood_metrics(pl["msp"][~is_ood], pl["msp"][is_ood])}
            if not np.isnan(pl["zs_msp"]).any():
                metrics["pool_ood"]["zs_msp"] = ood_metrics(pl["zs_msp"][~is_ood], pl["zs_msp"][is_ood])
    train = round_dir / "train_metrics.json"
    if train.is_file():
        metrics["train"] = json.loads(train.read_text())
    write_json_atomic(round_dir / "metrics.json", metrics)
    return metrics
