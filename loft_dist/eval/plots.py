"""The report's figures: one function per PNG, each taking plain lists/arrays and writing one file.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never `pyplot`: no global figure
state and no display backend, so a report can be written on a headless node or inside a Ray worker.
Missing values (None: an empty group, a class without test images) are left out of a figure, never drawn
as NaN; every caller-facing "why is this missing" lives in the report text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

DPI = 110
GROUP_COLORS = {"many": "#1b9e77", "medium": "#d95f02", "few": "#7570b3"}
TERTILE_COLORS = {"head": "#1f78b4", "mid": "#33a02c", "tail": "#e31a1c"}
MAX_TICK_LABELS = 40  # beyond this, class names overlap; the axis shows ranks instead


def _figure(width: float, height: float, **kw) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _pct(values) -> np.ndarray:
    """Fractions → percent, None → NaN for matplotlib's gap handling (NaN never leaves this module)."""
    return np.array([np.nan if v is None else 100.0 * v for v in values], dtype=float)


def _class_axis(ax, names: list[str], label: str) -> None:
    if len(names) <= MAX_TICK_LABELS:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60 if max(map(len, names), default=0) > 3 else 0, ha="right", fontsize=8)
        ax.set_xlabel(label)
    else:
        ax.set_xlabel(label + " (rank; names in report/metrics.json)")


def _line(ax, x, y, **kw) -> bool:
    """Plot y against x if any value is known; returns whether it drew (an all-None series gets no legend entry)."""
    y = _pct(y)
    if np.all(np.isnan(y)):
        return False
    kw.setdefault("marker", "o")
    ax.plot(x, y, **kw)
    return True


def accuracy_by_round(path, rounds: list[int], overall: dict[str, list], groups: dict[str, list],
                      tertiles: dict[str, list], group_labels: dict[str, str]) -> Path:
    """Two panels over rounds: overall / balanced with Many-Medium-Few, and with the frequency tertiles.

    ``overall``/``groups``/``tertiles`` map a series name to one accuracy (fraction or None) per round;
    ``group_labels`` gives each group's legend text (its count rule, or why it is empty).
    """
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, series, colors, title in ((axes[0], groups, GROUP_COLORS, "by labeled-count group"),
                                      (axes[1], tertiles, TERTILE_COLORS, "by class-frequency tertile")):
        _line(ax, rounds, overall["accuracy"], color="black", lw=2, label="overall")
        _line(ax, rounds, overall["balanced_accuracy"], color="grey", ls="--", label="balanced (class mean)")
        for name, values in series.items():
            drawn = _line(ax, rounds, values, color=colors[name], label=group_labels.get(name, name))
            if not drawn:  # keeps the empty group visible in the legend, with its reason
                ax.plot([], [], color=colors[name], ls=":", label=group_labels.get(name, name))
        ax.set_title(f"Test accuracy {title}")
        ax.set_xlabel("round (0 = zero-shot)")
        ax.set_xticks(rounds)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("accuracy (%)")
    return _save(fig, path)


