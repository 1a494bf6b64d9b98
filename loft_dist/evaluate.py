"""`loft-dist evaluate MODEL DATASET [SPLIT] --out DIR`: any checkpoint or export on any prepared split.

It composes what a round's evaluation does (DESIGN §1): the scoring actor pool predicts the split (and, for test,
the dataset's ood_test split), then metrics.json and the report's figures (per-class accuracy, reliability) are
written beside the prediction tables, in --out. The model's config is its own: export.json of an export, or the
config.yaml of the run a checkpoint belongs to; key=value overrides change where it runs (scoring.*, run.*).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loft_dist import storage
from loft_dist.errors import WeightsError

log = logging.getLogger(__name__)


def model_source(model_dir: str) -> tuple[dict, list[str]]:
    """(config sections of the model, its class names) from an export (export.json) or a run's checkpoint dir
    (train_state.json + the run's config.yaml, three levels up: RUN/rounds/rK/checkpoint)."""
    from loft_dist.data.store import load_run_config
    from loft_dist.export import EXPORT_FILE, read_export_meta
    from loft_dist.models.checkpoint import STATE_FILE

    d = Path(model_dir)
    if (d / EXPORT_FILE).is_file():
        meta = read_export_meta(d)
        sections = {k: meta[k] for k in ("model", "peft", "algorithm")}
        sections["data"] = {"image_size": meta["image_size"]}
        return sections, meta["class_names"]
    state = d / STATE_FILE
    run_dir = d.resolve().parents[2] if len(d.resolve().parents) > 2 else d
    if not state.is_file() or not (run_dir / "config.yaml").is_file():
        raise WeightsError(f"{model_dir} is neither an export (no {EXPORT_FILE}) nor a run's checkpoint dir "
                           f"(RUN/rounds/rK/checkpoint with {STATE_FILE}, and RUN/config.yaml): pass one of those")
    cfg = load_run_config(str(run_dir))
    names = json.loads(state.read_text()).get("class_names")
    if not names:
        raise WeightsError(f"{state} names no class_names: the checkpoint predates them; export the run "
                           f"(`loft-dist export`) and evaluate the export")
    return {k: cfg[k] for k in ("model", "peft", "algorithm", "data") if k in cfg}, names


def evaluate_model(model_dir: str, dataset: str, split: str, out: str, overrides: list[str]) -> dict:
    """Score `split` of the prepared `dataset` with the model, then metrics.json and figures in `out`."""
    from loft_dist.data.store import read_dataset_info, split_exists
    from loft_dist.runtime import check_fits, init_ray
    from loft_dist.scoring.job import score_splits, scoring_ask

    sections, names = model_source(model_dir)
    info = read_dataset_info(dataset)
    if list(info["class_names"]) != list(names):
        raise WeightsError(f"{model_dir} predicts {len(names)} classes ({', '.join(names[:3])}, …) but {dataset} has "
                           f"{len(info['class_names'])} ({', '.join(info['class_names'][:3])}, …), or another order: "
                           f"evaluate it on the dataset it was trained for")
    if not split_exists(dataset, split):
        raise WeightsError(f"{dataset} has no {split} split; splits: "
                           f"{', '.join(s for s in info['rows'] if split_exists(dataset, s))}")
    cfg = _config(sections, [f"data.root={dataset}", *overrides])
    storage.check_writable(out, "--out")
    check_fits([scoring_ask(cfg)], strict=init_ray(cfg.run, use_gpu=cfg.scoring.gpus_per_actor > 0))
    splits = [split] + (["ood_test"] if split == "test" and split_exists(dataset, "ood_test") else [])
    score_splits(cfg, dataset, {s: storage.join(out, "predictions", s) for s in splits}, class_names=names,
                 mode="eval", checkpoint=str(Path(model_dir).resolve()))
    return write_evaluation(cfg, out, model_dir, dataset, split, names, info["counts"]["labeled"])


def _config(sections: dict, overrides: list[str]):
    """The model's own sections as the config file, the command's overrides on top: validated as any config."""
    import tempfile

    from omegaconf import OmegaConf

    from loft_dist.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(sections)))
        f.flush()
        return load_config(f.name, overrides)


def write_evaluation(cfg, out: str, model_dir: str, dataset: str, split: str, names: list[str],
                     labeled_counts: list[int]) -> dict:
    """metrics.json and the figures of the scored predictions in `out` (reads outputs only)."""
    import tempfile

    from loft_dist.data.pseudo_labels import read_columns
    from loft_dist.eval import plots
    from loft_dist.eval.evaluate import prediction_metrics
    from loft_dist.eval.report import class_groups

    table = storage.join(out, "predictions", split)
    metrics, ood = prediction_metrics(cfg, table, labeled_counts,
                                      storage.join(out, "predictions", "ood_test") if split == "test" else None)
    unread = int((read_columns(table, ["error"])["error"] != "").sum())
    m = {"model": str(model_dir), "dataset": str(dataset), "split": split, "unreadable_rows": unread, split: metrics}
    if ood is not None:
        m["ood_test"] = ood
    with tempfile.TemporaryDirectory() as tmp:  # figures are drawn locally, then copied (out may be s3://)
        t = m[split]
        figures = [plots.per_class_accuracy(Path(tmp, "per_class_accuracy.png"), names, t["per_class_accuracy"],
                                            labeled_counts, class_groups(t, len(names)), 0)]
        if t["reliability"]:
            figures.append(plots.reliability(Path(tmp, "reliability.png"),
                                             [{"title": f"{split}: ECE {100 * t['ece']:.1f}%", "bins": t["reliability"]}]))
        for f in figures:
            storage.write_bytes(storage.join(out, Path(f).name), Path(f).read_bytes())
    storage.write_json(storage.join(out, "metrics.json"), m)
    log.info("evaluate %s on %s/%s: accuracy %.4f, balanced %.4f (%d images)", model_dir, dataset, split,
             t["accuracy"] or 0.0, t["balanced_accuracy"] or 0.0, t["n"])
    return m
