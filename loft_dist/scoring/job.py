"""Scoring image shards with the actor pool into a table (DESIGN §3, §5), resumable chunk by chunk.

The input shards are cut into chunks. One streaming execution reads the uncommitted chunks' shards →
decode (tasks) → Scorer (actor pool) → the driver, which writes each chunk's rows into a temp dir and
commits it with _SUCCESS when its last row is in. A re-run skips committed chunks, so a killed job loses
at most the chunks in flight. When every chunk is in, the chunk files are moved into the final table dir,
which is committed with the total row count — checked to equal the input's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loft_dist.config import to_dict
from loft_dist import storage
from loft_dist.data.pseudo_labels import commit_table, is_complete, table_files, table_rows
from loft_dist.data.quarantine import check_unique_ids
from loft_dist.data.store import count_rows, shard_paths
from loft_dist.data.transforms import decode_batch
from loft_dist.errors import ConfigError, DataError, StorageError, WeightsError
from loft_dist.scoring.scorer import Scorer

log = logging.getLogger(__name__)
INPUT_COLUMNS = ["id", "image", "true_label"]


def _path_key(path: str) -> str:
    """A shard path as Ray Data's `include_paths` column gives it: no URI scheme, absolute when local."""
    if "://" in path:
        return path.split("://", 1)[1]
    return os.path.normpath(os.path.abspath(path))


def _scored_dataset(cfg, paths: list[str], rows: int, scorer_kwargs: dict):
    """read → decode (tasks) → Scorer (actor pool), streaming; each row keeps the `path` of its shard."""
    import ray.data

    s = cfg.scoring
    # About 4 batches per read task: a prepared split's shards hold 256 rows, and a Ray task per shard cost more
    # than reading and decoding it (one task per shard ran at ~1,000 rows/s on 2 cores).
    blocks = max(1, min(len(paths), math.ceil(rows / (4 * s.batch_size))))
    fs, _ = storage.resolve(paths[0])
    ds = ray.data.read_parquet([storage.resolve(p)[1] for p in paths], filesystem=fs, columns=INPUT_COLUMNS,
                               include_paths=True, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, fn_kwargs={"view": s.view, "image_size": cfg.data.image_size, "normalized": False},
                        batch_format="numpy", num_cpus=s.cpus_per_data_task)  # uint8 pixels: the Scorer normalizes
    return ds.map_batches(
        Scorer, fn_constructor_kwargs=scorer_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        batch_size=s.batch_size, batch_format="numpy", num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor or None,
        resources=dict(s.custom_resources) or None,
    )  # Ray Data's actor pool restarts dead actors and retries their batches (max_restarts = max_task_retries = -1)


