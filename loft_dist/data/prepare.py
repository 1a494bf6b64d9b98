"""`loft-dist prepare`: a source + a split protocol (+ OOD images) → the dataset dir of DESIGN §3.

Splits: labeled, unlabeled (the pool, OOD images mixed in), test, and ood_test when asked for.
Ids are stable across re-runs and never collide: an image keeps its index in the source it comes
from, offset by that source (training source i → i, official test set i → TEST_ID_OFFSET + i,
OOD source i → OOD_ID_OFFSET + i).

Labeled and pool rows are written in a seeded random order, so every training shard holds a mix of
classes (and the pool's share of OOD images) whatever the source's order; sources are therefore
read with random access (test splits are written in source order).
That is cheap for CIFAR (in memory), ImageFolder trees and path manifests (one file per image); a
Parquet manifest holding image bytes is cached by row group up to 512 MB, beyond that its row
groups are re-read, and a path manifest is the better source.

Each split is cut into groups of data.rows_per_shard rows in write order; when Ray is up (`loft-dist prepare` and
`loft-dist run` start it for a split of PARALLEL_MIN_GROUPS groups or more) Ray Data tasks read, encode and write the
groups in parallel, each into its own shard names in the split's staging dir, and the driver commits the split once
every group is in. The bytes are the same as the driver writes alone.

Bad records (labels out of range, unknown class names, missing files or columns, empty classes)
stop the build with a SourceError that names the config key, the file and the record. Image
bytes are stored as they are, undecodable ones included: those are quarantined when streamed
(data/transforms.py `Decoder`, data/quarantine.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pickle
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from loft_dist import storage
from loft_dist.config import Config, DataConfig
from loft_dist.data import protocol
from loft_dist.data.sources import Source, SourceError
from loft_dist.data.store import (SCHEMA_VERSION, SPLITS, commit_split, read_dataset_info, remove_dataset_info,
                                  split_exists, write_shard_group)
from loft_dist.errors import DataError

log = logging.getLogger(__name__)
OOD_ID_OFFSET = 1 << 40
TEST_ID_OFFSET = 1 << 41
_NOT_CONTENT = ("root", "hflip")  # data keys that change no byte of the dataset


def protocol_record(cfg: Config) -> dict:
    """Everything that decides the dataset's content; kept in dataset.json, a rebuild is skipped when it matches."""
    from loft_dist.data.embedded import RESERVED_PER_CLASS

    d = dataclasses.asdict(cfg.data)
    record = {**{k: v for k, v in d.items() if k not in _NOT_CONTENT}, "seed": cfg.run.seed}
    if cfg.data.source == "embedded":  # a dataset prepared before the stand-in's digits were held back is stale
        record["embedded_reserved_per_class"] = RESERVED_PER_CLASS
    return record


@contextlib.contextmanager
def _reading(key: str, value: str, hint: str = ""):
    """Prefix source errors with the config key that pointed there, so the user knows what to change."""
    try:
        yield
    except SourceError as e:
        raise SourceError(f"{key}={value}{hint}: {e}") from e
    except pickle.UnpicklingError as e:  # the restricted CIFAR unpickler refusing a global
        raise SourceError(f"{key}={value}: {e}") from e


# ---------------------------------------------------------------------------------------
# Sources


def official_test(d: DataConfig) -> bool:
    if d.test_source == "auto":
        return d.source in ("cifar10", "cifar100") or bool(d.test_path)
    return d.test_source == "official"


def _check_no_empty_class(src: Source, where: str, what: str) -> None:
    counts = np.bincount(src.labels, minlength=len(src.class_names))
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        c = int(empty[0])
        raise SourceError(f"{where}: class {c} ({src.class_names[c]!r}) has no {what} images "
                          f"({len(empty)} of {len(src.class_names)} classes are empty); every class needs images — "
                          f"add some, or leave the class out by name: data.drop_classes=[{src.class_names[c]!r}]")


