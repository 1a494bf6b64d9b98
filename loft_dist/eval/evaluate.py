"""Per-round evaluation: the actor pool predicts the test (and OOD test) split, then metrics.json is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loft_dist.data.pseudo_labels import is_complete, read_columns
from loft_dist.data.quarantine import quarantine
from loft_dist.data.store import split_exists, write_json_atomic
from loft_dist.eval.metrics import classification_metrics, ood_metrics, pseudo_label_metrics


def evaluate_round(cfg, data_root: str, round_dir: Path, *, classes: list[str], labeled_counts: list[int],
                   round_idx: int, checkpoint: str | None, mode: str) -> dict:
    from loft_dist.scoring.job import score_split

    run_dir = round_dir.parent.parent
    preds = {}
    for split in ("test", "ood_test"):
        if split == "ood_test" and not split_exists(data_root, split):
            continue
        out = round_dir / "predictions" / split
        score_split(cfg, data_root, split, str(out), class_names=classes, mode=mode, checkpoint=checkpoint)
        quarantine(out, run_dir, split)
        preds[split] = read_columns(out, ["true_label", "pred", "msp", "error"])
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
        import json

        metrics["train"] = json.loads(train.read_text())
    write_json_atomic(round_dir / "metrics.json", metrics)
    return metrics
