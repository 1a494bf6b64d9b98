"""Scoring image shards with the actor pool into a table (DESIGN §3, §5), resumable chunk by chunk.

The input shards are cut into chunks; each chunk streams read_parquet → decode (tasks) → Scorer (actor
pool) → write_parquet into a temp dir that is committed with _SUCCESS. A re-run skips committed chunks,
so a killed job loses at most the chunk in flight. When every chunk is in, the chunk files are moved into
the final table dir, which is committed with the total row count — checked to equal the input's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from loft_dist.config import to_dict
from loft_dist.data.pseudo_labels import SUCCESS, commit_table, is_complete
from loft_dist.data.quarantine import check_unique_ids
from loft_dist.data.store import count_rows, shard_paths
from loft_dist.data.transforms import decode_batch
from loft_dist.scoring.scorer import Scorer

log = logging.getLogger(__name__)
INPUT_COLUMNS = ["id", "image", "true_label"]


def _score_chunk(cfg, paths: list[str], out: Path, scorer_kwargs: dict, expected: int) -> int:
    import ray.data

    s = cfg.scoring
    ds = ray.data.read_parquet(paths, columns=INPUT_COLUMNS, override_num_blocks=len(paths)).map_batches(
        decode_batch, fn_kwargs={"view": s.view, "image_size": cfg.data.image_size}, batch_format="numpy",
        num_cpus=s.cpus_per_data_task)
    scored = ds.map_batches(
        Scorer, fn_constructor_kwargs=scorer_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        batch_size=s.batch_size, batch_format="numpy", num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor or None,
        resources=dict(s.custom_resources) or None,
    )  # Ray Data's actor pool restarts dead actors and retries their batches (max_restarts = max_task_retries = -1)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        scored.write_parquet(str(tmp))
        return commit_table(tmp, out, expected_rows=expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def score_shards(cfg, paths: list[str], out_dir: str, *, class_names: list[str], mode: str,
                 checkpoint: str | None = None, zs_table: str | None = None, label: str = "") -> int:
    """Score the given Parquet image shards into the table at out_dir; returns its row count."""
    out = Path(out_dir)
    if is_complete(out):
        return json.loads((out / SUCCESS).read_text())["rows"]
    check_unique_ids(paths, label or out.name)  # one row per image needs one id per image (a row count cannot tell)
    s = cfg.scoring
    per_chunk = s.shards_per_chunk or len(paths)
    chunks = [paths[i:i + per_chunk] for i in range(0, len(paths), per_chunk)]
    work = out.with_name(f".{out.name}.work")
    work.mkdir(parents=True, exist_ok=True)
    identity = {"mode": mode, "checkpoint": checkpoint, "inputs": [os.path.basename(p) for p in paths],
                "per_chunk": per_chunk}
    ident_file = work / "job.json"
    if ident_file.is_file() and json.loads(ident_file.read_text()) != identity:
        log.warning("%s was left by a different scoring job; starting it over", work)
        shutil.rmtree(work)
        work.mkdir(parents=True)
    ident_file.write_text(json.dumps(identity))

    kwargs = {"cfg": to_dict(cfg), "class_names": class_names, "mode": mode, "checkpoint": checkpoint,
              "zs_table": zs_table}
    total = count_rows(paths)
    log.info("scoring %s: %d rows in %d shards (%d chunks), mode %s, actor pool %d..%d actors x %s CPU / %s GPU, "
             "batch %d", label or out.name, total, len(paths), len(chunks), mode, s.min_actors, s.max_actors,
             s.cpus_per_actor, s.gpus_per_actor, s.batch_size)
    t0, done, fresh = time.time(), 0, 0
    for i, chunk in enumerate(chunks):
        cdir = work / f"chunk-{i:05d}"
        rows = count_rows(chunk)
        if not is_complete(cdir):
            _score_chunk(cfg, chunk, cdir, kwargs, rows)
            fresh += rows
        done += rows
        rate = fresh / max(time.time() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        log.info("scoring %s: chunk %d/%d, %d/%d rows, %.0f rows/s, ETA %.0f s", label or out.name, i + 1,
                 len(chunks), done, total, rate, eta)

    final_tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    final_tmp.mkdir()
    for i in range(len(chunks)):
        for f in sorted((work / f"chunk-{i:05d}").glob("*.parquet")):
            os.replace(f, final_tmp / f"chunk-{i:05d}-{f.name}")
    rows = commit_table(final_tmp, out, expected_rows=total)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def score_split(cfg, data_root: str, split: str, out_dir: str, **kwargs) -> int:
    return score_shards(cfg, shard_paths(data_root, split), out_dir, label=split, **kwargs)


def _stage_image_folder(folder: Path, staging: Path, rows_per_shard: int) -> list[str]:
    """An image folder → Parquet shards (ids = stable hash of the relative path), once; reused on re-runs."""
    import hashlib

    from loft_dist.data.sources import IMAGE_EXTENSIONS
    from loft_dist.data.store import write_split

    if (staging / SUCCESS).is_file():
        return shard_paths(str(staging.parent), staging.name)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"scoring.input={folder} holds no Parquet shards and no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); point it at a shard dir or an image folder")

    def rows():
        for p in files:
            rel = str(p.relative_to(folder))
            yield {"id": int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") >> 1,
                   "image": p.read_bytes(), "label": -1, "true_label": -1, "source": rel}

    write_split(rows(), str(staging.parent), staging.name, rows_per_shard)
    (staging / SUCCESS).write_text(json.dumps({"rows": len(files)}))
    return shard_paths(str(staging.parent), staging.name)


def run_score_job(cfg) -> int:
    """`loft-dist score`: pseudo-label an arbitrary pool with a checkpoint; resumable chunk by chunk."""
    from loft_dist.runtime import init_ray

    s = cfg.scoring
    if not s.input or not s.output:
        raise FileNotFoundError("set scoring.input (a dir of Parquet image shards, a prepared dataset dir, or an "
                                "image folder) and scoring.output (the table dir to write)")
    src = Path(s.input)
    if (src / "dataset.json").is_file():
        paths = shard_paths(str(src), "unlabeled")
    elif src.is_dir() and any(src.glob("*.parquet")):
        paths = sorted(str(p) for p in src.glob("*.parquet"))
    elif src.is_dir():
        paths = _stage_image_folder(src, Path(s.output).with_name(f".{Path(s.output).name}.input"),
                                    cfg.data.rows_per_shard)
    else:
        raise FileNotFoundError(f"scoring.input={s.input} does not exist")
    class_names = _class_names(cfg, s.checkpoint)
    init_ray(cfg.run, use_gpu=s.gpus_per_actor > 0)
    return score_shards(cfg, paths, str(Path(s.output).resolve()), class_names=class_names,
                        mode="teacher" if s.checkpoint else "zero_shot",
                        checkpoint=str(Path(s.checkpoint).resolve()) if s.checkpoint else None, label="pool")


def _class_names(cfg, checkpoint: str) -> list[str]:
    from loft_dist.data.store import read_dataset_info
    from loft_dist.models.checkpoint import STATE_FILE

    if checkpoint:
        state = Path(checkpoint) / STATE_FILE
        if not state.is_file():
            raise FileNotFoundError(f"scoring.checkpoint={checkpoint} holds no {STATE_FILE}: not a loft_dist checkpoint "
                                    f"(use runs/<name>/rounds/r<k>/checkpoint)")
        names = json.loads(state.read_text()).get("class_names")
        if names:
            return names
    return read_dataset_info(cfg.data_root)["class_names"]