def _subset_encoded(encoded, keep: np.ndarray, i: int) -> bytes:
    return encoded(int(keep[i]))


def _subset_origin(origin, keep: np.ndarray, i: int) -> str:
    return origin(int(keep[i]))


def drop_classes(src: Source, names: list[str], where: str, known: list[str] | None = None) -> Source:
    """The source without the classes named (data.drop_classes), the others keeping their order. A name that is no
    class of the training source (known) is a config error."""
    if not names:
        return src
    import functools

    from loft_dist.errors import ConfigError

    known = list(src.class_names) if known is None else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"data.drop_classes names {unknown[0]!r}, which is not a class of {where} "
                          f"({len(known)} classes, e.g. {', '.join(repr(n) for n in known[:3])}); fix the name")
    kept_names = [n for n in src.class_names if n not in names]
    new_index = np.asarray([kept_names.index(n) if n in kept_names else -1 for n in src.class_names], np.int64)
    keep = np.flatnonzero(new_index[src.labels] >= 0)
    return Source(kept_names, new_index[src.labels[keep]], functools.partial(_subset_encoded, src.encoded, keep),
                  functools.partial(_subset_origin, src.origin, keep))


def _align_classes(src: Source, class_names: list[str], where: str) -> Source:
    """Relabel a test set whose classes are named (ImageFolder directories) by the training set's class indices."""
    index = {n: k for k, n in enumerate(class_names)}
    unknown = [n for n in src.class_names if n not in index]
    if unknown:
        shown = ", ".join(repr(n) for n in class_names[:5]) + (f", ... ({len(class_names)} in all)"
                                                               if len(class_names) > 5 else "")
        raise SourceError(f"{where}: class {unknown[0]!r} is not a class of the training set ({shown}); "
                          f"rename or remove its directory")
    mapping = np.asarray([index[n] for n in src.class_names], np.int64)
    return Source(list(class_names), mapping[src.labels], src.encoded, src.origin)


def load_train_source(d: DataConfig):
    from loft_dist.data import embedded, sources

    if d.source == "embedded":
        src = embedded.digits_source()
    else:
        with _reading("data.source_path", d.source_path):
            if d.source in ("cifar10", "cifar100"):
                src = sources.read_cifar(d.source_path, split="train", variant=d.source)
            elif d.source == "imagefolder":
                src = sources.read_image_folder(d.source_path)
            else:
                src = sources.read_manifest(d.source_path)
    src = drop_classes(src, list(d.drop_classes), f"data.source_path={d.source_path or d.source}")
    _check_no_empty_class(src, f"data.source_path={d.source_path or d.source}", "training")
    return src


def load_test_source(d: DataConfig, class_names: list[str]) -> Source:
    from loft_dist.data import sources

    if d.source in ("cifar10", "cifar100"):
        with _reading("data.source_path", d.source_path, " (its official test batch; data.test_source=carve takes "
                                                         "the test split from the training batches instead)"):
            src = sources.read_cifar(d.source_path, split="test", variant=d.source)
        src = drop_classes(src, list(d.drop_classes), f"data.source_path={d.source_path}")
    else:
        with _reading("data.test_path", d.test_path):
            if d.source == "imagefolder":
                src = sources.read_image_folder(d.test_path)
                src = drop_classes(src, [n for n in d.drop_classes if n in src.class_names], d.test_path)
                src = _align_classes(src, class_names, d.test_path)
            else:
                dropped = list(d.drop_classes)
                src = drop_classes(sources.read_manifest(d.test_path, class_names=list(class_names) + dropped),
                                   dropped, d.test_path)
    _check_no_empty_class(src, f"data.test_path={d.test_path or d.source_path}", "test")
    return src


