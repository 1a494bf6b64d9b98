"""`loft-dist compare`: the final rounds of several runs side by side, and, where runs differ only in run.seed, their
mean and spread over the seeds (the papers report methods as mean ± standard deviation over repeated trials)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loft_dist import storage
from loft_dist.data.store import find_dataset_info, load_run_config
from loft_dist.errors import StorageError
from loft_dist.eval import plots
from loft_dist.eval.report import finite, load_rounds, pct
from loft_dist.models.standin import STANDIN

COLUMNS = (  # (header, path into the final round's metrics)
    ("acc", ("test", "accuracy")), ("balanced", ("test", "balanced_accuracy")),
    ("many", ("test", "groups", "many", "accuracy")), ("medium", ("test", "groups", "medium", "accuracy")),
    ("few", ("test", "groups", "few", "accuracy")), ("head", ("test", "tertiles", "head", "accuracy")),
    ("mid", ("test", "tertiles", "mid", "accuracy")), ("tail", ("test", "tertiles", "tail", "accuracy")),
    ("ECE", ("test", "ece")), ("AUROC (MSP)", ("ood_test", "auroc")),
    ("PL precision", ("pseudo_labels", "precision")), ("PL coverage", ("pseudo_labels", "coverage")),
)
PLOTTED = ("acc", "balanced", "many", "medium", "few", "head", "mid", "tail", "AUROC (MSP)",
           "PL precision", "PL coverage")  # ECE is left out: lower is better, unlike every other bar


def _get(d: dict, path: tuple):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _run_labels(run_dirs: list[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _setup_key(cfg: dict) -> str:
    """What makes two runs the same setup: the whole config but the run section (name, seed, storage, Ray) and the
    dataset's location (each seed draws its own splits, so repeated trials prepare one dataset each)."""
    rest = {k: v for k, v in cfg.items() if k != "run"}
    rest["data"] = {k: v for k, v in (rest.get("data") or {}).items() if k != "root"}
    return json.dumps(rest, sort_keys=True, default=str)


def _weights(pretrained) -> str:
    """The model's starting weights as the table shows them: the stand-in is named as what it is, not CLIP."""
    if not pretrained:
        return "(random init)"
    if pretrained == STANDIN:
        return "(CLIP stand-in, not CLIP)"
    return f"({Path(str(pretrained)).name})"


def _read_run(label: str, d: Path) -> dict:
    rounds = [finite(m) for m in load_rounds(d)]
    if not rounds:
        raise StorageError(f"{d} has no rounds/r*/metrics.json; is it a loft_dist run dir?")
    cfg = load_run_config(d)
    info = find_dataset_info(d, cfg) or {}
    test_set = tuple(sorted((k, v) for k, v in (info.get("checksums") or {}).items() if k.startswith("test/"))) or None
    a, p, m = cfg.get("algorithm") or {}, cfg.get("peft") or {}, cfg.get("model") or {}
    final = rounds[-1]
    return {"run": label, "run_dir": str(d), "round": final["round"], "seed": (cfg.get("run") or {}).get("seed"),
            "method": f"{a.get('name', '?')} ({a.get('mode', 'offline')}) / {p.get('method', '?')} / "
                      f"{m.get('name', '?')} {_weights(m.get('pretrained'))}",
            "values": {h: _get(final, path) for h, path in COLUMNS}, "_key": _setup_key(cfg), "_test": test_set}


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs of one setup (config equal but for the run section and data.root), in first-seen order: per column the
    mean and the sample standard deviation over the runs that have the value (std None for fewer than 2)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["_key"], []).append(r)
    out = []
    for members in groups.values():
        mean, std = {}, {}
        for h, _ in COLUMNS:
            vals = [r["values"][h] for r in members if r["values"][h] is not None]
            mean[h] = float(np.mean(vals)) if vals else None
            std[h] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out.append({"method": members[0]["method"], "runs": [r["run"] for r in members],
                    "seeds": [r["seed"] for r in members], "mean": mean, "std": std})
    return out


def _spread(mean, std) -> str:
    return pct(mean) if std is None else f"{pct(mean)} ± {100 * std:.1f}"


