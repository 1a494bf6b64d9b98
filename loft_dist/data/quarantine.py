"""Bad records: undecodable images found while streaming a split are written with id and reason to <run>/quarantine/,
counted, never dropped silently; records that break the dataset's contract (a repeated id) stop the run."""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import numpy as np

from loft_dist import storage
from loft_dist.errors import DataError

log = logging.getLogger(__name__)


class DuplicateIdError(DataError):
    """Two records of one split share an id: every table keyed by id (pseudo-labels, predictions) would be wrong."""


def check_unique_ids(paths: list[str], what: str = "") -> int:
    """Raise DuplicateIdError (naming the files and records) if an id repeats across these Parquet shards; else the
    row count. Reads only the id column (8 bytes a row)."""
    import pyarrow.parquet as pq

    ids, file_of, row_of = [], [], []
    for k, path in enumerate(paths):
        with storage.open_input(path) as f:
            col = pq.read_table(f, columns=["id"]).column("id").to_numpy()
        ids.append(col)
        file_of.append(np.full(len(col), k, np.int32))
        row_of.append(np.arange(len(col), dtype=np.int64))
    if not ids:
        return 0
    ids, file_of, row_of = np.concatenate(ids), np.concatenate(file_of), np.concatenate(row_of)
    order = np.argsort(ids, kind="stable")
    repeat = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeat):
        a, b = order[repeat[0]], order[repeat[0] + 1]
        n = len(np.unique(ids[order][repeat + 1]))
        raise DuplicateIdError(
            f"{what + ': ' if what else ''}id {int(ids[a])} appears twice: {paths[file_of[a]]} record {int(row_of[a])} "
            f"and {paths[file_of[b]]} record {int(row_of[b])} ({n} ids repeated in all); ids must be unique within a "
            f"split — rebuild it with `loft-dist prepare`, or fix the tool that wrote these shards")
    return int(len(ids))


def quarantine(table_dir: str | Path, run_dir: str | Path, split: str) -> int:
    """Collect the rows of a scored table whose image failed to decode into quarantine/<split>.jsonl."""
    from loft_dist.data.pseudo_labels import read_columns

    cols = read_columns(table_dir, ["id", "error"])
    bad = np.flatnonzero(cols["error"] != "")
    path = storage.join(storage.RunLayout(str(run_dir)).quarantine, f"{split}.jsonl")
    if len(bad):
        storage.write_text(path, "".join(json.dumps({"id": int(cols["id"][i]), "split": split,
                                                     "reason": str(cols["error"][i])}) + "\n" for i in bad))
        log.warning("%d undecodable images in %s quarantined to %s (they are scored as rejected, never trained on)",
                    len(bad), split, path)
    else:
        storage.remove(path)
    return int(len(bad))


def error_kinds(errors) -> dict[str, int]:
    """Rows that could not be read, by error kind (the exception type that the reason starts with), most first."""
    kinds = collections.Counter(str(e).split(":", 1)[0] for e in errors if e)
    return dict(kinds.most_common())


def quarantined_counts(run_dir: str | Path) -> dict[str, int]:
    """Quarantined rows of a run, by split."""
    return {name[:-len(".jsonl")]: len(lines) for name, lines in _quarantine_files(run_dir).items()}


def quarantined_kinds(run_dir: str | Path) -> dict[str, int]:
    """Quarantined rows of a run, by error kind (over every split), most first."""
    return error_kinds([json.loads(line)["reason"] for lines in _quarantine_files(run_dir).values() for line in lines])


def _quarantine_files(run_dir: str | Path) -> dict[str, list[str]]:
    d = storage.RunLayout(str(run_dir)).quarantine
    return {n: storage.read_text(storage.join(d, n)).splitlines() for n in storage.listdir(d) if n.endswith(".jsonl")}