def _check_no_empty_split(d: DataConfig, names: list[str], counts: list[int], split: str) -> None:
    from loft_dist.errors import ConfigError

    empty = [c for c, k in enumerate(counts) if k == 0]
    if empty and not d.allow_empty_classes:
        shown = ", ".join(f"{c} {names[c]!r}" for c in empty[:5]) + (", ..." if len(empty) > 5 else "")
        fix = (f"raise data.n1 to at least data.gamma_l ({d.gamma_l:g}) or lower data.gamma_l"
               if d.protocol == "lt" else "raise data.labeled_percent")
        raise ConfigError(f"data.n1={d.n1}, data.gamma_l={d.gamma_l:g} leave {len(empty)} of {len(names)} classes with "
                          f"no {split} image (classes {shown}): {fix}; or set data.allow_empty_classes=true to run "
                          f"with them (their labeled prior is 0)" if d.protocol == "lt" else
                          f"the {split} split has no image of {len(empty)} classes ({shown}): {fix}, or set "
                          f"data.allow_empty_classes=true")


def native_size(src) -> int:
    """The side of the source's first image as stored (CIFAR: 32): what generated OOD images are drawn at, so an
    image's size alone never tells OOD from ID."""
    import io

    from PIL import Image

    if not len(src):
        return 32
    with Image.open(io.BytesIO(src.encoded(0))) as im:
        return max(8, min(im.size))


def load_ood_source(d: DataConfig, count: int, seed: int, id_size: int = 32):
    """The OOD source; `count` is only used by the generated one (the others hold what they hold), whose images are
    data.ood_image_size, or else id_size (the ID images' native side)."""
    from loft_dist.data import embedded, sources

    if d.ood_source == "generated":
        return embedded.ood_source(count, seed=seed, size=d.ood_image_size or id_size)
    with _reading("data.ood_path", d.ood_path):
        if d.ood_source in ("cifar10", "cifar100"):
            return sources.read_cifar(d.ood_path, split="train", variant=d.ood_source)
        if d.ood_source == "imagefolder":
            return sources.read_image_files(d.ood_path)
        return sources.read_manifest(d.ood_path, labeled=False)


# ---------------------------------------------------------------------------------------
# The plan: which source index goes to which split


@dataclass
class Plan:
    train: object  # Source or the embedded ArraySource (same interface)
    test: Optional[Source]  # None: the test split is carved from `train`
    ood: Optional[object]
    labeled: np.ndarray  # indices into train
    unlabeled: np.ndarray  # indices into train (the ID part of the pool)
    test_idx: np.ndarray  # indices into test (official) or train (carved)
    ood_pool: np.ndarray  # indices into ood
    ood_test: np.ndarray

    @property
    def test_source(self):
        return self.test if self.test is not None else self.train


def plan_splits(cfg: Config) -> Plan:
    d, seed = cfg.data, cfg.run.seed
    train = load_train_source(d)
    names, labels = list(train.class_names), np.asarray(train.labels)
    C = len(names)
    test = load_test_source(d, names) if official_test(d) else None
    carve = 0 if test is not None else d.test_per_class
    if d.protocol == "lt":
        n = protocol.long_tail_counts(d.n1, d.gamma_l, C)
        m = protocol.unlabeled_counts(d.m1, d.gamma_u, C, d.unlabeled_dist)
    else:
        sizes = np.bincount(labels, minlength=C) - carve
        small = np.flatnonzero(sizes < 1)
        if len(small):
            c = int(small[0])
            raise SourceError(f"data.source_path={d.source_path}: class {c} ({names[c]!r}) has {sizes[c] + carve} "
                              f"images, too few to carve {carve} test images and label one; lower data.test_per_class")
        n, m = protocol.percent_counts(sizes.tolist(), d.labeled_percent)
    _check_no_empty_split(d, names, n, "labeled")
    try:
        idx = protocol.split_long_tailed(labels, n, m, carve, d.labeled_in_unlabeled, seed)
    except protocol.ClassTooSmall as e:
        where = d.source_path or d.source
        raise SourceError(f"data.source_path={where}: {e} (class {e.cls} is {names[e.cls]!r})") from e

    n_pool = len(idx["unlabeled"])
    want = d.ood_count if d.ood_count is not None else int(round(d.ood_ratio * n_pool))
    ood, ood_pool, ood_test = None, np.zeros(0, np.int64), np.zeros(0, np.int64)
    if want or d.ood_test:
        ood = load_ood_source(d, count=max(want, 0) + d.ood_test, seed=seed + 1, id_size=native_size(train))
        if want == -1:
            want = len(ood) - d.ood_test
        if want < 0 or want + d.ood_test > len(ood):
            raise SourceError(f"data.ood_path={d.ood_path}: holds {len(ood)} images, the build needs {max(want, 0)} "
                              f"for the pool (data.ood_count / data.ood_ratio) + {d.ood_test} for ood_test "
                              f"(data.ood_test), all different; lower those or use a larger OOD source")
        # A seeded draw without replacement: the pool's and ood_test's OOD images are never the same.
        pick = np.random.default_rng(seed + 1).permutation(len(ood))[:want + d.ood_test]
        ood_pool, ood_test = np.sort(pick[:want]), np.sort(pick[want:])
    return Plan(train, test, ood, idx["labeled"], idx["unlabeled"], np.arange(len(test)) if test is not None
                else idx["test"], ood_pool, ood_test)


