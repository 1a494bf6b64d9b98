"""The recipe of a run: a small resumable state machine over rounds (DESIGN §2).

round 0: zero-shot scores of the pool (stage-1 OOD filter) and zero-shot evaluation;
round r: score the pool with the model of round r-1 → train on labeled ∪ accepted → evaluate.
Each phase writes into place atomically, then is recorded in state.json; re-running the same command
skips completed phases and redoes a half-written one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from loft_dist.config import Config, ConfigError, to_dict, to_yaml
from loft_dist.data.store import read_dataset_info, write_json_atomic

log = logging.getLogger(__name__)
# Keys that may change between a run and its resumption (where it runs, not what it computes).
RESUMABLE_KEYS = ("run.ray_address", "run.num_cpus", "run.object_store_mb", "scoring.min_actors",
                  "scoring.max_actors", "scoring.cpus_per_actor", "scoring.gpus_per_actor", "scoring.batch_size",
                  "scoring.torch_threads", "scoring.cpus_per_data_task", "train.max_failures")


class RunState:
    """state.json: the list of completed phases, rewritten atomically after each phase."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.done: list[str] = json.loads(self.path.read_text())["completed"] if self.path.is_file() else []
        self.times: list[float] = []

    def complete(self, phase: str) -> None:
        self.done.append(phase)
        write_json_atomic(self.path, {"completed": self.done})


def _check_same_run(cfg: Config, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.to_container(OmegaConf.load(saved))
    new = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    diffs = []
    for section, values in new.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUMABLE_KEYS and old.get(section, {}).get(key) != value:
                diffs.append(f"{name}: {old.get(section, {}).get(key)!r} → {value!r}")
    if diffs:
        raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(diffs)}); resume it with its own "
                          f"config, or start a new run with run.name=<new name>")


def run(cfg: Config) -> dict:
    """Run (or resume) all phases; returns the final round's metrics."""
    from loft_dist.data.prepare import prepare_dataset
    from loft_dist.eval.evaluate import evaluate_round
    from loft_dist.eval.report import write_report
    from loft_dist.eval.tracking import Tracker
    from loft_dist.runtime import check_fits, init_ray, preflight

    preflight(cfg)  # an unwritable run.storage_path or a missing weights file fails here, before Ray starts
    run_dir = Path(cfg.run_dir).resolve()  # workers and actors run in other directories
    _check_same_run(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    state = RunState(run_dir)
    from loft_dist.algorithms import get_method

    R = cfg.rounds.num_rounds if get_method(cfg.algorithm.name).trains else 0  # zero-shot: round 0 is the run
    phases = ["prepare", "r0.score", "r0.eval"] + [f"r{r}.{p}" for r in range(1, R + 1) for p in ("score", "train", "eval")]
    todo = [p for p in phases if p not in state.done]
    log.info("run %s: %d rounds, %d of %d phases to do%s", run_dir, R, len(todo), len(phases),
             f" (resuming after {state.done[-1]})" if state.done else "")

    def phase(name: str, fn) -> None:
        if name in state.done:
            return
        t0 = time.time()
        fn()
        state.times.append(time.time() - t0)
        state.complete(name)
        left = len([p for p in phases if p not in state.done])
        eta = left * sum(state.times) / len(state.times)
        log.info("phase %s done in %.1f s; %d phases left, ETA %.0f s", name, state.times[-1], left, eta)

    root = cfg.data_root if "://" in cfg.data_root else str(Path(cfg.data_root).resolve())  # URIs stay URIs
    phase("prepare", lambda: prepare_dataset(cfg))
    info = read_dataset_info(root)
    classes = info["class_names"]
    labeled_counts = info["counts"]["labeled"]
    prior = [c / sum(labeled_counts) for c in labeled_counts]
    log.info("data %s: %d classes, labeled %d, pool %d (of which OOD %d), test %d, ood_test %d", root, len(classes),
             info["rows"]["labeled"], info["rows"]["unlabeled"], info["ood_counts"]["unlabeled"], info["rows"]["test"],
             info["rows"].get("ood_test", 0))
    started = init_ray(cfg.run, use_gpu=cfg.train.use_gpu or cfg.scoring.gpus_per_actor > 0)
    check_fits(cfg, train=R > 0, strict=started)

    def rdir(r: int) -> Path:
        return run_dir / "rounds" / f"r{r}"

    def score_pool(r: int) -> None:
        from loft_dist.scoring.job import score_split
        from loft_dist.data.pseudo_labels import pool_decisions
        from loft_dist.data.quarantine import quarantine

        mode = "zero_shot" if r == 0 else "teacher"
        ckpt = str(rdir(r - 1) / "checkpoint") if r >= 2 else None  # r = 1: the initial (text-prototype) model
        table = rdir(r) / "pseudo_labels"
        rows = score_split(cfg, root, "unlabeled", str(table), class_names=classes, mode=mode, checkpoint=ckpt,
                           zs_table=str(rdir(0) / "pseudo_labels") if r >= 1 else None)
        quarantine(table, run_dir, "unlabeled")
        counts = pool_decisions(table)
        log.info("round %d pseudo-labels: %d rows scored; accepted hard %d, soft %d; rejected (MSP <= c_ood) %d; "
                 "OOD (zero-shot filter) %d", r, rows, counts["hard"], counts["soft"], counts["rejected"], counts["ood"])

    def train(r: int) -> None:
        from loft_dist.data.pseudo_labels import round_datasets
        from loft_dist.train.trainer import fit_round

        ds, what = round_datasets(root, cfg, len(classes), str(rdir(r) / "pseudo_labels"), str(rdir(0) / "pseudo_labels"))
        log.info("round %d train set (%s): %d %s", r, cfg.algorithm.name, info["rows"]["labeled"], what)
        metrics = fit_round(cfg, ds, class_names=classes, prior=prior,
                            init_checkpoint=str(rdir(r - 1) / "checkpoint") if r >= 2 else None, round_idx=r,
                            storage_path=str(run_dir / "ray_train"), out_dir=str(rdir(r) / "checkpoint"),
                            tracking_dir=str(run_dir))
        write_json_atomic(rdir(r) / "train_metrics.json", metrics)

    def evaluate(r: int) -> None:
        ckpt = str(rdir(r) / "checkpoint") if r >= 1 else None
        m = evaluate_round(cfg, root, rdir(r), classes=classes, labeled_counts=labeled_counts, round_idx=r,
                           checkpoint=ckpt, mode="zero_shot" if r == 0 else "eval")
        tracker.log_round(r, m)
        g = m["test"]["groups"]
        log.info("round %d eval: accuracy %.4f (many %s, medium %s, few %s), balanced %.4f", r, m["test"]["accuracy"],
                 *(_fmt(g[k]["accuracy"]) for k in ("many", "medium", "few")), m["test"]["balanced_accuracy"])

    tracker = Tracker(run_dir)  # TensorBoard (and MLflow when configured) beside the run's files
    tracker.log_params(to_dict(cfg), resumable=RESUMABLE_KEYS)
    try:
        phase("r0.score", lambda: score_pool(0))
        phase("r0.eval", lambda: evaluate(0))
        for r in range(1, R + 1):
            phase(f"r{r}.score", lambda r=r: score_pool(r))
            phase(f"r{r}.train", lambda r=r: train(r))
            phase(f"r{r}.eval", lambda r=r: evaluate(r))
    finally:
        tracker.close(finished=len(state.done) == len(phases))
    summary = write_report(run_dir)
    log.info("report: %s", run_dir / "report" / "report.md")
    return summary


def _fmt(v) -> str:
    return "n/a (empty group)" if v is None else f"{v:.4f}"
