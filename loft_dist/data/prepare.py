"""`loft-dist prepare`: a source + the LT / open-world protocol → the dataset dir of DESIGN §3."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from loft_dist.config import Config
from loft_dist.data import protocol
from loft_dist.data.store import SCHEMA_VERSION, read_dataset_info, write_json_atomic, write_split

log = logging.getLogger(__name__)
OOD_ID_OFFSET = 1 << 40  # OOD ids live apart from the ID source's indices, so ids stay stable and unique


def load_sources(cfg: Config):
    """(ID source, OOD source factory) for data.source."""
    from loft_dist.data import embedded

    d = cfg.data
    if d.source == "embedded":
        return embedded.digits_source(), embedded.ood_source
    from loft_dist.data import sources

    if d.source in ("cifar10", "cifar100"):
        return sources.read_cifar(d.source_path, split="train", variant=d.source), embedded.ood_source
    if d.source == "imagefolder":
        return sources.read_image_folder(d.source_path), embedded.ood_source
    return sources.read_manifest(d.source_path), embedded.ood_source


def _rows(src, indices, labeled: bool, id_offset: int = 0):
    for i in indices:
        i = int(i)
        true = int(src.labels[i])
        yield {"id": id_offset + i, "image": src.encoded(i), "label": true if labeled else -1,
               "true_label": true, "source": src.origin(i)}


def prepare_dataset(cfg: Config, force: bool = False) -> dict:
    """Build the dataset dir at cfg.data_root unless a complete one with the same protocol is there."""
    d, root = cfg.data, str(Path(cfg.data_root).resolve())
    wanted = {"source": d.source, "source_path": d.source_path, "n1": d.n1, "gamma_l": d.gamma_l, "m1": d.m1,
              "gamma_u": d.gamma_u, "unlabeled_dist": d.unlabeled_dist,
              "labeled_in_unlabeled": d.labeled_in_unlabeled, "test_per_class": d.test_per_class,
              "ood_ratio": d.ood_ratio, "ood_test": d.ood_test, "seed": cfg.run.seed}
    if not force and (Path(root) / "dataset.json").is_file():
        info = read_dataset_info(root)
        if info["protocol"] == wanted:
            log.info("dataset at %s is complete (dataset.json matches the protocol); not rebuilding", root)
            return info
        log.info("dataset at %s was built with another protocol; rebuilding", root)

    src, make_ood = load_sources(cfg)
    C = len(src.class_names)
    n = protocol.long_tail_counts(d.n1, d.gamma_l, C)
    m = protocol.unlabeled_counts(d.m1, d.gamma_u, C, d.unlabeled_dist)
    idx = protocol.split_long_tailed(np.asarray(src.labels), n, m, d.test_per_class, d.labeled_in_unlabeled,
                                     cfg.run.seed)
    n_ood = int(round(d.ood_ratio * len(idx["unlabeled"])))
    ood = make_ood(n_ood + d.ood_test, seed=cfg.run.seed + 1, size=d.image_size)
    # OOD rows are interleaved into the pool in a seeded order so no shard is all-OOD.
    order = np.random.default_rng(cfg.run.seed + 2).permutation(len(idx["unlabeled"]) + n_ood)

    def pool_rows():
        id_rows = list(idx["unlabeled"])
        for k in order:
            if k < len(id_rows):
                yield from _rows(src, [id_rows[k]], labeled=False)
            else:
                yield from _rows(ood, [k - len(id_rows)], labeled=False, id_offset=OOD_ID_OFFSET)

    Path(root).mkdir(parents=True, exist_ok=True)
    written = {
        "labeled": write_split(_rows(src, idx["labeled"], labeled=True), root, "labeled", d.rows_per_shard),
        "unlabeled": write_split(pool_rows(), root, "unlabeled", d.rows_per_shard),
        "test": write_split(_rows(src, idx["test"], labeled=False), root, "test", d.rows_per_shard),
    }
    if d.ood_test:
        written["ood_test"] = write_split(_rows(ood, range(n_ood, n_ood + d.ood_test), labeled=False,
                                                id_offset=OOD_ID_OFFSET), root, "ood_test", d.rows_per_shard)
    labels = np.asarray(src.labels)

    def per_class(ix):
        return np.bincount(labels[ix], minlength=C).tolist() if len(ix) else [0] * C

    info = {
        "schema_version": SCHEMA_VERSION,
        "class_names": list(src.class_names),
        "counts": {
            "labeled": per_class(idx["labeled"]),
            "unlabeled": per_class(idx["unlabeled"]),
            "test": per_class(idx["test"]),
        },
        "ood_counts": {"unlabeled": n_ood, "ood_test": d.ood_test},
        "rows": {k: v["rows"] for k, v in written.items()},
        "protocol": wanted,
        "checksums": {f: h for v in written.values() for f, h in v["sha256"].items()},
    }
    write_json_atomic(Path(root) / "dataset.json", info)
    log.info("prepared %s: labeled %d, unlabeled %d (%d OOD), test %d, ood_test %d rows", root,
             info["rows"]["labeled"], info["rows"]["unlabeled"], n_ood, info["rows"]["test"], d.ood_test)
    return info
