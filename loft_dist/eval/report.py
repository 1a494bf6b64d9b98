"""`loft-dist report`: the run's rounds gathered into report/metrics.json, report.md and the PNG figures.

Reads only what the run wrote: rounds/r*/metrics.json, the pool's pseudo-label tables and the last
round's test predictions (a few columns), config.yaml and dataset.json, and for gallery.html the few pool
images it shows (eval/gallery.py). Nothing here starts Ray or loads a model, so a report can be rewritten
anywhere the run dir is readable.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loft_dist import storage
from loft_dist.data.pseudo_labels import is_complete, read_columns, table_files
from loft_dist.data.quarantine import quarantined_counts
from loft_dist.data.store import find_dataset_info, find_dataset_root, load_run_config, split_exists
from loft_dist.errors import StorageError
from loft_dist.eval import plots
from loft_dist.eval.gallery import write_gallery
from loft_dist.models.standin import describe_pretrained, zero_shot_label

log = logging.getLogger(__name__)

GROUPS = ("many", "medium", "few")
TERTILES = ("head", "mid", "tail")
PLOTS = {  # file → what it shows; a file not written this time is removed, so report/ never shows stale figures
    "accuracy_by_round.png": "Test accuracy by round, overall and by group",
    "per_class_accuracy.png": "Per-class test accuracy against labeled class frequency",
    "worst_classes_confusion.png": "Confusion summary of the worst classes",
    "reliability.png": "Reliability diagram",
    "pool_score_histograms.png": "MSP and zero-shot MSP of ID vs OOD pool images",
    "pseudo_labels_by_round.png": "Pseudo-label precision and coverage by round",
    "pseudo_labels_by_class.png": "Pseudo-label precision and recall by class frequency",
}
GALLERY = "gallery.html"  # the pseudo-label gallery (eval/gallery.py), removed like a stale figure when not written
WORST_K = 8  # rows of the confusion summary
CONFUSIONS_PER_CLASS = 3
HIST_BINS = np.linspace(0.0, 1.0, 41)  # score histograms: 40 bins of 0.025


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def load_rounds(run_dir: str | Path) -> list[dict]:
    lay = storage.RunLayout(str(run_dir))
    return [storage.read_json(lay.metrics(r)) for r in lay.rounds() if storage.is_file(lay.metrics(r))]


def finite(obj):
    """Non-finite floats → None, so a metrics.json written by hand or by older code cannot put NaN in the report."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _group_rules(cfg: dict) -> dict[str, str]:
    e = cfg.get("eval") or {}
    many, few = e.get("many_threshold", 100), e.get("few_threshold", 20)
    return {"many": f"> {many} labels", "medium": f"{few}–{many} labels", "few": f"< {few} labels"}


def _last_with(rounds: list[dict], pred) -> dict | None:
    return next((m for m in reversed(rounds) if pred(m)), None)


# --------------------------------------------------------------------------------------------
# data behind each figure
# --------------------------------------------------------------------------------------------
def _accuracy_figure(path: Path, rounds: list[dict], rules: dict[str, str]) -> Path:
    idx = [m["round"] for m in rounds]
    t = [m["test"] for m in rounds]
    labels = {g: f"{g} ({rules[g]})" + (": empty" if all(x["groups"][g]["empty"] for x in t) else "") for g in GROUPS}
    return plots.accuracy_by_round(
        path, idx,
        {k: [x[k] for x in t] for k in ("accuracy", "balanced_accuracy")},
        {g: [x["groups"][g]["accuracy"] for x in t] for g in GROUPS},
        {g: [x["tertiles"][g]["accuracy"] for x in t] for g in TERTILES}, labels)


def class_groups(test: dict, num_classes: int) -> list[str]:
    group = ["medium"] * num_classes
    for g in GROUPS:
        for c in test["groups"][g]["classes"]:
            group[c] = g
    return group


