"""`loft-dist report`: the run's rounds gathered into report/metrics.json and a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path

from loft_dist.data.quarantine import quarantined_counts
from loft_dist.data.store import write_json_atomic


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def load_rounds(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "rounds").glob("r*/metrics.json"), key=lambda p: int(p.parent.name[1:]))
    return [json.loads(p.read_text()) for p in files]


def write_report(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    if not rounds:
        raise FileNotFoundError(f"{run_dir} has no rounds/r*/metrics.json; is it a loft_dist run dir?")
    quarantined = quarantined_counts(run_dir)
    summary = {"run_dir": str(run_dir), "rounds": rounds, "final": rounds[-1], "quarantined": quarantined}
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "metrics.json", summary)

    lines = [f"# loft_dist report — {run_dir.name}", "",
             "Accuracy in % on the test split; groups by labeled count (many / medium / few) and by frequency "
             "tertiles (head / mid / tail). Round 0 is zero-shot CLIP.", "",
             "| round | model | acc | balanced | macro-F1 | many | medium | few | head | mid | tail | ECE | AUROC (MSP) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in rounds:
        t, g, tt = m["test"], m["test"]["groups"], m["test"]["tertiles"]
        auroc = m.get("ood_test", {}).get("auroc")
        lines.append(f"| {m['round']} | {m['model']} | {_pct(t['accuracy'])} | {_pct(t['balanced_accuracy'])} | "
                     f"{_pct(t['macro_f1'])} | " + " | ".join(_pct(g[k]['accuracy']) for k in ("many", "medium", "few"))
                     + " | " + " | ".join(_pct(tt[k]['accuracy']) for k in ("head", "mid", "tail"))
                     + f" | {_pct(t['ece'])} | {_pct(auroc)} |")
    empty = [k for k in ("many", "medium", "few") if rounds[-1]["test"]["groups"][k]["empty"]]
    if empty:
        lines += ["", f"Empty groups (no class has that many labels): {', '.join(empty)} — shown as –."]
    lines += ["", "## Pseudo-labels of the pool, per round", "",
              "| round | hard | soft | rejected (MSP ≤ c_ood) | OOD (zero-shot filter) | coverage | precision | OOD admitted |",
              "|---|---|---|---|---|---|---|---|"]
    for m in rounds:
        p = m.get("pseudo_labels")
        if p:
            c = p["counts"]
            lines.append(f"| {m['round']} | {c['hard']} | {c['soft']} | {c['rejected']} | {c['ood']} | "
                         f"{_pct(p.get('coverage'))} | {_pct(p.get('precision'))} | "
                         f"{p.get('ood_admitted', '–')} / {p.get('ood_total', '–')} |")
    lines += ["", "## Quarantine", "",
              ("No undecodable images." if not quarantined else
               ", ".join(f"{split}: {n} images (list in quarantine/{split}.jsonl)" for split, n in quarantined.items()))]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
