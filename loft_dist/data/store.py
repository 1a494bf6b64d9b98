"""The sharded Parquet image store of DESIGN §3: atomic shard writing, dataset.json, Ray Data readers.

A dataset root is a local path or any URI pyarrow understands (`file://…`, `s3://…`, `gs://…`).
Shards are zstd Parquet files of about `target_mb` each (and at most `rows_per_shard` rows),
written one row group at a time, so neither writing nor reading ever holds a whole split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from loft_dist import storage
from loft_dist.errors import ConfigError, DataError, StorageError

SCHEMA_VERSION = 1
SPLITS = ("labeled", "unlabeled", "test", "ood_test")
IMAGE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("image", pa.binary()),
    ("label", pa.int32()),  # -1 = unlabeled
    ("true_label", pa.int32()),  # ground truth where known, -1 = OOD; evaluation only
    ("source", pa.string()),
])
ROW_GROUP_MB = 16  # bounds what a reader decompresses at once, whatever the shard size
_ROW_OVERHEAD = 64  # bytes per row besides the image (ids, labels, source string), for the size estimate


# ---------------------------------------------------------------------------------------
# Roots: local paths and filesystem URIs


def split_exists(root: str, split: str) -> bool:
    return storage.is_dir(storage.join(root, split))


# ---------------------------------------------------------------------------------------
# Writing


class _HashingSink:
    """File-like sink that digests what the Parquet writer writes, so checksums cost no second read."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.raw.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
            self.closed = True


class _ShardWriter:
    """Rows → part-NNNNN.parquet files in one directory, cut by size and row count."""

    def __init__(self, fs: pafs.FileSystem, directory: str, rows_per_shard: int, target_mb: Optional[float],
                 name_format: str = "part-{:05d}.parquet"):
        self.fs, self.dir, self.name_format = fs, directory, name_format
        self.max_rows = rows_per_shard
        self.max_bytes = int(target_mb * 2**20) if target_mb else None
        group_mb = min(ROW_GROUP_MB, target_mb) if target_mb else ROW_GROUP_MB
        self.group_bytes = int(group_mb * 2**20)
        self.shards: dict[str, str] = {}  # file name → sha256
        self.rows = 0
        self._writer = self._sink = None
        self._shard_rows = self._shard_bytes = 0
        self._group: list[dict] = []
        self._group_bytes = 0

    def add(self, row: dict) -> None:
        size = len(row["image"] or b"") + _ROW_OVERHEAD
        if self._shard_rows and (self._shard_rows >= self.max_rows
                                 or (self.max_bytes and self._shard_bytes + size > self.max_bytes)):
            self._close_shard()
        self._group.append(row)
        self._group_bytes += size
        self._shard_rows += 1
        self._shard_bytes += size
        self.rows += 1
        if self._group_bytes >= self.group_bytes:
            self._flush_group()

    def _open_shard(self) -> None:
        self._name = self.name_format.format(len(self.shards))
        self._sink = _HashingSink(self.fs.open_output_stream(f"{self.dir}/{self._name}"))
        self._writer = pq.ParquetWriter(pa.PythonFile(self._sink, mode="w"), IMAGE_SCHEMA, compression="zstd")

    def _flush_group(self) -> None:
        if not self._group:
            return
        if self._writer is None:
            self._open_shard()
        self._writer.write_table(pa.Table.from_pylist(self._group, schema=IMAGE_SCHEMA))
        self._group, self._group_bytes = [], 0

    def _close_shard(self) -> None:
        self._flush_group()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self.shards[self._name] = self._sink.sha256.hexdigest()
        self._writer = self._sink = None
        self._shard_rows = self._shard_bytes = 0

    def finish(self) -> None:
        if not self.rows:  # an empty split still gets one (empty) shard, so readers see its schema
            self._open_shard()
            self._writer.write_table(IMAGE_SCHEMA.empty_table())
        self._close_shard()

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()


def write_split(rows: Iterable[dict], root: str, split: str, rows_per_shard: int,
                target_mb: Optional[float] = None) -> dict:
    """Write rows as zstd Parquet shards under root/split, atomically, and return
    {"rows", "shards", "bytes", "sha256": {"split/part-NNNNN.parquet": digest}}.

    Shards close at `target_mb` MB of image bytes or `rows_per_shard` rows, whichever comes first.
    Shards go to a staging location first and into place by storage.commit (its _SUCCESS lists them); on an object
    store dataset.json, written last by `prepare`, is what makes the whole build count.
    """
    staged = storage.staging(storage.join(root, split))
    try:
        group = write_shard_group(rows, staged, None, rows_per_shard, target_mb)
    except BaseException:
        storage.remove(staged)
        raise
    return commit_split(staged, root, split, [group])


def write_shard_group(rows: Iterable[dict], staged: str, group: Optional[int], rows_per_shard: int,
                      target_mb: Optional[float] = None) -> dict:
    """One group of a split's rows as shards in its staging dir: part-NNNNN.parquet (group None: the whole split),
    or part-GGGGG-NN.parquet, so groups written by parallel tasks never share a name and a retried task rewrites
    its own files only. Returns {"rows", "sha256": {name: digest}}; an empty group writes one empty shard."""
    fs, tmp = storage.resolve(staged)
    fs.create_dir(tmp, recursive=True)
    writer = _ShardWriter(fs, tmp, rows_per_shard, target_mb,
                          "part-{:05d}.parquet" if group is None else f"part-{group:05d}-{{:02d}}.parquet")
    try:
        for row in rows:
            writer.add(row)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"rows": writer.rows, "sha256": writer.shards}