# ---------------------------------------------------------------------------------------
# Writing


TRAIN, TEST, OOD = 0, 1, 2  # which source a row of a split comes from (the `src` column of a split's row list)
PARALLEL_MIN_GROUPS = 4  # a split of fewer shards is written in the driver: faster than starting Ray Data tasks


def _split_rows(plan: Plan, seed: int) -> dict[str, np.ndarray]:
    """Each split as its rows in write order, (N, 2) int64: source (TRAIN | TEST | OOD) and index in that source.
    Labeled and pool rows are in a seeded random order: ID pool and OOD rows in one order, so every shard holds
    about the same OOD share."""
    def rows(src: int, idx) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        return np.stack([np.full(len(idx), src, np.int64), idx], axis=1)

    labeled = plan.labeled[np.random.default_rng(seed + 3).permutation(len(plan.labeled))]
    pool = np.concatenate([rows(TRAIN, plan.unlabeled), rows(OOD, plan.ood_pool)])
    splits = {"labeled": rows(TRAIN, labeled),
              "unlabeled": pool[np.random.default_rng(seed + 2).permutation(len(pool))],
              "test": rows(TEST, plan.test_idx)}
    if len(plan.ood_test):
        splits["ood_test"] = rows(OOD, plan.ood_test)
    return splits


def _row_dicts(sources: dict, rows: np.ndarray, labeled: bool, offsets: dict):
    """The store rows of a list of (source, index); OOD rows have no class (true_label -1)."""
    for src, i in rows.tolist():
        true = -1 if src == OOD else int(sources[src].labels[i])
        yield {"id": offsets[src] + i, "image": sources[src].encoded(i), "label": true if labeled else -1,
               "true_label": true, "source": sources[src].origin(i)}


def write_group(batch: dict, sources, staged: str, labeled: bool, offsets: dict, rows_per_shard: int,
                target_mb: Optional[float]) -> dict:
    """Ray Data task (or in-process call): one group of a split's rows read from its sources, encoded and written
    as shards. A source error comes back as a value, so the driver raises it as the one-line error it is."""
    import ray

    if isinstance(sources, ray.ObjectRef):
        sources = ray.get(sources)
    out = {"group": [], "rows": [], "sha256": [], "error": []}
    for g, rows in zip(batch["group"], batch["rows"]):
        try:
            w = write_shard_group(_row_dicts(sources, np.asarray(rows).reshape(-1, 2), labeled, offsets), staged,
                                  int(g), rows_per_shard, target_mb)
            result, error = (w["rows"], json.dumps(w["sha256"])), ""
        except DataError as e:
            result, error = (0, "{}"), str(e)
        out["group"].append(int(g))
        out["rows"].append(result[0])
        out["sha256"].append(result[1])
        out["error"].append(error)
    return {k: np.asarray(v, dtype=object if k in ("sha256", "error") else np.int64) for k, v in out.items()}