def per_class_accuracy(path, names: list[str], accuracy: list, labeled_counts: list[int], groups: list[str],
                       round_idx: int) -> Path:
    """Bars of per-class test accuracy, classes sorted by labeled count (most first), coloured by group, with
    the labeled count on a second axis. ``groups[c]`` is "many" / "medium" / "few"."""
    order = np.argsort(-np.asarray(labeled_counts), kind="stable")
    acc = _pct([accuracy[c] for c in order])
    fig = _figure(max(8.0, min(16.0, 0.28 * len(names) + 4)), 4.5)
    ax = fig.subplots()
    x = np.arange(len(order))
    colors = [GROUP_COLORS[groups[c]] for c in order]
    ax.bar(x[~np.isnan(acc)], acc[~np.isnan(acc)], color=np.asarray(colors)[~np.isnan(acc)], width=0.85)
    if len(x) <= MAX_TICK_LABELS:  # a zero-height bar is invisible: say 0, and say which classes had no test images
        for xi, a in zip(x, acc):
            if np.isnan(a) or a == 0:
                ax.text(xi, 0.5, "n/a" if np.isnan(a) else "0", ha="center", va="bottom", fontsize=7)
    legend = [Patch(color=color, label=f"{g} ({sum(1 for c in order if groups[c] == g)} classes)")
              for g, color in GROUP_COLORS.items()]
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    _class_axis(ax, [names[c] for c in order], "class, sorted by labeled count (most → fewest)")
    twin = ax.twinx()
    twin.plot(x, np.asarray(labeled_counts)[order], color="black", marker=".", lw=1.2, label="labeled images")
    twin.set_ylabel("labeled images per class")
    twin.set_ylim(0, max(max(labeled_counts, default=1) * 1.1, 1))
    ax.legend(handles=legend + twin.get_legend_handles_labels()[0], fontsize=8, loc="upper right")
    ax.set_title(f"Per-class test accuracy against labeled class frequency — round {round_idx}")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def pseudo_labels_by_round(path, rounds: list[int], overall: dict[str, list], tertile_precision: dict[str, list],
                           tertile_recall: dict[str, list]) -> Path:
    """Pool pseudo-label quality over rounds: overall precision / coverage (left) and the class-averaged
    precision and recall of each frequency tertile (right)."""
    fig = _figure(11, 4.2)
    left, right = fig.subplots(1, 2, sharey=True)
    styles = {"precision": ("black", "-"), "hard_precision": ("#1b9e77", "--"), "soft_precision": ("#d95f02", "--"),
              "coverage": ("#1f78b4", "-"), "ood_admitted_rate": ("#e31a1c", ":")}
    labels = {"precision": "precision (accepted)", "hard_precision": "precision (hard)",
              "soft_precision": "precision (soft)", "coverage": "coverage (accepted ID / ID)",
              "ood_admitted_rate": "OOD admitted / OOD in pool"}
    for key, values in overall.items():
        color, ls = styles[key]
        _line(left, rounds, values, color=color, ls=ls, label=labels[key])
    left.set_title("Pool pseudo-labels: precision and coverage")
    for name, color in TERTILE_COLORS.items():
        _line(right, rounds, tertile_precision[name], color=color, ls="-", label=f"{name}: precision")
        _line(right, rounds, tertile_recall[name], color=color, ls="--", marker="s", label=f"{name}: recall")
    right.set_title("By class-frequency tertile (class-averaged)")
    for ax in (left, right):
        ax.set_xlabel("round (pool scored by the model before the round's training)")
        ax.set_xticks(rounds)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    left.set_ylabel("%")
    return _save(fig, path)