def _pseudo_label_series(rounds: list[dict], tertiles: dict[str, list[int]]) -> dict:
    """Per-round overall quality and class-averaged quality per tertile, from rounds whose pool had ground truth."""
    with_truth = [m for m in rounds if "precision" in (m.get("pseudo_labels") or {})]
    series = {"rounds": [m["round"] for m in with_truth], "overall": {}, "precision": {}, "recall": {}}
    for key in ("precision", "hard_precision", "soft_precision", "coverage"):
        series["overall"][key] = [m["pseudo_labels"].get(key) for m in with_truth]
    series["overall"]["ood_admitted_rate"] = [
        m["pseudo_labels"]["ood_admitted"] / m["pseudo_labels"]["ood_total"] if m["pseudo_labels"]["ood_total"] else None
        for m in with_truth]
    for name, classes in tertiles.items():
        series["precision"][name] = [_mean(m["pseudo_labels"]["precision_per_class"][c] for c in classes)
                                     for m in with_truth]
        series["recall"][name] = [_mean(m["pseudo_labels"]["recall_per_class"][c] for c in classes)
                                  for m in with_truth]
    return series


def _pool_histograms(table_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Bin counts of `msp` and `zs_msp` per ground-truth group, streamed batch by batch: the pool may hold
    hundreds of millions of rows, so neither its columns nor Python strings of them are held whole."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    groups = ("ID images", "OOD images", "ground truth unknown")
    counts = {s: {g: np.zeros(len(HIST_BINS) - 1, np.int64) for g in groups} for s in ("msp", "zs_msp")}
    for f in table_files(table_dir):  # the same _SUCCESS rule as read_columns
        for batch in pq.ParquetFile(storage.open_input(f)).iter_batches(columns=["msp", "zs_msp", "true_label", "error"],
                                                    batch_size=1 << 16):
            ok = pc.equal(batch.column("error"), "").to_numpy(zero_copy_only=False)
            truth = batch.column("true_label").to_numpy(zero_copy_only=False).astype(float)  # null → NaN
            masks = {"ID images": ok & (truth >= 0), "OOD images": ok & (truth < 0),
                     "ground truth unknown": ok & np.isnan(truth)}
            for score in counts:
                values = batch.column(score).to_numpy(zero_copy_only=False).astype(float)
                for g, mask in masks.items():
                    v = values[mask]
                    counts[score][g] += np.histogram(v[~np.isnan(v)], bins=HIST_BINS)[0]
    return counts


def _histogram_panels(lay: storage.RunLayout, rounds: list[dict], cfg: dict) -> tuple[list[dict], int | None]:
    """Panels of the pool's zero-shot MSP and of the latest teacher's MSP, split by ground truth (ID / OOD)."""
    tables = [m["round"] for m in rounds if is_complete(lay.pseudo_labels(m["round"]))]
    if not tables:
        return [], None
    r = tables[-1]
    counts = _pool_histograms(lay.pseudo_labels(r))
    a = cfg.get("algorithm") or {}
    pool_ood = next((m.get("pool_ood") for m in rounds if m["round"] == r), None) or {}

    def auroc(key):
        v = (pool_ood.get(key) or {}).get("auroc")
        return "" if v is None else f", AUROC ID vs OOD {100 * v:.1f}%"

    def groups(score):  # "unknown" appears only for pools without ground truth; ID / OOD always, even if empty
        return {g: c for g, c in counts[score].items() if g != "ground truth unknown" or c.sum()}

    panels = []
    if sum(c.sum() for c in counts["zs_msp"].values()):  # NaN everywhere: the run kept no zero-shot score
        lines = {"zs_threshold": a["zs_threshold"]} if a.get("zs_filter") and "zs_threshold" in a else {}
        panels.append({"title": f"Zero-shot MSP of the pool (stage-1 score){auroc('zs_msp')}",
                       "xlabel": "zero-shot max softmax probability", "bins": HIST_BINS, "groups": groups("zs_msp"),
                       "lines": lines})
    if r >= 1:
        lines = {k: a[k] for k in ("c_hard", "c_ood") if k in a}
        panels.append({"title": f"Teacher MSP of the pool, round {r}{auroc('msp')}",
                       "xlabel": f"max softmax probability (teacher of round {r})", "bins": HIST_BINS,
                       "groups": groups("msp"), "lines": lines})
    return panels, r


def _confusion(lay: storage.RunLayout, final: dict, num_classes: int) -> dict | None:
    """Worst classes of the final round and where their test images go (from predictions/test)."""
    table = lay.predictions(final["round"], "test")
    if not is_complete(table):
        return None
    cols = read_columns(table, ["true_label", "pred", "error"])
    ok = (cols["error"] == "") & (cols["true_label"] >= 0)
    y, p = cols["true_label"][ok].astype(np.int64), cols["pred"][ok].astype(np.int64)
    if y.size == 0:
        return None
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (y, p), 1)
    acc = final["test"]["per_class_accuracy"]
    present = [c for c in range(num_classes) if acc[c] is not None]
    worst = sorted(present, key=lambda c: (acc[c], c))[:WORST_K]
    rows = []
    for c in worst:
        top = [int(k) for k in np.argsort(-matrix[c], kind="stable")[:CONFUSIONS_PER_CLASS] if matrix[c, k] > 0]
        rows.append({"class": c, "n": int(matrix[c].sum()), "accuracy": acc[c],
                     "predicted_as": [{"class": k, "share": float(matrix[c, k] / matrix[c].sum())} for k in top]})
    cols_ = list(dict.fromkeys(k["class"] for r in rows for k in r["predicted_as"]))
    shares = np.array([[matrix[r["class"], k] / r["n"] for k in cols_] for r in rows], dtype=float)
    shares = np.hstack([shares, 1.0 - shares.sum(axis=1, keepdims=True)]).clip(0, 1)
    return {"rows": rows, "columns": cols_, "shares": shares}


