"""Pseudo-label tables (DESIGN §3) and the training set built from labeled rows ∪ accepted pseudo-labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from loft_dist.data.decisions import DECISIONS, HARD, IGNORED, LABELED, SOFT
from loft_dist.data.store import read_split
from loft_dist.data.transforms import build_view, decode_all, decode_batch
from loft_dist import storage

def is_complete(table_dir: str | Path) -> bool:
    return storage.is_committed(str(table_dir))


def table_files(table_dir: str | Path) -> list[str]:
    """The Parquet files of a complete table, as its _SUCCESS names them (a StorageError without one)."""
    return storage.committed_files(str(table_dir))


def table_rows(table_dir: str | Path) -> int:
    return storage.committed(str(table_dir))["rows"]


def commit_table(staged: str | Path, final_dir: str | Path, expected_rows: int | None = None) -> int:
    """storage.commit of a fully written table, its _SUCCESS carrying the row count (from the Parquet footers)."""
    staged = str(staged)
    files = [storage.join(staged, n) for n in storage.listdir(staged) if n.endswith(".parquet")]
    rows = sum(pq.ParquetFile(storage.open_input(f)).metadata.num_rows for f in files)
    if expected_rows is not None and rows != expected_rows:
        raise RuntimeError(f"{staged} holds {rows} rows, expected exactly {expected_rows} (one per input image); "
                           f"not committing it")
    storage.commit(staged, str(final_dir), {"rows": rows})
    return rows


def read_columns(table_dir: str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """A few columns of a complete table as numpy arrays (ids, decisions, … — never images)."""
    parts = [pq.read_table(storage.open_input(f), columns=columns) for f in table_files(table_dir)]
    return {c: np.concatenate([p.column(c).to_numpy(zero_copy_only=False) for p in parts]) if parts else np.zeros(0)
            for c in columns}


def accepted_lookup(table_dir: str | Path, num_classes: int) -> dict[str, np.ndarray]:
    """Sorted arrays of the accepted (hard / soft) rows: id, code, target, weight and the soft target p."""
    ids, codes, preds, weights, probs = [], [], [], [], []
    for f in table_files(table_dir):
        pf = pq.ParquetFile(storage.open_input(f))
        cols = ["id", "decision", "pred", "weight", "probs"] + (["probs_idx"] if "probs_idx" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(columns=cols):
            dec = batch.column("decision").to_numpy(zero_copy_only=False)
            keep = (dec == "hard") | (dec == "soft")
            if not keep.any():
                continue
            idx = np.flatnonzero(keep)
            ids.append(batch.column("id").to_numpy()[idx])
            codes.append(np.where(dec[idx] == "hard", HARD, SOFT).astype(np.int8))
            preds.append(batch.column("pred").to_numpy()[idx].astype(np.int64))
            weights.append(batch.column("weight").to_numpy()[idx].astype(np.float32))
            p = np.stack(batch.column("probs").to_numpy(zero_copy_only=False)[idx]).astype(np.float32)
            if "probs_idx" in cols:  # top-k rows: scatter back into a full distribution
                full = np.zeros((len(idx), num_classes), np.float32)
                np.put_along_axis(full, np.stack(batch.column("probs_idx").to_numpy(zero_copy_only=False)[idx]), p, 1)
                p = full
            probs.append(p)
    if not ids:
        return {"id": np.zeros(0, np.int64), "code": np.zeros(0, np.int8), "target": np.zeros(0, np.int64),
                "weight": np.zeros(0, np.float32), "soft": np.zeros((0, num_classes), np.float32)}
    out = {"id": np.concatenate(ids), "code": np.concatenate(codes), "target": np.concatenate(preds),
           "weight": np.concatenate(weights), "soft": np.concatenate(probs)}
    order = np.argsort(out["id"])
    return {k: v[order] for k, v in out.items()}


def _labeled_rows(batch: dict, num_classes: int) -> dict:
    n = len(batch["id"])
    batch["code"] = np.full(n, LABELED, np.int8)
    batch["target"] = batch["label"].astype(np.int64)
    batch["weight"] = np.ones(n, np.float32)
    batch["soft"] = np.zeros((n, num_classes), np.float32)
    return batch


def _attach_pseudo_labels(batch: dict, lookup_ref) -> dict:
    """Keep the pool rows the decision admits, with their pseudo-label columns (lookup shared via the object store)."""
    import ray

    lookup = ray.get(lookup_ref) if isinstance(lookup_ref, ray.ObjectRef) else lookup_ref
    ids = batch["id"]
    pos = np.clip(np.searchsorted(lookup["id"], ids), 0, max(len(lookup["id"]) - 1, 0))
    hit = (lookup["id"][pos] == ids) if len(lookup["id"]) else np.zeros(len(ids), bool)
    rows = np.flatnonzero(hit)
    out = {k: v[rows] for k, v in batch.items()}
    p = pos[rows]
    out["code"] = lookup["code"][p]
    out["target"] = lookup["target"][p]
    out["weight"] = lookup["weight"][p]
    out["soft"] = lookup["soft"][p]
    return out


def _to_train_columns(batch: dict) -> dict:
    """Numeric columns only (iter_torch_batches converts every column); undecodable rows are IGNORED, not dropped."""
    code = batch["code"].astype(np.int8)
    code[np.asarray(batch["error"]) != ""] = IGNORED
    return {"image": batch["image"], "code": code, "target": batch["target"], "weight": batch["weight"],
            "soft": batch["soft"], "id": batch["id"]}


def training_dataset(data_root: str, cfg, num_classes: int, pl_table: str | None):
    """Ray Dataset of labeled rows ∪ accepted pseudo-labeled pool rows, decoded into training views.

    Labeled rows get `train.labeled_view`, pool rows `train.unlabeled_view` (strong), in Ray Data tasks.
    """
    import ray

    cols = ["id", "image", "label"]
    ds = read_split(data_root, "labeled", columns=cols).map_batches(_labeled_rows, fn_kwargs={"num_classes": num_classes},
                                                                    batch_format="numpy")
    n_accepted = 0
    if pl_table is not None:
        lookup = accepted_lookup(pl_table, num_classes)
        n_accepted = len(lookup["id"])
        if n_accepted:
            ref = ray.put(lookup)
            pool = read_split(data_root, "unlabeled", columns=cols).map_batches(
                _attach_pseudo_labels, fn_kwargs={"lookup_ref": ref}, batch_format="numpy")
            ds = ds.union(pool)
    t = cfg.train
    views = {"view": t.unlabeled_view, "image_size": cfg.data.image_size, "hflip": cfg.data.hflip,
             "labeled_view": t.labeled_view}
    # Same num_cpus on both maps: Ray Data fuses them into one task per block (with the default 1 CPU on the
    # second it ran as a task of its own, one more process hop per block feeding the workers).
    ds = ds.randomize_block_order(seed=cfg.run.seed).map_batches(
        decode_batch, fn_kwargs=views, batch_format="numpy", num_cpus=t.cpus_per_data_task,
    ).map_batches(_to_train_columns, batch_format="numpy", num_cpus=t.cpus_per_data_task)
    return ds, n_accepted


def _only_ids(batch: dict, ids_ref) -> dict:
    """Keep the rows whose id is in a sorted id array (shared via the object store)."""
    import ray

    ids = ray.get(ids_ref) if isinstance(ids_ref, ray.ObjectRef) else ids_ref
    pos = np.clip(np.searchsorted(ids, batch["id"]), 0, max(len(ids) - 1, 0))
    hit = (ids[pos] == batch["id"]) if len(ids) else np.zeros(len(batch["id"]), bool)
    return {k: v[hit] for k, v in batch.items()}


def _weak_and_strong(batch: dict, student_view: str, image_size: int, hflip: bool) -> dict:
    """Online pool rows: `image_weak` (the teacher's view) and `image` (the student's, strong by default).

    Each image is decoded once for both views; `ok` is 0 for a row that did not decode (its loss is ignored).
    """
    weak, strong = build_view("weak", image_size, hflip), build_view(student_view, image_size, hflip)
    images = batch.pop("image")
    out = {v: np.zeros((len(images), 3, image_size, image_size), np.float32) for v in ("image_weak", "image")}
    ok = np.zeros(len(images), np.int8)
    decoded, _ = decode_all(images)  # a bad record's loss is ignored; the scorer's tables quarantine it by reason
    rows = sorted(decoded)
    if rows:
        imgs = [decoded[i] for i in rows]
        out["image_weak"][rows], out["image"][rows] = weak.batch(imgs), strong.batch(imgs)
        ok[rows] = 1
    return {"id": batch["id"], **out, "ok": ok}


def online_datasets(data_root: str, cfg, num_classes: int, zs_table: str, kept_ids: np.ndarray | None):
    """Online mode: {"train": labeled rows, "pool": unlabeled rows with weak + strong views}, and the pool size.

    kept_ids (LoFT-OW's stage-1 filter, decided by the algorithm): only these pool rows enter the pool, as the
    released code never puts the rejected ones in its unlabeled set; None keeps every row of the zero-shot table.
    """
    import ray

    labeled, _ = training_dataset(data_root, cfg, num_classes, None)
    pool = read_split(data_root, "unlabeled", columns=["id", "image"])
    t = cfg.train
    if kept_ids is not None:
        pool = pool.map_batches(_only_ids, fn_kwargs={"ids_ref": ray.put(np.sort(kept_ids))}, batch_format="numpy")
        n_pool = len(kept_ids)
    else:
        n_pool = len(read_columns(zs_table, ["id"])["id"])
    pool = pool.randomize_block_order(seed=cfg.run.seed).map_batches(
        _weak_and_strong, fn_kwargs={"student_view": t.unlabeled_view, "image_size": cfg.data.image_size,
                                     "hflip": cfg.data.hflip},
        batch_format="numpy", num_cpus=t.cpus_per_data_task)
    return {"train": labeled, "pool": pool}, n_pool


def round_datasets(data_root: str, cfg, num_classes: int, pl_table: str | None, zs_table: str,
                   kept_ids: np.ndarray | None = None) -> tuple[dict, str]:
    """The Ray datasets one round trains on, and a line saying what they hold.

    pl_table None: the method trains on labeled rows only. Online mode (algorithm.mode) reads the pool itself,
    less the rows outside kept_ids."""
    if cfg.algorithm.mode == "online":
        ds, n_pool = online_datasets(data_root, cfg, num_classes, zs_table, kept_ids)
        return ds, (f"labeled rows + {n_pool} pool rows pseudo-labeled at every step (online)" if n_pool else
                    "labeled rows only: the stage-1 zero-shot filter rejected every pool row (online)")
    table = pl_table
    ds, n_accepted = training_dataset(data_root, cfg, num_classes, table)
    return {"train": ds}, (f"labeled rows + {n_accepted} accepted pseudo-labeled rows" if table else
                           f"labeled rows only ({cfg.algorithm.name} trains on no pseudo-labels)")


def pool_decisions(table_dir: str | Path) -> dict[str, int]:
    dec = read_columns(table_dir, ["decision"])["decision"]
    return {d: int((dec == d).sum()) for d in DECISIONS}
