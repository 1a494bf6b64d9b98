"""Prepare in Ray Data tasks: every split of many shards is read, encoded and written by tasks, and the dataset is
byte for byte the one the driver writes alone; a task's source error is the same one-line error, nothing committed."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from loft_dist import storage
from loft_dist.data import prepare
from loft_dist.data.prepare import TRAIN, prepare_dataset
from loft_dist.data.sources import SourceError, read_image_folder
from loft_dist.data.store import shard_paths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _config(make_config, root: str, tree: dict):
    return make_config(root, source="imagefolder", source_path=tree["train"], test_path=tree["test"],
                       protocol="percent", labeled_percent=20, ood_source="imagefolder", ood_path=tree["ood"],
                       ood_count=10, ood_test=2, rows_per_shard=4)


def test_tasks_write_the_same_dataset_as_the_driver(ray_session, image_tree, make_config, monkeypatch):
    import ray.data

    with monkeypatch.context() as m:  # the driver alone: no split is big enough for tasks
        m.setattr(prepare, "PARALLEL_MIN_GROUPS", 10**9)
        serial = prepare_dataset(_config(make_config, "serial", image_tree))
    calls = []
    from_items = ray.data.from_items
    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: calls.append(len(items)) or from_items(items, **kw))
    cfg = _config(make_config, "parallel", image_tree)
    parallel = prepare_dataset(cfg)
    groups = {split: -(-n // 4) for split, n in parallel["rows"].items()}  # data.rows_per_shard=4
    assert groups["labeled"] >= 4 and groups["unlabeled"] >= 4 and groups["ood_test"] < 4  # both paths are taken
    assert calls == [g for g in groups.values() if g >= prepare.PARALLEL_MIN_GROUPS]  # one task per group
    assert parallel["rows"] == serial["rows"] and parallel["counts"] == serial["counts"]
    assert parallel["checksums"] == serial["checksums"]  # same shards, same names, same bytes
    for split in parallel["rows"]:
        ids = pq.read_table(shard_paths(cfg.data_root, split), columns=["id"]).column("id").to_numpy()
        assert len(ids) == len(set(ids.tolist())) == parallel["rows"][split]  # every row exactly once
    assert not [n for n in storage.listdir(cfg.data_root) if ".tmp-" in n]


def test_a_source_error_in_a_task_is_one_line_and_commits_nothing(ray_session, image_tree, tmp_path):
    source = read_image_folder(image_tree["train"])
    gone = storage.name(source.origin(7))
    (image_tree["train"] / "ant" / gone).unlink()  # listed, then removed before its task reads it
    rows = np.stack([np.full(len(source), TRAIN), np.arange(len(source))], axis=1)
    cfg_data = type("D", (), {"rows_per_shard": 4, "shard_mb": 128.0})()
    with pytest.raises(SourceError, match=rf"^labeled: image file .*{gone} no longer exists") as e:
        prepare._write_split({TRAIN: source}, rows, str(tmp_path / "ds"), "labeled", cfg_data, {TRAIN: 0})
    assert "\n" not in str(e.value)
    assert storage.listdir(str(tmp_path / "ds")) == []  # neither the split nor its staging dir
