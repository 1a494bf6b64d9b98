"""Scoring a split of image shards with the actor pool and writing the table atomically (DESIGN §3, §5)."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from loft_dist.config import to_dict
from loft_dist.data.pseudo_labels import commit_table
from loft_dist.data.store import count_rows, read_split, shard_paths
from loft_dist.data.transforms import decode_batch
from loft_dist.scoring.scorer import Scorer

log = logging.getLogger(__name__)


def score_split(cfg, data_root: str, split: str, out_dir: str, *, class_names: list[str], mode: str,
                checkpoint: str | None = None, zs_table: str | None = None) -> int:
    """read_parquet → decode (tasks) → Scorer (actor pool) → write_parquet (temp) → commit with _SUCCESS.

    Returns the row count, checked to equal the split's row count (one output row per image).
    """
    import ray.data

    s = cfg.scoring
    expected = count_rows(shard_paths(data_root, split))
    ds = read_split(data_root, split, columns=["id", "image", "true_label"]).map_batches(
        decode_batch, fn_kwargs={"view": s.view, "image_size": cfg.data.image_size}, batch_format="numpy",
        num_cpus=s.cpus_per_data_task)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={"cfg": to_dict(cfg), "class_names": class_names, "mode": mode,
                               "checkpoint": checkpoint, "zs_table": zs_table},
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        batch_size=s.batch_size, batch_format="numpy", num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor or None,
    )  # Ray Data's actor pool restarts dead actors and retries their batches (max_restarts = max_task_retries = -1)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    log.info("scoring %s (%d rows, mode %s) with an actor pool of %d..%d actors (%s CPU, %s GPU each)",
             split, expected, mode, s.min_actors, s.max_actors, s.cpus_per_actor, s.gpus_per_actor)
    t0 = time.time()
    try:
        scored.write_parquet(str(tmp))
        rows = commit_table(tmp, out, expected_rows=expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dt = time.time() - t0
    log.info("scored %d rows of %s in %.1f s (%.0f rows/s)", rows, split, dt, rows / max(dt, 1e-9))
    return rows
