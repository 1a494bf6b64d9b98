"""Bad records found while streaming a split: written with id and reason to <run>/quarantine/, counted, never dropped silently."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def quarantine(table_dir: str | Path, run_dir: str | Path, split: str) -> int:
    """Collect the rows of a scored table whose image failed to decode into quarantine/<split>.jsonl."""
    from loft_dist.data.pseudo_labels import read_columns

    cols = read_columns(table_dir, ["id", "error"])
    bad = np.flatnonzero(cols["error"] != "")
    path = Path(run_dir) / "quarantine" / f"{split}.jsonl"
    if len(bad):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for i in bad:
                f.write(json.dumps({"id": int(cols["id"][i]), "split": split, "reason": str(cols["error"][i])}) + "\n")
        log.warning("%d undecodable images in %s quarantined to %s (they are scored as rejected, never trained on)",
                    len(bad), split, path)
    elif path.exists():
        path.unlink()
    return int(len(bad))


def quarantined_counts(run_dir: str | Path) -> dict[str, int]:
    d = Path(run_dir) / "quarantine"
    return {p.stem: sum(1 for _ in open(p)) for p in sorted(d.glob("*.jsonl"))} if d.is_dir() else {}