def _test_set_notes(rows: list[dict]) -> list[str]:
    known = [r for r in rows if r["_test"] is not None]
    notes = []
    if len({r["_test"] for r in known}) > 1:
        by_seed: dict = {}
        for r in known:
            by_seed.setdefault(r["seed"], set()).add(r["_test"])
        if len(by_seed) > 1 and all(len(v) == 1 for v in by_seed.values()):
            notes.append("Each seed was evaluated on its own test split (run.seed draws the dataset's splits); the "
                         "runs of one seed share one, so methods compare within a seed and the spread includes the "
                         "splits.")
        else:
            notes.append("The runs were evaluated on different test sets (dataset.json checksums differ): "
                         "their numbers are not directly comparable.")
    if len(known) < len(rows):
        notes.append("dataset.json was not found for: " + ", ".join(r["run"] for r in rows if r["_test"] is None)
                     + " — same test set not verified.")
    return notes


def _table(first: str, rows: list[tuple[str, list[str]]]) -> list[str]:
    """A markdown table: `first` holds the leading column headers ("a | b"), each row's label as many cells."""
    return [f"| {first} | " + " | ".join(h for h, _ in COLUMNS) + " |",
            "|" + "---|" * (first.count("|") + 1) + "---:|" * len(COLUMNS),
            *(f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows)]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """compare.md (one row per run, final round; with repeated seeds, a table of mean ± std per setup first),
    compare.json and compare.png in `out_dir`."""
    run_dirs = [Path(d) for d in run_dirs]
    rows = [_read_run(label, d) for label, d in zip(_run_labels(run_dirs), run_dirs)]
    groups = seed_groups(rows)
    repeated = any(len(g["runs"]) > 1 for g in groups)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# loft_dist run comparison", "",
             "Final round of each run; test accuracy by group and tertile, ECE and AUROC (ID test vs OOD test, "
             "MSP) in %; PL = pool pseudo-labels of the final round.", ""]
    if repeated:
        lines += ["## Mean ± standard deviation over seeds", "",
                  "One row per setup (runs whose configs differ only in the run section, run.seed included, and "
                  "data.root); ± is the sample standard deviation over its runs.", "",
                  *_table("method (algorithm (mode) / adapter / model) | seeds",
                          [(f"{g['method']} | {len(g['seeds'])}: {', '.join(map(str, g['seeds']))}",
                            [_spread(g["mean"][h], g["std"][h]) for h, _ in COLUMNS]) for g in groups]),
                  "", "## Every run", ""]
    lines += _table("run | method (algorithm (mode) / adapter / model) | round",
                    [(f"{r['run']} | {r['method']} | {r['round']}", [pct(r["values"][h]) for h, _ in COLUMNS])
                     for r in rows])
    empty = [h for h, _ in COLUMNS if all(r["values"][h] is None for r in rows)]
    notes = _test_set_notes(rows)
    if empty:
        notes.insert(0, f"– = not available: {', '.join(empty)} is empty or unmeasured in every run (an empty "
                        "many / medium / few group has no class with that labeled count).")
    if repeated:  # one bar per setup, its seeds' spread as the error bar
        plots.compare_bars(out / "compare.png", [g["method"] for g in groups], list(PLOTTED),
                           [[g["mean"][h] for h in PLOTTED] for g in groups],
                           errors=[[g["std"][h] for h in PLOTTED] for g in groups])
    else:
        plots.compare_bars(out / "compare.png", [r["run"] for r in rows], list(PLOTTED),
                           [[r["values"][h] for h in PLOTTED] for r in rows])
    what = "mean over seeds (error bar: standard deviation)" if repeated else "of each run side by side"
    lines += [*(["", *notes] if notes else []), "", "![Final-round metrics](compare.png)", "",
              f"*compare.png* — final-round metrics (%), {what}; – marks a value that is not available (ECE is in "
              "the table only: lower is better)."]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    summary = {"runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
               "groups": groups, "notes": notes, "plots": ["compare.png"]}
    storage.write_json(out / "compare.json", summary)
    return summary
