"""The sharded Parquet image store of DESIGN §3: atomic shard writing, dataset.json, Ray Data readers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SPLITS = ("labeled", "unlabeled", "test", "ood_test")
IMAGE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("image", pa.binary()),
    ("label", pa.int32()),  # -1 = unlabeled
    ("true_label", pa.int32()),  # ground truth where known, -1 = OOD; evaluation only
    ("source", pa.string()),
])


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


def write_split(rows: Iterable[dict], root: str, split: str, rows_per_shard: int) -> dict:
    """Write rows as zstd Parquet shards under root/split, atomically (temp dir, then rename).

    Returns {"rows", "shards", "sha256": {file: digest}}. Only the current batch of rows is held in memory.
    """
    final = Path(root) / split
    tmp = Path(root) / f".{split}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    shards, total, buf = [], 0, []

    def flush() -> None:
        nonlocal buf
        name = f"part-{len(shards):05d}.parquet"
        pq.write_table(_rows_to_table(buf), tmp / name, compression="zstd")
        shards.append(name)
        buf = []

    for row in rows:
        buf.append(row)
        total += 1
        if len(buf) >= rows_per_shard:
            flush()
    if buf or not shards:
        flush()
    digests = {f"{split}/{n}": _sha256(tmp / n) for n in shards}
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"rows": total, "shards": len(shards), "sha256": digests}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False))
    os.replace(tmp, path)


def read_dataset_info(root: str) -> dict:
    p = Path(root) / "dataset.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {root} is not a prepared dataset; run `loft-dist prepare CONFIG` "
                                f"(or set data.root to a dataset dir holding dataset.json)")
    info = json.loads(p.read_text())
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{p} has schema_version {info.get('schema_version')}, this loft_dist reads {SCHEMA_VERSION}; "
                         f"re-run `loft-dist prepare`")
    return info


def shard_paths(root: str, split: str) -> list[str]:
    d = Path(root) / split
    files = sorted(str(p) for p in d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards in {d}; re-run `loft-dist prepare` for this dataset")
    return files


def count_rows(paths: list[str]) -> int:
    """Row count from Parquet footers only (no data read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def read_split(root: str, split: str, columns: Optional[list[str]] = None):
    """A streaming ray.data.Dataset over one split's shards, one block per shard."""
    import ray.data

    paths = shard_paths(root, split)
    return ray.data.read_parquet(paths, columns=columns, override_num_blocks=len(paths))


def iter_table_rows(paths: list[str], columns: list[str], batch_rows: int = 4096) -> Iterator[dict]:
    """Stream rows of a few columns from Parquet files without loading them whole."""
    for p in paths:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()
