"""The recipe of a run: a small resumable state machine over rounds (DESIGN §2).

round 0: zero-shot scores of the pool (stage-1 OOD filter) and zero-shot evaluation;
round r: score the pool with the model of round r-1 → train on labeled ∪ accepted → evaluate.
Each phase writes into place atomically, then is recorded in state.json; re-running the same command
skips completed phases and redoes a half-written one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from statistics import fmean

from omegaconf import OmegaConf

from loft_dist.config import Config, ConfigError, from_dict, resumable_keys, to_dict, to_yaml
from loft_dist import storage
from loft_dist.data.store import read_dataset_info
from loft_dist.errors import DataError, StorageError
from loft_dist.lease import Lease
from loft_dist.storage import RunLayout

log = logging.getLogger(__name__)


class RunState:
    """state.json: the list of completed phases, rewritten atomically after each phase."""

    def __init__(self, layout: RunLayout):
        self.path = layout.state
        self.done: list[str] = storage.read_json(self.path)["completed"] if storage.is_file(self.path) else []
        self.times: list[float] = []

    def complete(self, phase: str, seconds: float) -> None:
        self.times.append(seconds)
        self.done.append(phase)
        storage.write_json(self.path, {"completed": self.done})


def _check_same_run(cfg: Config, layout: RunLayout) -> None:
    if not storage.is_file(layout.config):
        return
    # Read as the current code reads it: retired keys dropped, and a key added since the run was written takes its
    # default (what that older code did), so only what the user changed counts as a change.
    old = to_dict(from_dict(OmegaConf.to_container(OmegaConf.create(storage.read_text(layout.config)))))
    new = to_dict(cfg)
    diffs = []
    for section, values in new.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in resumable_keys() and old.get(section, {}).get(key) != value:
                diffs.append(f"{name}: {old.get(section, {}).get(key)!r} → {value!r}")
    if diffs:
        raise ConfigError(f"{layout.root} holds a run with another config ({'; '.join(diffs)}); resume it with its own "
                          f"config, or start a new run with run.name=<new name>")


@dataclass(frozen=True)
class Phase:
    name: str  # as state.json records it: "prepare", "r0.score", "r1.train", …
    step: str  # the key of STEPS that runs it
    round: int = 0


def phase_table(num_rounds: int) -> list[Phase]:
    """Every phase of a run, in order. Running, resuming and the ETA all read this one list."""
    rounds = [(0, ("score", "eval"))] + [(r, ("score", "train", "eval")) for r in range(1, num_rounds + 1)]
    return [Phase("prepare", "prepare")] + [Phase(f"r{r}.{step}", step, r) for r, steps in rounds for step in steps]


@dataclass
class RunContext:
    """What the phases of one run share: the config, where things go, the dataset's facts, Ray, the tracker."""
    cfg: Config
    layout: RunLayout
    root: str  # the dataset root (a URI stays a URI)
    num_rounds: int
    tracker: object = None
    _info: dict | None = None
    _ray: bool = False

    def checkpoint(self, r: int) -> str | None:
        """The model a phase of round r starts from; round 1 starts from the text prototypes (no checkpoint)."""
        return self.layout.checkpoint(r) if r >= 1 else None

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = info = read_dataset_info(self.root)
            log.info("data %s: %d classes, labeled %d, pool %d (of which OOD %d), test %d, ood_test %d", self.root,
                     len(info["class_names"]), info["rows"]["labeled"], info["rows"]["unlabeled"],
                     info["ood_counts"]["unlabeled"], info["rows"]["test"], info["rows"].get("ood_test", 0))
        return self._info

    def ray(self) -> None:
        """Start or join Ray once, before the first phase that needs it; check that the asks fit first."""
        if self._ray:
            return
        from loft_dist.runtime import check_fits, init_ray
        from loft_dist.scoring.job import scoring_ask
        from loft_dist.train.trainer import training_ask

        started = init_ray(self.cfg.run, use_gpu=self.cfg.train.use_gpu or self.cfg.scoring.gpus_per_actor > 0)
        check_fits([scoring_ask(self.cfg)] + ([training_ask(self.cfg)] if self.num_rounds else []), strict=started)
        self._ray = True


def _prepare(ctx: RunContext, r: int) -> None:
    from loft_dist.data.prepare import prepare_dataset

    prepare_dataset(ctx.cfg, start_ray=ctx.ray)


def _pool_input(ctx: RunContext, r: int) -> dict:
    """Round r's pool table: zero-shot in round 0, else pseudo-labels by the teacher, round r - 1's model."""
    from loft_dist.data.store import shard_paths

    return {f"pool r{r}": (shard_paths(ctx.root, "unlabeled"), ctx.layout.pseudo_labels(r),
                           "zero_shot" if r == 0 else "teacher")}