# --------------------------------------------------------------------------------------------
# the report: one section function per heading, appending to a shared _Report
# --------------------------------------------------------------------------------------------
@dataclass
class _Report:
    layout: storage.RunLayout
    out: Path
    rounds: list[dict]
    cfg: dict
    names: list[str]
    labeled: list[int] | None  # labeled images per class; None when dataset.json is not found
    rules: dict[str, str]
    lines: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.rounds[-1]

    def figure(self, name: str, caption: str, fn, *args) -> None:
        """Draw `name` and embed it with its caption; a figure that fails costs a note, not the report."""
        try:
            fn(self.out / name, *args)
        except Exception as e:  # noqa: BLE001
            log.warning("report: figure %s not written: %s: %s", name, type(e).__name__, e)
            self.notes.append(f"{name} could not be drawn ({type(e).__name__}: {e}).")
            return
        self.written.append(name)
        self.lines += ["", f"![{PLOTS[name]}]({name})", "", f"*{name}* — {caption}"]


def _data_summary(info: dict | None, cfg: dict) -> list[str]:
    lines = []
    if info:
        lab = info["counts"]["labeled"]
        rows, ood = info.get("rows", {}), info.get("ood_counts", {})
        lines.append(f"Data: {len(info['class_names'])} classes; labeled {sum(lab)} images ({max(lab)} → {min(lab)} "
                     f"per class, imbalance {max(lab) / max(min(lab), 1):.1f}); pool {rows.get('unlabeled', '–')} "
                     f"(of which OOD {ood.get('unlabeled', 0)}); test {rows.get('test', '–')}; "
                     f"OOD test {rows.get('ood_test', 0)}.")
    a, m, p = cfg.get("algorithm") or {}, cfg.get("model") or {}, cfg.get("peft") or {}
    if a:
        from loft_dist.algorithms import METHODS

        summary = METHODS[a["name"]].summary if a.get("name") in METHODS else a.get("name")
        lines.append(f"Method: `{a.get('name')}` — {summary}. This run: c_hard {a.get('c_hard')}, c_ood "
                     f"{a.get('c_ood')}, zero-shot filter {'on' if a.get('zs_filter') else 'off'}; model "
                     f"{m.get('name')} ({describe_pretrained(m.get('pretrained') or 'random init')}), peft.method "
                     f"{p.get('method')}; "
                     f"{(cfg.get('rounds') or {}).get('num_rounds', '–')} rounds.")
    return lines


