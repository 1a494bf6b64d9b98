"""A small pool for the gallery tests: Parquet image shards (prepared like a dataset's unlabeled split) and a
committed pseudo-label table over them, with columns as the scorer writes them (no Ray, no model)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from loft_dist.data.decisions import DECISIONS
from loft_dist.data.store import write_split
from loft_dist.storage import SUCCESS

C_HARD, C_OOD = 0.625, 0.25  # exact in float32, so |msp - c| ties are the same in numpy and in the tests' Python


def png(rgb, size: int = 24, noise: bool = False, seed: int = 0) -> bytes:
    """A PNG of one colour with a darker square (what a thumbnail of a real image has: shape, not one flat
    colour), or incompressible noise: the largest thumbnail PNG there is."""
    if noise:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.empty((size, size, 3), np.uint8)
        pixels[:] = rgb
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] //= 3
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_images(root, ids, *, size: int = 24, noise: bool = False, bad: tuple = (), rows_per_shard: int = 64,
                 dataset_json: dict | None = None) -> None:
    """root/unlabeled/part-*.parquet holding one image per id (bytes b"not an image" for the ids in `bad`); with
    dataset_json, root is a prepared dataset (dataset.json beside the split)."""
    def rows():
        for i in ids:
            i = int(i)
            rgb = ((37 * i) % 256, (91 * i) % 256, (173 * i) % 256)
            data = b"not an image" if i in bad else png(rgb, size, noise, seed=i)
            yield {"id": i, "image": data, "label": -1, "true_label": -1, "source": f"gen:{i}"}

    write_split(rows(), str(root), "unlabeled", rows_per_shard=rows_per_shard)
    if dataset_json is not None:
        (root / "dataset.json").write_text(json.dumps({"schema_version": 1, **dataset_json}))


def decide(msp: np.ndarray, ood: np.ndarray) -> np.ndarray:
    """The MSP rule (hard at or above C_HARD, rejected at or below C_OOD, soft between), stage-1 OOD rows aside."""
    code = np.where(msp >= C_HARD, 0, np.where(msp > C_OOD, 1, 3))
    return np.where(ood, 2, code).astype(np.int8)


def synthetic_pool(n: int, num_classes: int, *, seed: int = 0, num_ids: int | None = None, truth: bool = True,
                   errors: int = 0) -> dict[str, np.ndarray]:
    """Columns of a pool table, vectorised (a million rows in well under a second). Ids are 0..n-1, or cycle over
    0..num_ids-1 (many rows on a few images); msp values are distinct multiples of 1/4096 while n allows."""
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, num_classes, n)
    msp = (rng.permutation(4096)[:n] + 1) / 4096 if n <= 4096 else rng.integers(1, 4097, n) / 4096
    msp = msp.astype(np.float32)
    ood = rng.random(n) < 0.05
    true = np.where(rng.random(n) < 0.7, pred, rng.integers(0, num_classes, n))
    true = np.where(rng.random(n) < 0.05, -1, true)
    cols = {"id": (np.arange(n) % (num_ids or n)).astype(np.int64), "pred": pred.astype(np.int32), "msp": msp,
            "zs_msp": rng.uniform(0.05, 0.9, n).astype(np.float32), "code": decide(msp, ood),
            "true_label": true.astype(np.int32) if truth else np.full(n, -1, np.int32),
            "error": np.zeros(n, np.int8)}
    cols["error"][rng.choice(n, errors, replace=False)] = 1
    return cols


def write_table(table_dir, cols: dict, *, files: int = 2, shards: dict | None = None) -> None:
    """A committed pseudo-label table in `files` Parquet files, as the scorer and commit_table leave it (decision
    and error as strings); shards: the _SUCCESS map of table file → pool shard, when given."""
    table_dir.mkdir(parents=True)
    n = len(cols["id"])
    arrays = {k: pa.array(v) for k, v in cols.items() if k not in ("code", "error")}
    arrays["decision"] = pc.take(pa.array(DECISIONS), pa.array(cols["code"]))
    arrays["weight"] = pa.array(np.where(cols["code"] < 2, 1.0, 0.0).astype(np.float32))
    arrays["error"] = pc.take(pa.array(["", "OSError: cannot identify image file"]), pa.array(cols["error"]))
    table = pa.table(arrays)
    names = [f"part-{i:05d}.parquet" for i in range(files)]
    bounds = np.linspace(0, n, files + 1).astype(int)
    for name, a, b in zip(names, bounds[:-1], bounds[1:]):
        pq.write_table(table.slice(a, b - a), table_dir / name)
    (table_dir / SUCCESS).write_text(json.dumps({"files": names, "rows": n, **({"shards": shards} if shards else {})}))