def _eval_inputs(ctx: RunContext, r: int) -> dict:
    """Round r's predictions on the test split (and the OOD test split where the dataset has one)."""
    from loft_dist.data.store import split_exists
    from loft_dist.scoring.job import split_inputs

    outs = {s: ctx.layout.predictions(r, s) for s in ("test", "ood_test") if s == "test" or split_exists(ctx.root, s)}
    return split_inputs(ctx.root, outs, "zero_shot" if r == 0 else "eval")


def _model_tables(ctx: RunContext, r: int) -> dict:
    """Every table round r's model scores, in one job: round r's test splits and, as round r + 1's teacher, round
    r + 1's pool. Round 0's model (zero-shot CLIP) scores round 0's pool too. The first phase that runs the job
    writes them all; a later phase finds them done."""
    inputs = {**(_pool_input(ctx, 0) if r == 0 else {}), **_eval_inputs(ctx, r)}
    return {**inputs, **(_pool_input(ctx, r + 1) if r < ctx.num_rounds else {})}


def _score_with(ctx: RunContext, checkpoint: str | None, inputs: dict) -> dict[str, int]:
    """Every table one model scores in a phase, in one job: one actor pool's start-up (~7-10 s on 2 cores), not one
    per table. A table already complete (scored by an earlier phase's job) is kept. Teachers from round 2 on read
    the stage-1 zero-shot MSP from round 0's table; round 1's teacher is round 0's model and computes it itself."""
    from loft_dist.scoring.job import score_tables

    ctx.ray()
    teacher = any(mode == "teacher" for _, _, mode in inputs.values())
    return score_tables(ctx.cfg, inputs, class_names=ctx.info["class_names"], checkpoint=checkpoint,
                        zs_table=ctx.layout.pseudo_labels(0) if teacher and checkpoint else None)


def _score(ctx: RunContext, r: int) -> None:
    """The pool's pseudo-label table of round r: zero-shot in round 0, else the teacher of round r - 1. Round 0's
    job is all of round 0's model's tables (_model_tables: r0.eval and r1.score find theirs done, round 1's pool
    read and decoded once with round 0's); from round 2 on, the previous round's evaluation scored the pool already
    (_evaluate)."""
    from loft_dist.data.pseudo_labels import pool_decisions
    from loft_dist.data.quarantine import quarantine

    if ctx.num_rounds and not ctx.info["rows"]["unlabeled"]:  # before Ray starts: round 1's teacher would fail on it
        raise DataError(f"the pool (unlabeled split) of data.root={ctx.root} is empty, and every round of "
                        f"algorithm.name={ctx.cfg.algorithm.name} scores it; give it images (data.m1 > 0 for "
                        f"data.protocol=lt, data.labeled_percent < 100 for percent, or OOD images: data.ood_ratio, "
                        f"data.ood_count), or set rounds.num_rounds=0 to evaluate zero-shot only")
    inputs = _model_tables(ctx, 0) if r == 0 else _pool_input(ctx, r)
    rows = _score_with(ctx, ctx.checkpoint(r - 1), inputs)[f"pool r{r}"]
    table = ctx.layout.pseudo_labels(r)
    quarantine(table, ctx.layout.root, "unlabeled")
    n = pool_decisions(table)
    log.info("round %d pseudo-labels: %d rows scored; accepted hard %d, soft %d; rejected (MSP <= c_ood) %d; "
             "OOD (zero-shot filter) %d", r, rows, n["hard"], n["soft"], n["rejected"], n["ood"])


def _train(ctx: RunContext, r: int) -> None:
    from loft_dist.algorithms import get_method
    from loft_dist.algorithms.loft import stage1_kept_ids
    from loft_dist.data.pseudo_labels import class_statistics, round_datasets
    from loft_dist.train.trainer import fit_round

    cfg, info = ctx.cfg, ctx.info
    ctx.ray()
    zs_table = ctx.layout.pseudo_labels(0)
    method = get_method(cfg.algorithm.name)
    pl_table = ctx.layout.pseudo_labels(r) if method.pseudo_labels else None
    offline_table = pl_table if cfg.algorithm.mode == "offline" else None
    stats = class_statistics(offline_table, len(info["class_names"])) if offline_table and method.class_stats else None
    kept = stage1_kept_ids(zs_table, cfg) if cfg.algorithm.mode == "online" else None
    ds, what = round_datasets(ctx.root, cfg, len(info["class_names"]), pl_table, zs_table, kept)
    log.info("round %d train set (%s): %d %s", r, cfg.algorithm.name, info["rows"]["labeled"], what)
    counts = info["counts"]["labeled"]
    metrics = fit_round(cfg, ds, class_names=info["class_names"], prior=[c / sum(counts) for c in counts],
                        init_checkpoint=ctx.checkpoint(r - 1), round_idx=r,
                        storage_path=ctx.layout.ray_train, out_dir=ctx.layout.checkpoint(r),
                        tracking_dir=ctx.layout.root, pool_stats=stats)
    storage.write_json(ctx.layout.train_metrics(r), metrics)