def _section_accuracy(rep: _Report) -> list[str]:
    """The accuracy table of every round and its figure; returns the empty groups of the final round."""
    rep.lines += ["Accuracy in % on the test split; groups by labeled count (many / medium / few) and by frequency "
                  f"tertiles (head / mid / tail). Round 0 is "
                  f"{zero_shot_label((rep.cfg.get('model') or {}).get('pretrained', ''))}.", "",
                  "| round | model | acc | balanced | macro-F1 | many | medium | few | head | mid | tail | ECE | AUROC (MSP) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in rep.rounds:
        t, g, tt = m["test"], m["test"]["groups"], m["test"]["tertiles"]
        auroc = m.get("ood_test", {}).get("auroc")
        rep.lines.append(f"| {m['round']} | {m['model']} | {pct(t['accuracy'])} | {pct(t['balanced_accuracy'])} | "
                         f"{pct(t['macro_f1'])} | " + " | ".join(pct(g[k]['accuracy']) for k in GROUPS)
                         + " | " + " | ".join(pct(tt[k]['accuracy']) for k in TERTILES)
                         + f" | {pct(t['ece'])} | {pct(auroc)} |")
    empty = [k for k in GROUPS if rep.final["test"]["groups"][k]["empty"]]
    if empty:
        rep.lines += ["", "Empty groups: " + "; ".join(f"{k} — no class has {rep.rules[k]}" for k in empty)
                      + ". Shown as – in the tables and left out of the plots; the tertiles are never empty."]
    rep.figure("accuracy_by_round.png", "test accuracy (%) per round: overall, class-balanced, and by labeled-count "
               "group (left) or frequency tertile (right).", _accuracy_figure, rep.rounds, rep.rules)
    return empty


def _section_per_class(rep: _Report) -> list[dict]:
    """Per-class accuracy of the final round and the worst classes' confusions; returns the worst classes."""
    final, names = rep.final, rep.names
    rep.lines += ["", f"## Per-class accuracy (round {final['round']})"]
    acc = final["test"]["per_class_accuracy"]
    if rep.labeled is None:
        rep.lines += ["", "dataset.json of the run was not found, so classes cannot be ordered by labeled count; "
                      "no per-class figure."]
    else:
        missing = sum(a is None for a in acc)
        rep.figure("per_class_accuracy.png", "bars: test accuracy (%) of each class, sorted by labeled count and "
                   "coloured by group; line: labeled images per class."
                   + (f" {missing} classes have no test images and no bar." if missing else ""),
                   plots.per_class_accuracy, names, acc, rep.labeled, class_groups(final["test"], len(names)),
                   final["round"])
    conf = _confusion(rep.layout, final, len(names))
    if conf is None:
        rep.lines += ["", f"No complete rounds/r{final['round']}/predictions/test table: no confusion summary."]
        return []
    rep.lines += ["", f"### Worst classes (round {final['round']})", "",
                  "| class | labeled | test images | accuracy | most often predicted as |", "|---|---|---|---|---|"]
    worst = []
    for r in conf["rows"]:
        where = ", ".join(f"{names[k['class']]} {100 * k['share']:.0f}%" for k in r["predicted_as"]) or "–"
        rep.lines.append(f"| {names[r['class']]} | {rep.labeled[r['class']] if rep.labeled else '–'} | {r['n']} | "
                         f"{pct(r['accuracy'])} | {where} |")
        worst.append({"class": r["class"], "name": names[r["class"]], "test_images": r["n"], "accuracy": r["accuracy"],
                      "predicted_as": [{**k, "name": names[k["class"]]} for k in r["predicted_as"]]})
    rep.figure("worst_classes_confusion.png", "rows: the classes with the lowest test accuracy; columns: every class "
               f"among a row's {CONFUSIONS_PER_CLASS} most frequent predictions, then all others; cells: share (%) of "
               "the row's test images.", plots.confusion_worst, [names[r["class"]] for r in conf["rows"]],
               [names[k] for k in conf["columns"]] + ["other"], conf["shares"],
               [r["accuracy"] for r in conf["rows"]], final["round"])
    return worst


def _section_calibration(rep: _Report) -> None:
    rep.lines += ["", "## Calibration"]
    first, final = rep.rounds[0], rep.final
    diagrams = [{"title": f"Round {m['round']} — {m['model']}, ECE {pct(m['test']['ece'])}%",
                 "bins": m["test"]["reliability"]}
                for m in ([first] if first is final else [first, final]) if m["test"].get("reliability")]
    if not diagrams:
        rep.lines += ["", "No reliability data (the evaluation recorded no confidences)."]
        return
    rep.figure("reliability.png", "top: accuracy of the test images in each confidence bin (blue) and the gap to the "
               "bin's mean confidence (hatched); the dashed diagonal is perfect calibration. Bottom: share (%) of "
               "test images per bin.", plots.reliability, diagrams)


def _section_ood(rep: _Report) -> None:
    rep.lines += ["", "## OOD detection", "",
                  "| round | OOD test AUROC | AUPR-in | AUPR-out | FPR@95 | pool AUROC (MSP) | pool AUROC (zero-shot MSP) |",
                  "|---|---|---|---|---|---|---|"]
    for m in rep.rounds:
        o, po = m.get("ood_test") or {}, m.get("pool_ood") or {}
        rep.lines.append(f"| {m['round']} | {pct(o.get('auroc'))} | {pct(o.get('aupr_in'))} | "
                         f"{pct(o.get('aupr_out'))} | {pct(o.get('fpr95'))} | "
                         f"{pct((po.get('msp') or {}).get('auroc'))} | {pct((po.get('zs_msp') or {}).get('auroc'))} |")
    rep.lines += ["", "MSP = max softmax probability, higher = more in-distribution; – = no OOD images to compare with."]
    panels, r = _histogram_panels(rep.layout, rep.rounds, rep.cfg)
    if not panels:
        rep.lines += ["", "No complete pseudo-label table of the pool: no score histograms."]
        return
    no_ood = all(p["groups"]["OOD images"].sum() == 0 for p in panels)
    rep.figure("pool_score_histograms.png", f"pool images of round {r}'s pseudo-label table, by ground truth: share "
               "(%) of each group per score bin; dashed lines are the decision thresholds."
               + (" This pool holds no OOD images, so only ID images are shown." if no_ood else ""),
               plots.score_histograms, panels)


def _section_pseudo_labels(rep: _Report) -> None:
    rep.lines += ["", "## Pseudo-labels of the pool, per round", "",
                  "| round | hard | soft | rejected (MSP ≤ c_ood) | OOD (zero-shot filter) | coverage | precision | "
                  "hard precision | soft precision | OOD admitted |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for m in rep.rounds:
        p = m.get("pseudo_labels")
        if p:
            c = p["counts"]
            rep.lines.append(f"| {m['round']} | {c['hard']} | {c['soft']} | {c['rejected']} | {c['ood']} | "
                             f"{pct(p.get('coverage'))} | {pct(p.get('precision'))} | "
                             f"{pct(p.get('hard_precision'))} | {pct(p.get('soft_precision'))} | "
                             f"{p.get('ood_admitted', '–')} / {p.get('ood_total', '–')} |")
    rep.lines += ["", "Coverage = accepted ID images / ID images in the pool; precision = right / accepted, an "
                  "admitted OOD image counting as wrong, and the same among the hard and the soft ones; – = nothing accepted. "
                  "Round r's table is what round r + 1 trains on."]
    from loft_dist.algorithms import METHODS

    a = rep.cfg.get("algorithm") or {}
    if a.get("name") in METHODS and not METHODS[a["name"]].pseudo_labels:
        rep.lines += ["", f"`{a['name']}` trains on labeled data only: the pool is scored each round for these "
                      "statistics, never trained on."]
    elif a.get("mode") == "online":
        rep.lines += ["", "Online mode: these tables are the pool scored by each round's starting model; the student "
                      "trains on per-step decisions from its own weak view (their shares are in the training metrics)."]
    series = _pseudo_label_series(rep.rounds, {k: rep.final["test"]["tertiles"][k]["classes"] for k in TERTILES})
    if not series["rounds"]:
        rep.lines += ["", "The pool has no ground truth: pseudo-label precision and coverage cannot be measured."]
        return
    rep.figure("pseudo_labels_by_round.png", "left: precision and coverage (%) of the accepted pseudo-labels and the "
               "share of the pool's OOD images admitted; right: per-class precision and recall (accepted and right / "
               "ID images of the class), averaged within each frequency tertile (a tertile with no accepted image has "
               "no precision point).", plots.pseudo_labels_by_round, series["rounds"], series["overall"],
               series["precision"], series["recall"])
    last = _last_with(rep.rounds, lambda m: "precision_per_class" in (m.get("pseudo_labels") or {}))
    if rep.labeled is not None:
        p = last["pseudo_labels"]
        rep.figure("pseudo_labels_by_class.png", f"round {last['round']}: per-class precision (by pseudo-label) and "
                   "recall (accepted and right, by true class), classes sorted by labeled count.",
                   plots.pseudo_labels_by_class, rep.names, p["precision_per_class"], p["recall_per_class"],
                   rep.labeled, last["round"])


def _section_gallery(rep: _Report) -> dict | None:
    """gallery.html of the last round r >= 1 with a pool table the method trains on, linked from report.md; returns
    {round, images} or None (no gallery: round 0 alone, a method that trains on labeled data only, no images)."""
    from loft_dist.algorithms import METHODS

    a = rep.cfg.get("algorithm") or {}
    if a.get("name") in METHODS and not METHODS[a["name"]].pseudo_labels:
        return None  # lp, lft, fft, zero_shot: the pool is scored for statistics only, never trained on
    tables = [r for r in rep.layout.rounds() if r >= 1 and is_complete(rep.layout.pseudo_labels(r))]
    if not tables:
        return None
    r, root = tables[-1], find_dataset_root(rep.layout.root, rep.cfg)
    if root is None or not split_exists(root, "unlabeled") or "c_hard" not in a:
        rep.notes.append("No pseudo-label gallery: " + ("config.yaml names no algorithm.c_hard." if root else
                                                        "the pool images (the dataset's unlabeled split) were not found."))
        return None
    try:
        g = write_gallery(rep.layout.pseudo_labels(r), root, rep.names, a["c_hard"], a.get("c_ood", 0.0),
                          str(rep.out / GALLERY), title=f"Pseudo-label gallery — {rep.layout.name}, round {r}")
    except Exception as e:  # noqa: BLE001 - like a figure: a gallery that fails costs a note, not the report
        log.warning("report: %s not written: %s: %s", GALLERY, type(e).__name__, e)
        rep.notes.append(f"{GALLERY} could not be written ({type(e).__name__}: {e}).")
        return None
    missing = f", {g['missing']} not found" if g["missing"] else ""
    rep.lines += ["", f"Pseudo-label gallery: [{GALLERY}]({GALLERY}) — pool images of round {r}'s table per class: "
                  f"most confident accepted, nearest the thresholds, wrong pseudo-labels, rejected / OOD "
                  f"({g['images']} images{missing})."]
    return {"file": GALLERY, "round": r, "images": g["images"], "missing": g["missing"]}


def write_report(run_dir: str | Path) -> dict:
    """report/report.md, report/metrics.json and the figures of a run dir; returns the summary written. A run dir in
    object storage gets its report written locally first, then committed into it (matplotlib writes local files)."""
    lay = storage.RunLayout(str(run_dir))
    if storage.is_local(lay.root):
        return _write_report(lay, Path(storage.resolve(lay.report)[1]))
    with tempfile.TemporaryDirectory(prefix="loft_dist-report-") as tmp:
        summary = _write_report(lay, Path(tmp))
        staged = storage.staging(lay.report)
        storage.upload_dir(tmp, staged)
        storage.commit(staged, lay.report)
    return summary


def _write_report(lay: storage.RunLayout, out: Path) -> dict:
    rounds = [finite(m) for m in load_rounds(lay.root)]
    if not rounds:
        raise StorageError(f"{lay.root} has no rounds/r*/metrics.json; is it a loft_dist run dir?")
    cfg = load_run_config(lay.root)
    info = find_dataset_info(lay.root, cfg)
    num_classes = len(rounds[-1]["test"]["per_class_accuracy"])
    rep = _Report(layout=lay, out=out, rounds=rounds, cfg=cfg,
                  names=info["class_names"] if info else [f"class {c}" for c in range(num_classes)],
                  labeled=info["counts"]["labeled"] if info else None, rules=_group_rules(cfg))
    rep.out.mkdir(exist_ok=True)
    quarantined = quarantined_counts(lay.root)

    rep.lines += [f"# loft_dist report — {lay.name}", "", *_data_summary(info, cfg), ""]
    empty = _section_accuracy(rep)
    worst = _section_per_class(rep)
    _section_calibration(rep)
    _section_ood(rep)
    _section_pseudo_labels(rep)
    gallery = _section_gallery(rep)
    rep.lines += ["", "## Quarantine", "",
                  ("No undecodable images." if not quarantined else
                   ", ".join(f"{split}: {n} images (list in quarantine/{split}.jsonl)"
                             for split, n in quarantined.items()))]
    if rep.notes:
        rep.lines += ["", "## Notes", "", *(f"- {n}" for n in rep.notes)]
    for stale in (set(PLOTS) - set(rep.written)) | (set() if gallery else {GALLERY}):
        (rep.out / stale).unlink(missing_ok=True)

    summary = {"run_dir": lay.root, "class_names": rep.names, "rounds": rounds, "final": rep.final,
               "empty_groups": {k: rep.rules[k] for k in empty}, "worst_classes": worst, "quarantined": quarantined,
               "plots": {name: PLOTS[name] for name in rep.written}, "gallery": gallery, "notes": rep.notes}
    storage.write_json(rep.out / "metrics.json", summary)
    (rep.out / "report.md").write_text("\n".join(rep.lines) + "\n")
    return summary
