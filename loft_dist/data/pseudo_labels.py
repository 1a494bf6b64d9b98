"""Pseudo-label tables (DESIGN §3) and the datasets a round trains on: labeled rows, and the pool rows with their
pseudo-labels (offline: the round's table, joined shard by shard; online: decided at every step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from loft_dist.data.decisions import DECISIONS, HARD, IGNORED, LABELED, REJECTED, SOFT
from loft_dist.data.store import read_split, shard_paths
from loft_dist.errors import DataError
from loft_dist.data.transforms import build_view, decode_all, decode_batch
from loft_dist import storage

def is_complete(table_dir: str | Path) -> bool:
    return storage.is_committed(str(table_dir))


def table_files(table_dir: str | Path) -> list[str]:
    """The Parquet files of a complete table, as its _SUCCESS names them (a StorageError without one)."""
    return storage.committed_files(str(table_dir))


def table_rows(table_dir: str | Path) -> int:
    return storage.committed(str(table_dir))["rows"]


def commit_table(staged: str | Path, final_dir: str | Path, expected_rows: int | None = None,
                 shards: dict[str, str] | None = None) -> int:
    """storage.commit of a fully written table, its _SUCCESS carrying the row count (from the Parquet footers) and,
    for a scored table, `shards`: the input shard (file name) whose rows each of its files holds."""
    staged = str(staged)
    files = [storage.join(staged, n) for n in storage.listdir(staged) if n.endswith(".parquet")]
    rows = sum(pq.ParquetFile(storage.open_input(f)).metadata.num_rows for f in files)
    if expected_rows is not None and rows != expected_rows:
        raise RuntimeError(f"{staged} holds {rows} rows, expected exactly {expected_rows} (one per input image); "
                           f"not committing it")
    storage.commit(staged, str(final_dir), {"rows": rows, **({"shards": shards} if shards is not None else {})})
    return rows


def read_columns(table_dir: str | Path, columns: list[str]) -> dict[str, np.ndarray]:
    """A few columns of a complete table as numpy arrays (ids, decisions, … — never images)."""
    parts = [pq.read_table(storage.open_input(f), columns=columns) for f in table_files(table_dir)]
    return {c: np.concatenate([p.column(c).to_numpy(zero_copy_only=False) for p in parts]) if parts else np.zeros(0)
            for c in columns}


def _labeled_rows(batch: dict, num_classes: int) -> dict:
    n = len(batch["id"])
    batch["code"] = np.full(n, LABELED, np.int8)
    batch["target"] = batch["label"].astype(np.int64)
    batch["weight"] = np.ones(n, np.float32)
    batch["soft"] = np.zeros((n, num_classes), np.float32)
    return batch


POOL_DECISIONS = ("hard", "soft", "rejected")  # an offline round's pool rows; stage-1 `ood` rows never enter it (A.3)
_CODE = {"hard": HARD, "soft": SOFT, "rejected": REJECTED}


def _shard_parts(pl_table: str, data_root: str) -> list[dict]:
    """[{shard, parts}]: each pool shard with the table files holding its rows (the table's _SUCCESS names them)."""
    record = storage.committed(pl_table)
    of = record.get("shards", {})
    files = [f for f in record["files"] if f.endswith(".parquet")]
    missing = [f for f in files if f not in of]
    if missing:
        raise DataError(f"{pl_table}: its _SUCCESS does not name the pool shard of {missing[0]} (a table scored before "
                        f"tables recorded their shards); delete the table to score it again")
    by_shard: dict[str, list[str]] = {}
    for f in files:
        by_shard.setdefault(of[f], []).append(storage.join(pl_table, f))
    shards = {storage.name(p): p for p in shard_paths(data_root, "unlabeled")}
    unknown = sorted(set(by_shard) - set(shards))
    if unknown:
        raise DataError(f"{pl_table} holds rows of pool shard {unknown[0]}, which {data_root}/unlabeled does not have: "
                        f"the table was scored from another dataset; score it again from this one")
    return [{"shard": shards[n], "parts": parts} for n, parts in sorted(by_shard.items())]


def _pool_shard_rows(item: dict) -> dict:
    """One pool shard's rows with their round's pseudo-label columns: the shard's images joined on id with the table
    files that hold its rows, in this task. Top-k probabilities stay top-k (`soft` + `soft_idx`)."""
    import pyarrow as pa

    shard, parts = str(item["shard"][0]), [str(p) for p in item["parts"][0]]
    first = pq.ParquetFile(storage.open_input(parts[0]))
    cols = ["id", "decision", "pred", "weight", "error", "probs"] + \
        (["probs_idx"] if "probs_idx" in first.schema_arrow.names else [])
    table = pa.concat_tables([pq.read_table(storage.open_input(f), columns=cols) for f in parts])
    dec = table.column("decision").to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(np.isin(dec, POOL_DECISIONS))
    ids = table.column("id").to_numpy()[rows]
    images = pq.read_table(storage.open_input(shard), columns=["id", "image"])
    image_ids = images.column("id").to_numpy()
    order = np.argsort(image_ids)
    at = order[np.clip(np.searchsorted(image_ids[order], ids), 0, max(len(order) - 1, 0))]
    if len(ids) and (not len(order) or (image_ids[at] != ids).any()):
        raise DataError(f"{parts[0]}: pool ids of the pseudo-label table are not in {shard}; the pool changed since "
                        f"it was scored — start a new run")
    code = np.asarray([_CODE[d] for d in dec[rows]], np.int8)
    code[table.column("error").to_numpy(zero_copy_only=False)[rows] != ""] = IGNORED
    out = {"id": ids, "image": images.column("image").take(pa.array(at)).to_numpy(zero_copy_only=False),
           "code": code, "target": table.column("pred").to_numpy()[rows].astype(np.int64),
           "weight": table.column("weight").to_numpy()[rows].astype(np.float32),
           "soft": _matrix(table.column("probs"), np.float32)[rows]}
    if "probs_idx" in cols:
        out["soft_idx"] = _matrix(table.column("probs_idx"), np.int64)[rows]
    return out


def _matrix(column, dtype) -> np.ndarray:
    """A list<…> column of equal-length lists as a (rows, k) array, without a Python loop over rows."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column  # a table's or a batch's
    flat = column.flatten().to_numpy().astype(dtype)
    return flat.reshape(len(column), -1)


def pool_dataset(data_root: str, cfg, pl_table: str) -> tuple[object, dict[str, int]]:
    """An offline round's pool stream: every pool row the round's table decided hard, soft or rejected, with its
    pseudo-label columns, in the strong (student) view; and the count of each decision.

    Built shard by shard in Ray Data tasks, so the driver never holds the table (N x C probabilities), only the
    shard → table files map of its _SUCCESS. Rejected rows are in it at weight 0: the step's loss is divided by
    its mu x B pool rows, whatever they are (SPEC A.0.2)."""
    import ray

    items = _shard_parts(pl_table, data_root)
    counts = pool_decisions(pl_table)
    t = cfg.train
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
        _pool_shard_rows, batch_size=1, batch_format="numpy", num_cpus=t.cpus_per_data_task)
    ds = ds.randomize_block_order(seed=cfg.run.seed).map_batches(
        decode_batch, fn_kwargs={"view": t.unlabeled_view, "image_size": cfg.data.image_size, "hflip": cfg.data.hflip,
                                 "strong_aug": cfg.data.strong_aug},
        batch_format="numpy", num_cpus=t.cpus_per_data_task,
    ).map_batches(_to_train_columns, batch_format="numpy", num_cpus=t.cpus_per_data_task)
    return ds, {d: counts[d] for d in POOL_DECISIONS}


def _to_train_columns(batch: dict) -> dict:
    """Numeric columns only (iter_torch_batches converts every column); undecodable rows are IGNORED, not dropped."""
    code = batch["code"].astype(np.int8)
    code[np.asarray(batch["error"]) != ""] = IGNORED
    return {"image": batch["image"], "code": code, "target": batch["target"], "weight": batch["weight"],
            "soft": batch["soft"], "id": batch["id"], **({"soft_idx": batch["soft_idx"]} if "soft_idx" in batch else {})}


def training_dataset(data_root: str, cfg, num_classes: int):
    """Ray Dataset of the labeled rows, decoded into `train.labeled_view` in Ray Data tasks."""
    ds = read_split(data_root, "labeled", columns=["id", "image", "label"]).map_batches(
        _labeled_rows, fn_kwargs={"num_classes": num_classes}, batch_format="numpy")
    t = cfg.train
    views = {"view": t.unlabeled_view, "image_size": cfg.data.image_size, "hflip": cfg.data.hflip,
             "labeled_view": t.labeled_view, "strong_aug": cfg.data.strong_aug}
    # Same num_cpus on both maps: Ray Data fuses them into one task per block (with the default 1 CPU on the
    # second it ran as a task of its own, one more process hop per block feeding the workers).
    return ds.randomize_block_order(seed=cfg.run.seed).map_batches(
        decode_batch, fn_kwargs=views, batch_format="numpy", num_cpus=t.cpus_per_data_task,
    ).map_batches(_to_train_columns, batch_format="numpy", num_cpus=t.cpus_per_data_task)


def _only_ids(batch: dict, ids_ref) -> dict:
    """Keep the rows whose id is in a sorted id array (shared via the object store)."""
    import ray

    ids = ray.get(ids_ref) if isinstance(ids_ref, ray.ObjectRef) else ids_ref
    pos = np.clip(np.searchsorted(ids, batch["id"]), 0, max(len(ids) - 1, 0))
    hit = (ids[pos] == batch["id"]) if len(ids) else np.zeros(len(batch["id"]), bool)
    return {k: v[hit] for k, v in batch.items()}


def _weak_and_strong(batch: dict, student_view: str, image_size: int, hflip: bool,
                     strong_aug: str = "randaugment_mc") -> dict:
    """Online pool rows: `image_weak` (the teacher's view) and `image` (the student's, strong by default).

    Each image is decoded once for both views; `ok` is 0 for a row that did not decode (its loss is ignored).
    """
    weak, strong = build_view("weak", image_size, hflip), build_view(student_view, image_size, hflip, strong_aug)
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

    labeled = training_dataset(data_root, cfg, num_classes)
    pool = read_split(data_root, "unlabeled", columns=["id", "image"])
    t = cfg.train
    if kept_ids is not None:
        pool = pool.map_batches(_only_ids, fn_kwargs={"ids_ref": ray.put(np.sort(kept_ids))}, batch_format="numpy")
        n_pool = len(kept_ids)
    else:
        n_pool = len(read_columns(zs_table, ["id"])["id"])
    pool = pool.randomize_block_order(seed=cfg.run.seed).map_batches(
        _weak_and_strong, fn_kwargs={"student_view": t.unlabeled_view, "image_size": cfg.data.image_size,
                                     "hflip": cfg.data.hflip, "strong_aug": cfg.data.strong_aug},
        batch_format="numpy", num_cpus=t.cpus_per_data_task)
    return {"train": labeled, "pool": pool}, n_pool


def round_datasets(data_root: str, cfg, num_classes: int, pl_table: str | None, zs_table: str,
                   kept_ids: np.ndarray | None = None) -> tuple[dict, str]:
    """The Ray datasets one round trains on, {"train": labeled rows[, "pool": pool rows]}, and a line saying what
    they hold. Each step takes B labeled rows and mu x B pool rows, in both modes.

    pl_table None: the method trains on labeled rows only. Online mode (algorithm.mode) reads the pool itself and
    pseudo-labels it at every step, less the rows outside kept_ids; offline mode streams the round's table."""
    mu_b = f"{cfg.algorithm.mu} x {cfg.train.batch_plan()[0]} pool rows per step"
    if cfg.algorithm.mode == "online":
        ds, n_pool = online_datasets(data_root, cfg, num_classes, zs_table, kept_ids)
        return ds, (f"labeled rows + {n_pool} pool rows pseudo-labeled at every step (online, {mu_b})" if n_pool else
                    "labeled rows only: the stage-1 zero-shot filter rejected every pool row (online)")
    labeled = training_dataset(data_root, cfg, num_classes)
    if pl_table is None:
        return {"train": labeled}, f"labeled rows only ({cfg.algorithm.name} trains on no pseudo-labels)"
    pool, n = pool_dataset(data_root, cfg, pl_table)
    if not sum(n.values()):
        return {"train": labeled}, "labeled rows only: the stage-1 zero-shot filter rejected every pool row"
    return {"train": labeled, "pool": pool}, (f"labeled rows + {sum(n.values())} pool rows of the round's table: hard "
                                              f"{n['hard']}, soft {n['soft']}, rejected {n['rejected']} (weight 0), "
                                              f"{mu_b}")


def class_statistics(table_dir: str | Path, num_classes: int) -> dict[str, list[float]]:
    """Per class, over a complete table's pool rows (hard, soft, rejected; never stage-1 `ood`): `pl_count`, its hard
    pseudo-labels, and `mean_conf`, the teacher's probability mass. Streamed by batches: O(C) memory whatever N."""
    count, mass = np.zeros(num_classes), np.zeros(num_classes)
    for f in table_files(table_dir):
        pf = pq.ParquetFile(storage.open_input(f))
        cols = ["decision", "pred", "probs"] + (["probs_idx"] if "probs_idx" in pf.schema_arrow.names else [])
        for batch in pf.iter_batches(columns=cols):
            dec = batch.column("decision").to_numpy(zero_copy_only=False)
            rows = np.isin(dec, POOL_DECISIONS)
            count += np.bincount(batch.column("pred").to_numpy()[dec == "hard"], minlength=num_classes)
            probs = _matrix(batch.column("probs"), np.float64)[rows]
            if "probs_idx" in cols:
                np.add.at(mass, _matrix(batch.column("probs_idx"), np.int64)[rows], probs)
            else:
                mass += probs.sum(axis=0)
    return {"pl_count": count.tolist(), "mean_conf": mass.tolist()}


def pool_decisions(table_dir: str | Path) -> dict[str, int]:
    """How many rows of a complete table got each decision, counted file by file in Arrow: the driver never holds
    the column (a million Python strings were ~70 MB of its memory)."""
    import pyarrow.compute as pc

    counts = dict.fromkeys(DECISIONS, 0)
    for f in table_files(table_dir):
        column = pq.read_table(storage.open_input(f), columns=["decision"]).column("decision")
        for row in pc.value_counts(column).to_pylist():
            counts[row["values"]] = counts.get(row["values"], 0) + int(row["counts"])
    return counts
