"""The Parquet image store: size-targeted zstd shards, atomic commits, filesystem URIs, streaming reads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from loft_dist.data import store
from loft_dist import storage
from loft_dist.data.store import count_rows, iter_table_rows, read_dataset_info, read_split, shard_paths, write_split


def rows(n: int, image_bytes: int = 10_000, seed: int = 0, fail_at: int | None = None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("source went away")
        # Random bytes do not compress, like the PNG/JPEG bytes of real images.
        yield {"id": i, "image": rng.bytes(image_bytes), "label": -1, "true_label": i % 3, "source": f"gen:{i}"}


def test_shards_are_cut_by_size_and_capped_by_rows(tmp_path):
    out = write_split(rows(40), str(tmp_path), "unlabeled", rows_per_shard=1000, target_mb=0.05)
    # 0.05 MB = 52,428 bytes; 10 kB images + per-row overhead → 5 rows per shard.
    assert out["rows"] == 40 and out["shards"] == 8
    files = shard_paths(str(tmp_path), "unlabeled")
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [5] * 8
    assert all(0.04 * 2**20 < (tmp_path / "unlabeled" / f.split("/")[-1]).stat().st_size < 0.06 * 2**20 for f in files)
    meta = pq.ParquetFile(files[0]).metadata
    assert meta.row_group(0).column(1).compression == "ZSTD"
    assert pq.ParquetFile(files[0]).schema_arrow == store.IMAGE_SCHEMA

    capped = write_split(rows(40), str(tmp_path), "labeled", rows_per_shard=3, target_mb=128)
    assert capped["shards"] == 14 and count_rows(shard_paths(str(tmp_path), "labeled")) == 40
    assert [r["id"] for r in iter_table_rows(shard_paths(str(tmp_path), "labeled"), ["id"])] == list(range(40))


def test_large_shards_are_written_in_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROW_GROUP_MB", 0.02)  # 20 kB row groups inside a 1 MB shard
    write_split(rows(30), str(tmp_path), "test", rows_per_shard=1000, target_mb=1)
    (f,) = shard_paths(str(tmp_path), "test")
    meta = pq.ParquetFile(f).metadata
    assert meta.num_row_groups == 10 and all(meta.row_group(g).num_rows == 3 for g in range(10))


def test_checksums_match_the_files_and_empty_splits_have_a_schema(tmp_path):
    import hashlib

    out = write_split(rows(7), str(tmp_path), "test", rows_per_shard=3)
    for name, digest in out["sha256"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    empty = write_split(iter(()), str(tmp_path), "ood_test", rows_per_shard=3)
    assert empty["rows"] == 0 and empty["shards"] == 1
    assert pq.read_table(shard_paths(str(tmp_path), "ood_test")[0]).schema == store.IMAGE_SCHEMA


def test_a_failed_write_leaves_the_previous_split_and_no_temp_files(tmp_path):
    write_split(rows(6), str(tmp_path), "labeled", rows_per_shard=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "labeled").iterdir()}
    with pytest.raises(RuntimeError, match="source went away"):
        write_split(rows(50, seed=1, fail_at=30), str(tmp_path), "labeled", rows_per_shard=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "labeled").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labeled"]


def test_file_uri_roots(tmp_path):
    root = f"file://{tmp_path}/ds"
    out = write_split(rows(9), root, "unlabeled", rows_per_shard=4)
    assert out["shards"] == 3 and (tmp_path / "ds" / "unlabeled" / "part-00002.parquet").is_file()
    storage.write_json(f"{root}/dataset.json", {"schema_version": store.SCHEMA_VERSION, "rows": {"unlabeled": 9}})
    assert read_dataset_info(root)["rows"] == {"unlabeled": 9}
    paths = shard_paths(root, "unlabeled")
    assert paths[0] == f"{tmp_path}/ds/unlabeled/part-00000.parquet"  # local: plain paths, which every reader takes
    assert count_rows(paths) == 9 and store.split_exists(root, "unlabeled") and not store.split_exists(root, "test")
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        shard_paths(root, "test")
    with pytest.raises(FileNotFoundError, match="run `loft-dist prepare"):
        read_dataset_info(f"file://{tmp_path}/nowhere")


def test_object_store_commit_moves_files_one_by_one(s3_server):
    """On S3 (no rename) a split is staged, moved file by file and marked; a rebuild replaces it entirely."""
    root = f"s3://{s3_server.bucket()}/ds"
    write_split(rows(9), root, "unlabeled", rows_per_shard=4)
    out = write_split(rows(5, seed=2), root, "unlabeled", rows_per_shard=4)  # replaces the first build entirely
    assert storage.listdir(f"{root}/unlabeled") == ["_SUCCESS", "part-00000.parquet", "part-00001.parquet"]
    assert out["rows"] == 5 and storage.listdir(root) == ["unlabeled"]  # no staging left behind
    assert shard_paths(root, "unlabeled")[0] == f"{root}/unlabeled/part-00000.parquet"  # URIs for remote roots
    assert count_rows(shard_paths(root, "unlabeled")) == 5
    storage.write_json(f"{root}/dataset.json", {"schema_version": store.SCHEMA_VERSION})
    assert read_dataset_info(root) == {"schema_version": store.SCHEMA_VERSION}


def test_prepare_writes_to_a_uri_and_ray_streams_it_back(small_cifar100, make_config, tmp_path, ray_session):
    from loft_dist.data.prepare import prepare_dataset

    root = f"file://{tmp_path}/uri_ds"
    cfg = make_config(root, source="cifar100", source_path=small_cifar100, n1=12, gamma_l=4, m1=16, gamma_u=4,
                      ood_ratio=0.25, ood_test=0, ood_image_size=16, rows_per_shard=16)
    info = prepare_dataset(cfg)
    assert info == read_dataset_info(root)
    ds = read_split(root, "unlabeled", columns=["id", "true_label"])
    seen = []
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert len(batch["id"]) <= 8
        seen.extend(batch["id"].tolist())
    assert len(seen) == info["rows"]["unlabeled"] and len(set(seen)) == len(seen)
    assert sorted(seen) == sorted(r["id"] for r in iter_table_rows(shard_paths(root, "unlabeled"), ["id"]))