def pseudo_labels_by_class(path, names: list[str], precision: list, recall: list, labeled_counts: list[int],
                           round_idx: int) -> Path:
    """Per-class pseudo-label precision (by pseudo-label) and recall (accepted and right, by true class),
    classes sorted by labeled count."""
    order = np.argsort(-np.asarray(labeled_counts), kind="stable")
    x = np.arange(len(order))
    fig = _figure(max(8.0, min(16.0, 0.28 * len(names) + 4)), 4.5)
    ax = fig.subplots()
    prec = _pct([precision[c] for c in order])
    rec = _pct([recall[c] for c in order])
    small = len(names) > 100  # a thousand full-size markers hide each other
    ax.plot(x, rec, color="#1f78b4", marker="s", ms=2 if small else 4, lw=0.6 if small else 1,
            label="recall: accepted and right / ID pool images of the class")
    ax.plot(x, prec, color="black", marker="o", ms=2.5 if small else 5, lw=0,
            label="precision: right / accepted as the class")
    missing = int(np.isnan(prec).sum())
    if missing:
        ax.plot([], [], lw=0, label=f"({missing} classes received no pseudo-label: no precision point)")
    ax.set_ylim(-3, 103)
    ax.set_ylabel("%")
    _class_axis(ax, [names[c] for c in order], "class, sorted by labeled count (most → fewest)")
    ax.set_title(f"Pseudo-label precision and recall by class frequency — round {round_idx}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def score_histograms(path, panels: list[dict]) -> Path:
    """Histograms of a score for ID vs OOD pool images, one panel per score.

    Each panel: {"title", "xlabel", "bins": edges, "groups": {legend: counts per bin}, "lines": {legend: x}};
    each group is drawn as its share (%) per bin, so a small OOD set stays visible next to a large ID set.
    """
    fig = _figure(5.5 * len(panels), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    colors = ["#1f78b4", "#e31a1c", "grey"]
    for ax, panel in zip(axes, panels):
        for color, (label, counts) in zip(colors, panel["groups"].items()):
            n = int(np.sum(counts))
            if n == 0:
                ax.plot([], [], color=color, label=f"{label}: none")
                continue
            ax.stairs(100.0 * np.asarray(counts) / n, panel["bins"], fill=True, alpha=0.45, color=color,
                      label=f"{label} (n={n})")
            ax.stairs(100.0 * np.asarray(counts) / n, panel["bins"], color=color)
        for (label, x), ls in zip(panel.get("lines", {}).items(), ("--", ":", "-.")):
            ax.axvline(x, color="black", ls=ls, lw=1, label=f"{label} = {x:g}")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"])
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("share of the group's images (%)")
    return _save(fig, path)


def reliability(path, diagrams: list[dict]) -> Path:
    """Reliability diagrams (accuracy vs confidence per bin, with each bin's share of images below).

    Each diagram: {"title", "bins": metrics' reliability list of {lo, hi, count, confidence, accuracy}}.
    """
    fig = _figure(5.2 * len(diagrams), 5.6)
    grid = fig.add_gridspec(2, len(diagrams), height_ratios=(3, 1), hspace=0.08)
    for j, d in enumerate(diagrams):
        top = fig.add_subplot(grid[0, j])
        bottom = fig.add_subplot(grid[1, j], sharex=top)
        lo = np.array([b["lo"] for b in d["bins"]])
        width = np.array([b["hi"] - b["lo"] for b in d["bins"]])
        full = np.array([b["count"] > 0 for b in d["bins"]])
        acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in d["bins"]], dtype=float)
        conf = np.array([b["confidence"] if b["count"] else 0.0 for b in d["bins"]], dtype=float)
        top.bar(lo[full], acc[full], width=width[full], align="edge", color="#1f78b4", edgecolor="white",
                label="accuracy in bin")
        top.bar(lo[full], conf[full] - acc[full], bottom=acc[full], width=width[full], align="edge",
                color="none", edgecolor="#e31a1c", hatch="//", label="gap to mean confidence")
        top.plot([0, 1], [0, 1], color="grey", ls="--", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(d["title"], fontsize=10)
        top.legend(fontsize=8, loc="upper left")
        top.grid(alpha=0.3)
        top.tick_params(labelbottom=False)
        counts = np.array([b["count"] for b in d["bins"]], dtype=float)
        bottom.bar(lo, 100.0 * counts / max(counts.sum(), 1.0), width=width, align="edge", color="grey")
        bottom.set_xlabel("confidence (max softmax probability)")
        bottom.set_ylabel("images (%)")
        bottom.grid(alpha=0.3)
    return _save(fig, path)


def confusion_worst(path, row_names: list[str], col_names: list[str], shares: np.ndarray, row_acc: list,
                    round_idx: int) -> Path:
    """Heat map: rows = the worst classes, columns = what they are predicted as (their top confusions,
    then "other"); cells = share (%) of the row's test images."""
    shares = np.asarray(shares, dtype=float)
    fig = _figure(max(6.0, 0.75 * len(col_names) + 3), max(3.5, 0.5 * len(row_names) + 2))
    ax = fig.subplots()
    im = ax.imshow(100.0 * shares, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for i in range(shares.shape[0]):
        for j in range(shares.shape[1]):
            v = 100.0 * shares[i, j]
            if v >= 0.5:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 55 else "black")
    ax.set_xticks(range(len(col_names)))
    ax.set_xticklabels(col_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_names)))
    ax.set_yticklabels([f"{n} ({_fmt_pct(a)})" for n, a in zip(row_names, row_acc)], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (its accuracy)")
    ax.set_title(f"Worst classes: where their test images go — round {round_idx}")
    fig.colorbar(im, ax=ax, label="share of the true class's test images (%)")
    return _save(fig, path)


def compare_bars(path, run_names: list[str], metrics: list[str], values: list[list], errors: list[list] | None = None,
                 ) -> Path:
    """Grouped bars: one group per metric, one bar per run (or setup, with `errors` as error bars); a missing value
    is marked "–" at the baseline."""
    fig = _figure(min(16.0, max(8.0, 0.3 * len(metrics) * max(1, len(run_names)) + 3)), 4.5)
    ax = fig.subplots()
    x = np.arange(len(metrics))
    width = 0.8 / max(len(run_names), 1)
    for i, (name, row) in enumerate(zip(run_names, values)):
        vals = _pct(row)
        pos = x - 0.4 + width * (i + 0.5)
        err = None if errors is None else np.nan_to_num(_pct(errors[i]))[~np.isnan(vals)]
        ax.bar(pos[~np.isnan(vals)], vals[~np.isnan(vals)], width=width, label=name, yerr=err, capsize=2)
        for p in pos[np.isnan(vals)]:
            ax.text(p, 1, "–", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Final-round comparison of runs (– = not available or empty group)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt_pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"
