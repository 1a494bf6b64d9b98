"""Scoring image shards with the actor pool into a table (DESIGN §3, §5), resumable chunk by chunk.

The input rows are cut into chunks of at most scoring.rows_per_chunk rows, whatever the shards' size (a big shard
or row group is split by row ranges). One streaming execution reads the uncommitted chunks' rows and decodes them
(tasks) → Scorer (actor pool) → the driver, which writes each chunk's rows into a temp dir and commits it with
_SUCCESS when its last row is in. A re-run skips committed chunks, so a killed job loses
at most the chunks in flight. When every chunk is in, the chunk files are moved into the final table dir,
which is committed with the total row count — checked to equal the input's.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loft_dist.config import to_dict
from loft_dist import storage
from loft_dist.data.pseudo_labels import commit_table, is_complete, table_files, table_rows
from loft_dist.data.quarantine import check_unique_ids
from loft_dist.data.store import open_parquet, shard_paths
from loft_dist.data.transforms import decode_batch
from loft_dist.errors import ConfigError, DataError, StorageError, WeightsError

log = logging.getLogger(__name__)
INPUT_COLUMNS = ["id", "image", "true_label"]


def plan_chunks(paths: list[str], rows_per_chunk: int, unit_rows: int) -> list[list[list[tuple]]]:
    """The input cut into chunks of at most rows_per_chunk rows (0: one chunk), each chunk into read units of at most
    unit_rows rows; a unit is a list of slices (shard path, row group, start, stop). Boundaries follow the rows'
    order only, so a chunk holds the same rows whatever the unit size (resume compares chunks, not units); a shard or
    row group above either size is split by row ranges. Reads the Parquet footers only."""
    chunk_cap = rows_per_chunk or math.inf
    chunks: list[list[list[tuple]]] = []
    chunk: list[list[tuple]] = []
    unit: list[tuple] = []
    in_chunk = in_unit = 0
    for path in paths:
        meta = open_parquet(path).metadata
        for rg in range(meta.num_row_groups):
            n, start = meta.row_group(rg).num_rows, 0
            while start < n:
                take = int(min(n - start, unit_rows - in_unit, chunk_cap - in_chunk))
                unit.append((path, rg, start, start + take))
                start, in_unit, in_chunk = start + take, in_unit + take, in_chunk + take
                if in_unit == unit_rows or in_chunk == chunk_cap:
                    chunk.append(unit)
                    unit, in_unit = [], 0
                if in_chunk == chunk_cap:
                    chunks.append(chunk)
                    chunk, in_chunk = [], 0
    if unit:
        chunk.append(unit)
    if chunk:
        chunks.append(chunk)
    return chunks


def read_unit(batch: dict, view: str, image_size: int) -> dict:
    """One read unit's rows (its slices of row groups) decoded, each row with its shard `path` and its unit's
    `targets`: the (chunk, scorer mode) of every table the row is scored into (two tables read the same pool once)."""
    import numpy as np

    (slices,), (targets,) = batch["slices"], batch["targets"]
    parts, paths = [], []
    for path, rg, start, stop in json.loads(str(slices)):
        with storage.open_input(path) as f:
            parts.append(pq.ParquetFile(f).read_row_group(rg, columns=INPUT_COLUMNS).slice(start, stop - start))
        paths += [path] * (stop - start)
    rows = {k: v.to_numpy(zero_copy_only=False) for k, v in zip(INPUT_COLUMNS, pa.concat_tables(parts).columns)}
    rows.update(path=np.asarray(paths, dtype=object), targets=np.full(len(paths), str(targets), dtype=object))
    return decode_batch(rows, view=view, image_size=image_size, normalized=False)  # uint8: the Scorer normalizes


def _scored_dataset(cfg, units: list[dict], scorer_kwargs: dict):
    """read + decode (tasks, one per unit of ~4 batches) → Scorer (actor pool), streaming; each row keeps its shard
    `path` and comes out once per target: with that target's `chunk`, scored in that target's mode."""
    import ray.data

    from loft_dist.scoring import scorer  # here, not at the top: the decode tasks import this module, never torch

    s = cfg.scoring
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_unit, batch_size=1, batch_format="numpy", num_cpus=s.cpus_per_data_task,
                        fn_kwargs={"view": s.view, "image_size": cfg.data.image_size})
    return ds.map_batches(
        scorer.Scorer, fn_constructor_kwargs=scorer_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        batch_size=s.batch_size, batch_format="numpy", num_cpus=s.cpus_per_actor, num_gpus=s.gpus_per_actor or None,
        resources=dict(s.custom_resources) or None,
    )  # Ray Data's actor pool restarts dead actors and retries their batches (max_restarts = max_task_retries = -1)


@dataclass
class _Table:
    """One output table of a scoring job: its input shards, its scorer mode, its chunks, and where they are
    committed."""
    label: str
    paths: list[str]
    out: str
    mode: str
    chunks: list = field(default_factory=list)  # read units of each chunk (plan_chunks)
    rows: list[int] = field(default_factory=list)  # rows of each chunk

    @property
    def work(self) -> str:
        return storage.join(storage.parent(self.out), f".{storage.name(self.out)}.work")

    def chunk_dir(self, i: int) -> str:
        return storage.join(self.work, f"chunk-{i:05d}")


def _score_chunks(cfg, todo: dict[int, tuple[_Table, int]], scorer_kwargs: dict, on_commit) -> None:
    """Score the uncommitted chunks (job-wide number → (table, its chunk index)) in one Ray Data execution and commit
    each chunk the moment its last row is in.

    One execution, not one per chunk or per table: every execution starts its own actor pool, and an actor's start-up
    (torch + open_clip import, model build: ~10 s on 2 cores) repeated per chunk cost more than the scoring of a pool
    of millions. The scored rows are small (~100 bytes), so the driver writes them itself, one file per chunk and
    input shard of each block, into the chunk's temp dir; a killed job loses only the chunks in flight, and a retried
    actor task cannot leave a duplicate file behind.
    """
    scored = _scored_dataset(cfg, _read_units(todo), scorer_kwargs)
    tag = uuid.uuid4().hex[:8]
    tmp = {c: storage.join(t.work, f".chunk-{i:05d}.tmp-{tag}") for c, (t, i) in todo.items()}
    expected = {c: t.rows[i] for c, (t, i) in todo.items()}
    got, parts = dict.fromkeys(todo, 0), dict.fromkeys(todo, 0)
    shards: dict[int, dict[str, str]] = {c: {} for c in todo}  # file → its input shard: one shard per file
    try:
        for c in todo:
            storage.makedirs(tmp[c])
        for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            keys = list(zip(block.column("chunk").to_pylist(), block.column("path").to_pylist()))
            block = block.drop_columns(["chunk", "path"])
            unique = list(dict.fromkeys(keys))
            for key in unique:
                c, path = key
                if c not in todo:
                    raise RuntimeError(f"scored rows of chunk {c} ({path!r}), which is not one of this job's chunks")
                rows = block if len(unique) == 1 else block.filter(pa.array([k == key for k in keys]))
                name = f"part-{parts[c]:05d}.parquet"
                with storage.open_output(storage.join(tmp[c], name)) as f:
                    pq.write_table(rows, f)
                shards[c][name] = storage.name(path)
                parts[c] += 1
                got[c] += rows.num_rows
                if got[c] == expected[c]:
                    table, i = todo[c]
                    commit_table(tmp[c], table.chunk_dir(i), expected_rows=expected[c], shards=shards[c])
                    on_commit(table, i, expected[c])
        short = {f"{t.label} chunk {i}": (got[c], expected[c]) for c, (t, i) in todo.items() if got[c] != expected[c]}
        if short:
            raise RuntimeError(f"scored rows per chunk (got, expected) {short}: not one row per input image; "
                               f"nothing of these chunks was committed — re-run to redo them")
    finally:
        for t in tmp.values():
            storage.remove(t)


def _read_units(todo: dict[int, tuple[_Table, int]]) -> list[dict]:
    """The read units of the uncommitted chunks. Tables of the same input shards (round 0's pool scored zero-shot and
    by round 1's teacher: one model) have the same chunks, so each of their chunks is read and decoded once and
    scored into every table that still needs it: a unit's `targets` lists (job-wide chunk number, scorer mode)."""
    by_input: dict[tuple, list[tuple[int, str]]] = {}
    units: dict[tuple, list] = {}
    for c, (t, i) in sorted(todo.items()):
        key = (tuple(t.paths), i)
        by_input.setdefault(key, []).append((c, t.mode))
        units.setdefault(key, t.chunks[i])
    return [{"slices": json.dumps(u), "targets": json.dumps(targets)} for key, targets in by_input.items()
            for u in units[key]]


def _plan_table(cfg, table: _Table, checkpoint: str | None) -> None:
    """Cut an unfinished table's input into chunks and claim its work dir (a different job's is started over, a killed
    run's chunks in flight are removed: they are redone)."""
    check_unique_ids(table.paths, table.label)  # one row per image needs one id per image (a row count cannot tell)
    s = cfg.scoring
    # About 4 batches per read task: one task per 256-row shard cost more than reading and decoding it (~1,000
    # rows/s on 2 cores)
    table.chunks = plan_chunks(table.paths, s.rows_per_chunk, max(4 * s.batch_size, 1))
    table.rows = [sum(stop - start for unit in chunk for _, _, start, stop in unit) for chunk in table.chunks]
    identity = {"mode": table.mode, "checkpoint": checkpoint, "inputs": [storage.name(p) for p in table.paths],
                "rows_per_chunk": s.rows_per_chunk}
    ident_file = storage.join(table.work, "job.json")
    if storage.is_file(ident_file) and storage.read_json(ident_file) != identity:
        log.warning("%s was left by a different scoring job; starting it over", table.work)
        storage.remove(table.work)
    storage.write_json(ident_file, identity)
    for stale in storage.listdir(table.work):
        if stale.startswith(".chunk-") and ".tmp-" in stale:
            storage.remove(storage.join(table.work, stale))


def _finish_table(table: _Table) -> int:
    """Move every committed chunk's files into the final table dir and commit it with the total row count."""
    staged, shards = storage.staging(table.out), {}
    for i in range(len(table.chunks)):
        chunk = table.chunk_dir(i)
        of = storage.committed(chunk).get("shards", {})
        for f in table_files(chunk):
            name = f"chunk-{i:05d}-{storage.name(f)}"
            storage.move(f, storage.join(staged, name))
            if storage.name(f) in of:  # a chunk committed by an older version names none; training then says so
                shards[name] = of[storage.name(f)]
    n = commit_table(staged, table.out, expected_rows=sum(table.rows), shards=shards)
    storage.remove(table.work)
    return n


def score_tables(cfg, inputs: dict[str, tuple[list[str], str, str]], *, class_names: list[str],
                 checkpoint: str | None = None, zs_table: str | None = None) -> dict[str, int]:
    """Score Parquet image shards into tables with one model, label → (input shards, table dir: a path or a URI,
    scorer mode), in one execution with one actor pool for all of them; returns each table's row count. A table
    already complete is kept as it is. zs_table: round 0's pool table, for teacher rows (scorer.py)."""
    tables = [_Table(label, paths, storage.absolute(out), mode) for label, (paths, out, mode) in inputs.items()]
    counts = {t.label: table_rows(t.out) for t in tables if is_complete(t.out)}
    tables = [t for t in tables if t.label not in counts]
    s = cfg.scoring
    todo: dict[int, tuple[_Table, int]] = {}
    for t in tables:
        _plan_table(cfg, t, checkpoint)
        pending = [i for i in range(len(t.chunks)) if not is_complete(t.chunk_dir(i))]
        todo.update({len(todo) + k: (t, i) for k, i in enumerate(pending)})
        log.info("scoring %s: %d rows in %d shards (%d chunks of <= %s rows, %d done before), mode %s, actor pool "
                 "%d..%d actors x %s CPU / %s GPU, batch %d", t.label, sum(t.rows), len(t.paths), len(t.chunks),
                 s.rows_per_chunk or "all", len(t.chunks) - len(pending), t.mode, s.min_actors, s.max_actors,
                 s.cpus_per_actor, s.gpus_per_actor, s.batch_size)
    total = sum(t.rows[i] for t, i in todo.values())
    t0, fresh, committed = time.time(), 0, 0

    def on_commit(t: _Table, i: int, n: int) -> None:
        nonlocal fresh, committed
        fresh, committed = fresh + n, committed + 1
        rate = fresh / max(time.time() - t0, 1e-9)
        log.info("scoring %s: chunk %d committed (%d/%d of this job), %d/%d rows, %.0f rows/s, ETA %.0f s", t.label, i,
                 committed, len(todo), fresh, total, rate, (total - fresh) / rate if rate > 0 else 0.0)

    if todo:
        labels = list(dict.fromkeys(t.label for t, _ in todo.values()))
        log.info("scoring job: %d rows of %s, one execution (one actor pool), model %s", total, ", ".join(labels),
                 checkpoint or "zero-shot CLIP")
        kwargs = {"cfg": to_dict(cfg), "class_names": class_names, "checkpoint": checkpoint, "zs_table": zs_table}
        _score_chunks(cfg, todo, kwargs, on_commit)
    return {**counts, **{t.label: _finish_table(t) for t in tables}}


def score_shards(cfg, paths: list[str], out_dir: str, *, mode: str, label: str = "", **kwargs) -> int:
    """Score the given Parquet image shards into the table at out_dir (a path or a URI); returns its row count."""
    label = label or storage.name(out_dir)
    return score_tables(cfg, {label: (paths, out_dir, mode)}, **kwargs)[label]


def score_splits(cfg, data_root: str, outs: dict[str, str], *, mode: str, **kwargs) -> dict[str, int]:
    """Score splits of a prepared dataset, split → table dir, in one job (one actor pool)."""
    return score_tables(cfg, split_inputs(data_root, outs, mode), **kwargs)


def split_inputs(data_root: str, outs: dict[str, str], mode: str) -> dict[str, tuple[list[str], str, str]]:
    """score_tables' inputs for splits of a prepared dataset, split → table dir, all in one mode."""
    return {split: (shard_paths(data_root, split), out, mode) for split, out in outs.items()}


def score_split(cfg, data_root: str, split: str, out_dir: str, **kwargs) -> int:
    return score_splits(cfg, data_root, {split: out_dir}, **kwargs)[split]


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