def _evaluate(ctx: RunContext, r: int) -> None:
    """Score the test (and OOD test) split with round r's model, then write the round's metrics. Round r's model is
    round r + 1's teacher: the same job scores the pool for round r + 1 (its score phase then finds it done)."""
    from loft_dist.data.quarantine import quarantine
    from loft_dist.eval.evaluate import evaluate_round

    splits = _eval_inputs(ctx, r)
    mode = splits["test"][2]  # zero-shot in round 0
    outs = {split: out for split, (_, out, _) in splits.items()}
    _score_with(ctx, ctx.checkpoint(r), _model_tables(ctx, r))
    for split, out in outs.items():
        quarantine(out, ctx.layout.root, split)
    m = evaluate_round(ctx.cfg, ctx.layout, r, classes=ctx.info["class_names"],
                       labeled_counts=ctx.info["counts"]["labeled"], mode=mode)
    ctx.tracker.log_round(r, m)
    g = m["test"]["groups"]
    log.info("round %d eval: accuracy %.4f (many %s, medium %s, few %s), balanced %.4f", r, m["test"]["accuracy"],
             *(_fmt(g[k]["accuracy"]) for k in ("many", "medium", "few")), m["test"]["balanced_accuracy"])


STEPS = {"prepare": _prepare, "score": _score, "train": _train, "eval": _evaluate}


def _check_phase_outputs(ctx: RunContext, done: list[Phase]) -> None:
    """The tables of the phases state.json records complete are whole (_SUCCESS), or the phases after them would read
    part of one (a run dir copied without its _SUCCESS markers, files deleted). Checked before Ray starts."""
    from loft_dist.data.pseudo_labels import is_complete
    from loft_dist.storage import SUCCESS

    lay = ctx.layout
    for p in done:
        ood = lay.predictions(p.round, "ood_test")  # where the dataset has one
        tables = {"score": [lay.pseudo_labels(p.round)],
                  "eval": [lay.predictions(p.round, "test")] + ([ood] if storage.exists(ood) else [])}.get(p.step, [])
        for t in tables:
            if not is_complete(t):
                raise StorageError(
                    f"{t} has no {SUCCESS}, yet {lay.state} records phase {p.name} complete: the "
                    f"table is partial (copied without its {SUCCESS} marker, or files removed) and later phases would "
                    f"read it. Restore it from the original run dir, or delete {p.name!r} and every phase after it "
                    f"from state.json to redo them")


def run(cfg: Config) -> dict:
    """Run (or resume) every phase of the table; returns the report's summary."""
    from loft_dist.runtime import preflight

    preflight(cfg)  # an unwritable run.storage_path or a missing weights file fails here, before Ray starts
    layout = RunLayout(cfg.run_dir)  # absolute: workers and actors run in other directories
    # One driver per run: a second one (a re-submitted job, a second terminal) stops here, having written nothing.
    with Lease(layout.lease, f"run {layout.root}", cfg.run.lease_timeout_s) as lease:
        return _run_leased(cfg, layout, lease)


def _run_leased(cfg: Config, layout: RunLayout, lease) -> dict:
    from loft_dist.algorithms import get_method
    from loft_dist.eval.report import write_report
    from loft_dist.tracking import Tracker

    _check_same_run(cfg, layout)
    storage.write_text(layout.config, to_yaml(cfg))
    state = RunState(layout)
    R = cfg.rounds.num_rounds if get_method(cfg.algorithm.name).trains else 0  # zero-shot: round 0 is the run
    table = phase_table(R)
    todo = [p for p in table if p.name not in state.done]
    log.info("run %s: %d rounds, %d of %d phases to do%s", layout.root, R, len(todo), len(table),
             f" (resuming after {state.done[-1]})" if state.done else "")
    ctx = RunContext(cfg, layout, storage.absolute(cfg.data_root), R)
    _check_phase_outputs(ctx, [p for p in table if p.name in state.done])
    ctx.tracker = Tracker(layout.root)  # TensorBoard (and MLflow when configured) beside the run's files
    ctx.tracker.log_params(to_dict(cfg), resumable=resumable_keys())
    spent: dict[str, list[float]] = {}  # this driver's phase times by step: the ETA of the phases left
    try:
        for i, p in enumerate(todo):
            lease.check()
            t0 = time.time()
            STEPS[p.step](ctx, p.round)
            lease.check()  # a driver that lost its lease records nothing more
            state.complete(p.name, time.time() - t0)
            spent.setdefault(p.step, []).append(state.times[-1])
            left = todo[i + 1:]
            log.info("phase %s done in %.1f s; %d phases left, ETA %.0f s", p.name, state.times[-1], len(left),
                     sum(fmean(spent.get(q.step) or state.times) for q in left))
    finally:
        ctx.tracker.close(finished=len(state.done) == len(table))
    summary = write_report(layout.root)
    log.info("report: %s", storage.join(layout.report, "report.md"))
    return summary


def _fmt(v) -> str:
    return "n/a (empty group)" if v is None else f"{v:.4f}"
