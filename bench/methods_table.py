"""The "Methods on the embedded data" table of BENCHMARKS.md, from the final round of each method's run dir.

    python bench/methods_table.py runs/methods_*        # prints the Markdown table

Each run dir is one `loft-dist run configs/tiny.yaml algorithm.name=<method> [algorithm.mode=online] ...`; the
method and mode come from its config.yaml. Rows keep METHODS' order, offline beside online for the same method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from loft_dist.algorithms import METHODS

ORDER = ["zero_shot", "lp", "lft", "fft", "fixmatch", "loft", "loft_ow", "ulfine"]
COLUMNS = [("overall", ("test", "accuracy")), ("many", ("test", "groups", "many", "accuracy")),
           ("medium", ("test", "groups", "medium", "accuracy")), ("few", ("test", "groups", "few", "accuracy")),
           ("head", ("test", "tertiles", "head", "accuracy")), ("mid", ("test", "tertiles", "mid", "accuracy")),
           ("tail", ("test", "tertiles", "tail", "accuracy")), ("PL precision", ("pseudo_labels", "precision")),
           ("PL coverage", ("pseudo_labels", "coverage"))]


def _get(d, path):
    for k in path:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def row(run_dir: Path) -> tuple[tuple, str]:
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    a = cfg["algorithm"]
    rounds = sorted((run_dir / "rounds").glob("r*/metrics.json"), key=lambda p: int(p.parent.name[1:]))
    final = json.loads(rounds[-1].read_text())  # a run still in progress shows its last evaluated round
    peft = "–" if a["name"] == "zero_shot" else cfg["peft"]["method"]
    cells = [f"`{run_dir.name}`", a["name"], a["mode"], peft, str(final["round"]), *(_pct(_get(final, p)) for _, p in COLUMNS)]
    key = (ORDER.index(a["name"]) if a["name"] in ORDER else len(ORDER), a["mode"] != "offline")
    return key, "| " + " | ".join(cells) + " |"


def main(dirs: list[str]) -> None:
    rows = sorted(row(Path(d)) for d in dirs if list(Path(d).glob("rounds/r*/metrics.json")))
    print("| run | method | mode | peft | round | " + " | ".join(h for h, _ in COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---:|" * len(COLUMNS))
    for _, line in rows:
        print(line)
    print()
    for name in ORDER:
        print(f"- `{name}`: {METHODS[name].summary}")


if __name__ == "__main__":
    main(sys.argv[1:])