def _write_split(sources: dict, rows: np.ndarray, root: str, split: str, d: DataConfig, offsets: dict,
                 start_ray=None) -> dict:
    """A split's rows in groups of data.rows_per_shard, written in parallel Ray Data tasks when the split has
    PARALLEL_MIN_GROUPS groups or more and Ray is up (or start_ray starts it), else in the driver; then committed at
    once, so a killed build leaves no split behind (exactly once: a retried task rewrites its own group's files)."""
    import ray

    groups = [rows[k:k + d.rows_per_shard] for k in range(0, len(rows), d.rows_per_shard)] or [rows]
    staged = storage.staging(storage.join(root, split))
    kwargs = {"staged": staged, "labeled": split == "labeled", "offsets": offsets,
              "rows_per_shard": d.rows_per_shard, "target_mb": d.shard_mb}
    items = {"group": np.arange(len(groups)), "rows": [g.reshape(-1).tolist() for g in groups]}
    parallel = len(groups) >= PARALLEL_MIN_GROUPS and (ray.is_initialized() or start_ray is not None)
    if parallel and not ray.is_initialized():
        start_ray()
    try:
        if parallel:
            import ray.data

            # About 4 tasks per CPU, each writing a run of groups: a task per 256-row group spent more on its start
            # (and on fetching the sources' file list) than on its files.
            per_task = max(1, -(-len(groups) // (4 * int(ray.cluster_resources().get("CPU", 1)))))
            ds = ray.data.from_items([{"group": g, "rows": r} for g, r in zip(items["group"], items["rows"])],
                                     override_num_blocks=-(-len(groups) // per_task))
            done = ds.map_batches(write_group, batch_size=per_task, fn_kwargs={"sources": ray.put(sources), **kwargs})
            results = done.take_all()
        else:
            out = write_group(items, sources, **kwargs)
            results = [dict(zip(out, values)) for values in zip(*out.values())]
    except BaseException:
        storage.remove(staged)
        raise
    failed = [r["error"] for r in results if r["error"]]
    if failed:
        storage.remove(staged)
        raise SourceError(f"{split}: {failed[0]}" + (f" (and {len(failed) - 1} more shards failed)" if len(failed) > 1
                                                      else ""))
    return commit_split(staged, root, split, [{"rows": int(r["rows"]), "sha256": json.loads(r["sha256"])}
                                              for r in results])


def _per_class(labels: np.ndarray, idx: np.ndarray, C: int) -> list[int]:
    return np.bincount(labels[idx], minlength=C).tolist() if len(idx) else [0] * C


def _describe(d: DataConfig, plan: Plan) -> dict:
    ood = None
    if plan.ood is not None:
        side = f"{d.ood_image_size} px" if d.ood_image_size else "at the ID images' native side"
        ood = f"{d.ood_source}:{d.ood_path}" if d.ood_path else f"generated ({side})"
    test = (f"official: {d.test_path or d.source_path}" if plan.test is not None
            else f"carved: {d.test_per_class} per class from the training source")
    return {"train": f"{d.source}:{d.source_path}" if d.source_path else d.source, "test": test, "ood": ood}


def _complete_dataset(root: str, wanted: dict) -> dict | None:
    """dataset.json of a complete dataset at root built with the `wanted` protocol, else None (rebuild)."""
    try:
        info = read_dataset_info(root)
    except (FileNotFoundError, ValueError):
        return None
    if info.get("protocol") == wanted:
        log.info("dataset at %s is complete (dataset.json matches the protocol); not rebuilding", root)
        return info
    log.info("dataset at %s was built with another protocol; rebuilding", root)
    return None


def _write_splits(plan, cfg: Config, root: str, test_offset: int, start_ray=None) -> dict:
    """Every split of the plan as Parquet shards under root; what write_split reports of each."""
    sources = {TRAIN: plan.train, TEST: plan.test_source, OOD: plan.ood}
    offsets = {TRAIN: 0, TEST: test_offset, OOD: OOD_ID_OFFSET}
    written = {}
    for split, rows in _split_rows(plan, cfg.run.seed).items():
        t0 = time.time()
        written[split] = w = _write_split(sources, rows, root, split, cfg.data, offsets, start_ray)
        log.info("wrote %s: %d rows, %d shards, %.1f MB in %.1f s (%.0f rows/s)", split, w["rows"], w["shards"],
                 w["bytes"] / 2**20, time.time() - t0, w["rows"] / max(time.time() - t0, 1e-9))
    return written


def prepare_dataset(cfg: Config, force: bool = False, start_ray=None) -> dict:
    """Build the dataset dir at cfg.data_root unless a complete one with the same protocol is there. Splits of many
    shards are written in Ray Data tasks when Ray is up, or once `start_ray()` (if given) has started it."""
    d = cfg.data
    root = cfg.data_root
    if "://" not in root:
        root = str(storage.resolve(root)[1])
    wanted = protocol_record(cfg)
    info = None if force else _complete_dataset(root, wanted)
    if info is not None:
        return info

    plan = plan_splits(cfg)
    C = len(plan.train.class_names)
    train_labels = np.asarray(plan.train.labels)
    test_labels = np.asarray(plan.test_source.labels)
    counts = {"labeled": _per_class(train_labels, plan.labeled, C),
              "unlabeled": _per_class(train_labels, plan.unlabeled, C),
              "test": _per_class(test_labels, plan.test_idx, C)}
    log.info("prepare %s: %d classes; labeled %d (per class %d..%d), pool %d ID + %d OOD, test %d (%s), ood_test %d",
             root, C, len(plan.labeled), min(counts["labeled"]), max(counts["labeled"]), len(plan.unlabeled),
             len(plan.ood_pool), len(plan.test_idx), "official" if plan.test is not None else "carved",
             len(plan.ood_test))

    fs, base = storage.resolve(root)
    try:
        fs.create_dir(base, recursive=True)
        remove_dataset_info(root)  # from here on, an interrupted build leaves no dataset.json vouching for it
    except OSError as e:
        raise SourceError(f"data.root={root}: cannot write the dataset there ({e}); set data.root to a writable "
                          f"directory or URI") from e
    test_offset = TEST_ID_OFFSET if plan.test is not None else 0
    written = _write_splits(plan, cfg, root, test_offset, start_ray)
    for split in SPLITS:  # a split an earlier build wrote and this one does not (e.g. ood_test) must not linger
        if split not in written and split_exists(root, split):
            fs.delete_dir(f"{base}/{split}")

    info = {
        "schema_version": SCHEMA_VERSION,
        "class_names": list(plan.train.class_names),
        "counts": counts,
        "ood_counts": {"unlabeled": int(len(plan.ood_pool)), "ood_test": int(len(plan.ood_test))},
        "rows": {k: v["rows"] for k, v in written.items()},
        "shards": {k: v["shards"] for k, v in written.items()},
        "bytes": {k: v["bytes"] for k, v in written.items()},
        "protocol": wanted,
        "sources": _describe(d, plan),
        "id_offsets": {"test": test_offset, "ood": OOD_ID_OFFSET},
        "checksums": {f: h for v in written.values() for f, h in v["sha256"].items()},
    }
    storage.write_json(f"{root.rstrip('/')}/dataset.json", info)
    log.info("prepared %s: labeled %d, unlabeled %d (%d OOD), test %d, ood_test %d rows", root,
             info["rows"]["labeled"], info["rows"]["unlabeled"], len(plan.ood_pool), info["rows"]["test"],
             info["rows"].get("ood_test", 0))
    return info