def commit_split(staged: str, root: str, split: str, groups: list[dict]) -> dict:
    """Commit a split's staged shard groups into root/split (storage.commit); what write_split returns."""
    rows = sum(g["rows"] for g in groups)
    shards = {name: digest for g in groups for name, digest in g["sha256"].items()}
    try:
        record = storage.commit(staged, storage.join(root, split), {"rows": rows})
    except BaseException:
        storage.remove(staged)
        raise
    fs, final = storage.resolve(storage.join(root, split))
    sizes = sum(fs.get_file_info(f"{final}/{name}").size for name in record["files"])
    return {"rows": rows, "shards": len(shards), "bytes": sizes,
            "sha256": {f"{split}/{name}": digest for name, digest in shards.items()}}


def remove_dataset_info(root: str) -> None:
    """Withdraw dataset.json before a rebuild, so an interrupted build is never taken for a complete one."""
    storage.remove(storage.join(root, "dataset.json"))


# ---------------------------------------------------------------------------------------
# Reading


def read_dataset_info(root: str) -> dict:
    p = storage.join(root, "dataset.json")
    if not storage.is_file(p):
        raise StorageError(f"{p} not found: {root} is not a prepared dataset; run `loft-dist prepare CONFIG` "
                                f"(or set data.root to a dataset dir holding dataset.json)")
    info = storage.read_json(p)
    if info.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{p} has schema_version {info.get('schema_version')}, this loft_dist reads {SCHEMA_VERSION}; "
                         f"re-run `loft-dist prepare`")
    return info


def load_run_config(run_dir: str | Path) -> dict:
    """config.yaml as a plain dict ({} when absent: a report still works from metrics alone)."""
    p = storage.RunLayout(str(run_dir)).config
    if not storage.is_file(p):
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(storage.read_text(p))) or {}


def find_dataset_root(run_dir: str | Path, cfg: dict) -> str | None:
    """The dataset of the run, where dataset.json is: data.root when set, else <run dir>/data (config's empty root
    means that); None when neither is there."""
    root = (cfg.get("data") or {}).get("root") or ""
    for d in ([root] if root else []) + [storage.RunLayout(str(run_dir)).data]:
        try:
            if storage.is_file(storage.join(d, "dataset.json")):
                return d
        except (StorageError, ConfigError):  # a root this machine cannot reach: the next place, or none
            continue
    return None


def find_dataset_info(run_dir: str | Path, cfg: dict) -> dict | None:
    """dataset.json of the run (find_dataset_root), or None."""
    root = find_dataset_root(run_dir, cfg)
    return storage.read_json(storage.join(root, "dataset.json")) if root is not None else None


def shard_paths(root: str, split: str) -> list[str]:
    """The split's shard files, sorted, spelt like the root (local paths, or URIs for a URI root)."""
    fs, base = storage.resolve(root)
    d = f"{base}/{split}"
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
    if not names:
        raise StorageError(f"no Parquet shards in {storage.join(root, split)}; re-run `loft-dist prepare` for this "
                                f"dataset")
    if storage.is_local(root):
        return [f"{d}/{n}" for n in names]
    return [storage.join(root, split, n) for n in names]


def open_parquet(path: str) -> pq.ParquetFile:
    fs, p = storage.resolve(path)
    return pq.ParquetFile(fs.open_input_file(p))


def count_rows(paths: list[str]) -> int:
    """Row count from Parquet footers only (no data read)."""
    return sum(open_parquet(p).metadata.num_rows for p in paths)


def read_split(root: str, split: str, columns: Optional[list[str]] = None):
    """A streaming ray.data.Dataset over one split's shards, one read task per shard."""
    import ray.data

    paths = shard_paths(root, split)
    fs, _ = storage.resolve(root)
    return ray.data.read_parquet([storage.resolve(p)[1] for p in paths], filesystem=fs, columns=columns,
                                 override_num_blocks=len(paths))


def iter_table_rows(paths: list[str], columns: list[str], batch_rows: int = 4096) -> Iterator[dict]:
    """Stream rows of a few columns from Parquet files without loading them whole."""
    for p in paths:
        for batch in open_parquet(p).iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()


def read_rows_by_id(paths: list[str], ids, columns: list[str]) -> pa.Table:
    """The rows of these shards whose id is in `ids`: each shard's id column is read, then only the row groups
    holding a wanted id, so a few rows of a pool of millions cost its ids and a few row groups, never its images.
    Shards are read in order until every id is found; an id found nowhere is simply absent from the result."""
    todo = np.unique(np.asarray(ids, np.int64))
    parts = []
    for p in paths:
        if not todo.size:
            break
        pf = open_parquet(p)
        shard_ids = pf.read(columns=["id"]).column("id").to_numpy()
        hit = np.flatnonzero(np.isin(shard_ids, todo))
        if not hit.size:
            continue
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = np.unique(np.searchsorted(starts, hit, side="right") - 1)
        t = pf.read_row_groups(groups.tolist(), columns=list(dict.fromkeys(["id", *columns])))
        parts.append(t.filter(pc.is_in(t.column("id"), value_set=pa.array(todo))).select(columns))
        todo = np.setdiff1d(todo, shard_ids[hit])
    return pa.concat_tables(parts) if parts else pa.table({c: pa.array([], IMAGE_SCHEMA.field(c).type)
                                                           for c in columns})