def _score_chunks(cfg, chunks: dict[int, list[str]], expected: dict[int, int], work: str, scorer_kwargs: dict,
                  on_commit) -> None:
    """Score the uncommitted chunks in one Ray Data execution and commit each chunk the moment its last row is in.

    One execution, not one per chunk: every execution starts its own actor pool, and an actor's start-up (torch +
    open_clip import, model build: ~10 s on 2 cores) repeated per chunk of 64 shards cost more than the scoring of
    a pool of millions. The scored rows are small (~100 bytes), so the driver writes them itself, into the temp dir
    of the chunk their shard belongs to (Ray Data's `path` column says which); a killed job loses only the
    chunks in flight, and a retried actor task cannot leave a duplicate file behind.
    """
    chunk_of = {_path_key(p): c for c, ps in chunks.items() for p in ps}
    shard_name = {_path_key(p): storage.name(p) for ps in chunks.values() for p in ps}
    scored = _scored_dataset(cfg, [p for c in sorted(chunks) for p in chunks[c]], sum(expected.values()), scorer_kwargs)
    tag = uuid.uuid4().hex[:8]
    tmp = {c: storage.join(work, f".chunk-{c:05d}.tmp-{tag}") for c in chunks}
    got, parts = dict.fromkeys(chunks, 0), dict.fromkeys(chunks, 0)
    shards: dict[int, dict[str, str]] = {c: {} for c in chunks}  # file → its input shard: one shard per file
    try:
        for c in chunks:
            storage.makedirs(tmp[c])
            if expected[c] == 0:  # shards without rows: nothing will arrive for them
                commit_table(tmp[c], storage.join(work, f"chunk-{c:05d}"), expected_rows=0, shards={})
                on_commit(c, 0)
        for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            keys = block.column("path").to_pylist()
            block = block.drop_columns(["path"])
            unique = list(dict.fromkeys(keys))
            for key in unique:
                c = chunk_of.get(_path_key(key), chunk_of.get(key))
                if c is None:
                    raise RuntimeError(f"scored rows from {key!r}, which is not one of this job's shards")
                rows = block if len(unique) == 1 else block.filter(pa.array([k == key for k in keys]))
                name = f"part-{parts[c]:05d}.parquet"
                with storage.open_output(storage.join(tmp[c], name)) as f:
                    pq.write_table(rows, f)
                shards[c][name] = shard_name.get(_path_key(key), storage.name(key))
                parts[c] += 1
                got[c] += rows.num_rows
                if got[c] == expected[c]:
                    commit_table(tmp[c], storage.join(work, f"chunk-{c:05d}"), expected_rows=expected[c],
                                 shards=shards[c])
                    on_commit(c, expected[c])
        short = {c: (got[c], expected[c]) for c in chunks if got[c] != expected[c]}
        if short:
            raise RuntimeError(f"scored rows per chunk (got, expected) {short}: not one row per input image; "
                               f"nothing of these chunks was committed — re-run to redo them")
    finally:
        for t in tmp.values():
            storage.remove(t)


def score_shards(cfg, paths: list[str], out_dir: str, *, class_names: list[str], mode: str,
                 checkpoint: str | None = None, zs_table: str | None = None, label: str = "") -> int:
    """Score the given Parquet image shards into the table at out_dir (a path or a URI); returns its row count."""
    out = storage.absolute(out_dir)
    if is_complete(out):
        return table_rows(out)
    check_unique_ids(paths, label or storage.name(out))  # one row per image needs one id per image (a row count cannot tell)
    s = cfg.scoring
    per_chunk = s.shards_per_chunk or len(paths)
    chunks = [paths[i:i + per_chunk] for i in range(0, len(paths), per_chunk)]
    work = storage.join(storage.parent(out), f".{storage.name(out)}.work")
    identity = {"mode": mode, "checkpoint": checkpoint, "inputs": [storage.name(p) for p in paths],
                "per_chunk": per_chunk}
    ident_file = storage.join(work, "job.json")
    if storage.is_file(ident_file) and storage.read_json(ident_file) != identity:
        log.warning("%s was left by a different scoring job; starting it over", work)
        storage.remove(work)
    storage.write_json(ident_file, identity)
    for stale in storage.listdir(work):  # a killed run's chunks in flight: redone below
        if stale.startswith(".chunk-") and ".tmp-" in stale:
            storage.remove(storage.join(work, stale))

    kwargs = {"cfg": to_dict(cfg), "class_names": class_names, "mode": mode, "checkpoint": checkpoint,
              "zs_table": zs_table}
    rows = {i: count_rows(chunk) for i, chunk in enumerate(chunks)}
    total = sum(rows.values())
    todo = {i: chunk for i, chunk in enumerate(chunks) if not is_complete(storage.join(work, f"chunk-{i:05d}"))}
    done = total - sum(rows[i] for i in todo)
    log.info("scoring %s: %d rows in %d shards (%d chunks, %d done before), mode %s, actor pool %d..%d actors x "
             "%s CPU / %s GPU, batch %d", label or storage.name(out), total, len(paths), len(chunks), len(chunks) - len(todo),
             mode, s.min_actors, s.max_actors, s.cpus_per_actor, s.gpus_per_actor, s.batch_size)
    t0, fresh, committed = time.time(), 0, len(chunks) - len(todo)

    def on_commit(i: int, n: int) -> None:
        nonlocal fresh, committed, done
        fresh, done, committed = fresh + n, done + n, committed + 1
        rate = fresh / max(time.time() - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        log.info("scoring %s: chunk %d committed (%d/%d), %d/%d rows, %.0f rows/s, ETA %.0f s", label or storage.name(out),
                 i, committed, len(chunks), done, total, rate, eta)

    if todo:
        _score_chunks(cfg, todo, {i: rows[i] for i in todo}, work, kwargs, on_commit)

    staged, shards = storage.staging(out), {}
    for i in range(len(chunks)):
        chunk = storage.join(work, f"chunk-{i:05d}")
        of = storage.committed(chunk).get("shards", {})
        for f in table_files(chunk):
            name = f"chunk-{i:05d}-{storage.name(f)}"
            storage.move(f, storage.join(staged, name))
            if storage.name(f) in of:  # a chunk committed by an older version names none; training then says so
                shards[name] = of[storage.name(f)]
    n = commit_table(staged, out, expected_rows=total, shards=shards)
    storage.remove(work)
    return n


def score_split(cfg, data_root: str, split: str, out_dir: str, **kwargs) -> int:
    return score_shards(cfg, shard_paths(data_root, split), out_dir, label=split, **kwargs)


def _stage_image_folder(folder: Path, staging: str, rows_per_shard: int) -> list[str]:
    """An image folder → Parquet shards (ids = stable hash of the relative path), once; reused on re-runs."""
    import hashlib

    from loft_dist.data.sources import IMAGE_EXTENSIONS, not_images_message
    from loft_dist.data.store import write_split

    if storage.is_committed(staging):
        return shard_paths(storage.parent(staging), storage.name(staging))
    files, others = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            (files if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    if not files:
        raise DataError(f"scoring.input={folder} holds no Parquet shards and no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); point it at a shard dir or an image folder")
    others = [p for p in others if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if others:  # neither scored nor quarantined, they would vanish from the output unseen
        raise DataError(f"scoring.input={folder}: {not_images_message(others)}")

    def rows():
        for p in files:
            rel = str(p.relative_to(folder))
            yield {"id": int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") >> 1,
                   "image": p.read_bytes(), "label": -1, "true_label": -1, "source": rel}

    write_split(rows(), storage.parent(staging), storage.name(staging), rows_per_shard)  # committed: _SUCCESS
    return shard_paths(storage.parent(staging), storage.name(staging))


def scoring_ask(cfg):
    """What the scoring pool's first actors ask of the cluster (runtime.check_fits)."""
    from loft_dist.runtime import Ask

    s = cfg.scoring
    return Ask("scoring", s.min_actors, "actor", {"CPU": s.cpus_per_actor, "GPU": s.gpus_per_actor, **s.custom_resources},
               s.cpus_per_data_task, ("scoring.min_actors", "scoring.cpus_per_actor", "scoring.cpus_per_data_task"))


def run_score_job(cfg) -> int:
    """`loft-dist score`: pseudo-label an arbitrary pool with a checkpoint; resumable chunk by chunk."""
    from loft_dist.algorithms import load_model
    from loft_dist.lease import Lease
    from loft_dist.runtime import check_fits, init_ray
    from loft_dist.storage import check_writable

    s = cfg.scoring
    if not s.input or not s.output:
        raise ConfigError("set scoring.input (a dir of Parquet image shards, a prepared dataset dir, or an "
                                "image folder) and scoring.output (the table dir to write)")
    check_writable(s.output, "scoring.output")
    src, out = storage.absolute(s.input), storage.absolute(s.output)
    if storage.is_file(storage.join(src, "dataset.json")):
        paths = shard_paths(src, "unlabeled")
    elif any(n.endswith(".parquet") for n in storage.listdir(src)):
        paths = [storage.join(src, n) for n in storage.listdir(src) if n.endswith(".parquet")]
    elif storage.is_dir(src) and not storage.is_uri(src):
        paths = _stage_image_folder(Path(src), storage.join(storage.parent(out), f".{storage.name(out)}.input"),
                                    cfg.data.rows_per_shard)
    elif storage.is_dir(src):
        raise DataError(f"scoring.input={s.input} holds no Parquet shards; an image folder must be a local directory "
                        f"(prepare it into shards with `loft-dist prepare`, or copy it to this machine)")
    else:
        raise StorageError(f"scoring.input={s.input} does not exist")
    class_names = _class_names(cfg, s.checkpoint)
    # The scorer's model, built once here before Ray starts: what would kill every scoring actor (an unknown
    # model.name, a corrupt checkpoint or one of another method or classes) is one error line instead.
    load_model(cfg, class_names, s.checkpoint or None)
    # One job per output: a second `loft-dist score` into it stops before Ray starts, having written nothing.
    lease = storage.join(storage.parent(out), f".{storage.name(out)}.lease.json")
    with Lease(lease, f"scoring.output={s.output}", cfg.run.lease_timeout_s):
        check_fits([scoring_ask(cfg)], strict=init_ray(cfg.run, use_gpu=s.gpus_per_actor > 0))
        return score_shards(cfg, paths, out, class_names=class_names, mode="teacher" if s.checkpoint else "zero_shot",
                            checkpoint=str(Path(s.checkpoint).resolve()) if s.checkpoint else None, label="pool")


def _configured_class_names(names) -> list[str]:
    """scoring.class_names: a list, or a text file of one name per line (blank lines and surrounding space ignored)."""
    if isinstance(names, str):
        if not storage.is_file(names):
            raise ConfigError(f"scoring.class_names={names}: no such file; give a text file of one class name per "
                              f"line, or a list (scoring.class_names=[cat,dog,...])")
        names = storage.read_lines(names)
    names = [str(n) for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if len(names) < 2 or dup:
        raise ConfigError(f"scoring.class_names: {len(names)} names{f', repeated: {dup[:3]}' if dup else ''}; "
                          f"zero-shot scoring needs at least 2 distinct class names")
    return names


def _class_names(cfg, checkpoint: str) -> list[str]:
    from loft_dist.data.store import read_dataset_info
    from loft_dist.models.checkpoint import STATE_FILE, head_classes

    if checkpoint:
        state = Path(checkpoint) / STATE_FILE
        if not state.is_file():
            raise WeightsError(f"scoring.checkpoint={checkpoint} holds no {STATE_FILE}: not a loft_dist checkpoint "
                                    f"(use runs/<name>/rounds/r<k>/checkpoint)")
        try:
            names = json.loads(state.read_text()).get("class_names")
        except (ValueError, AttributeError) as e:
            raise WeightsError(f"scoring.checkpoint={checkpoint}: {state} is not a JSON object ({e}): the checkpoint "
                               f"is corrupt or was copied incompletely; copy it again from its run dir") from e
        if names:
            return names
    elif cfg.scoring.class_names:
        return _configured_class_names(cfg.scoring.class_names)
    names = read_dataset_info(cfg.data_root)["class_names"]
    n = head_classes(checkpoint) if checkpoint else len(names)
    if n != len(names):
        raise WeightsError(f"scoring.checkpoint={checkpoint} names no class_names in {STATE_FILE} and its head has "
                           f"{n} classes, but dataset.json of data.root={cfg.data_root} has {len(names)}: the "
                           f"checkpoint was trained on other classes. Set data.root to the dataset it was trained on, "
                           f"or add its \"class_names\" (in head order) to {state}")
    return names
