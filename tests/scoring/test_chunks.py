"""How a scoring job cuts its input into chunks (resume granularity, in rows) and read units (tasks): no Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loft_dist.scoring.job import INPUT_COLUMNS, plan_chunks, read_unit


def _shard(path, ids, row_group_size=None):
    n = len(ids)
    pq.write_table(pa.table({"id": np.asarray(ids, np.int64), "image": [b"not an image"] * n,
                             "true_label": np.full(n, -1, np.int32)}), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def shards(tmp_path):
    """A big shard in one row group, one in row groups of 300, an empty one, a small one: 2,500 + 700 + 0 + 50 rows."""
    return [_shard(tmp_path / "a.parquet", range(0, 2500)),
            _shard(tmp_path / "b.parquet", range(2500, 3200), row_group_size=300),
            _shard(tmp_path / "c.parquet", []),
            _shard(tmp_path / "d.parquet", range(3200, 3250))]


def _rows(unit):
    return sum(stop - start for _, _, start, stop in unit)


@pytest.mark.parametrize("rows_per_chunk, unit_rows", [(1000, 256), (1000, 1000), (999, 4096), (0, 512)])
def test_chunks_hold_at_most_rows_per_chunk_and_cover_every_row_once_in_order(shards, rows_per_chunk, unit_rows):
    chunks = plan_chunks(shards, rows_per_chunk, unit_rows)
    sizes = [sum(_rows(u) for u in c) for c in chunks]
    cap = rows_per_chunk or 3250
    assert sizes == [cap] * (3250 // cap) + ([3250 % cap] if 3250 % cap else [])
    assert all(0 < _rows(u) <= unit_rows for c in chunks for u in c)
    slices = [s for c in chunks for u in c for s in u]  # every row exactly once, in the shards' order
    covered = [(path, rg, r) for path, rg, start, stop in slices for r in range(start, stop)]
    assert len(covered) == len(set(covered)) == 3250
    assert [p for p, *_ in slices] == sorted(p for p, *_ in slices)
    meta = {p: pq.ParquetFile(p).metadata for p in shards}
    assert all(stop <= meta[p].row_group(rg).num_rows for p, rg, _, stop in slices)


def test_chunk_boundaries_do_not_depend_on_the_unit_size(shards):
    """A resumed job may run with another batch size (so another unit size): its committed chunks must still match."""
    def rows_of(chunks):
        return [[(p, rg, r) for u in c for p, rg, a, b in u for r in range(a, b)] for c in chunks]

    assert rows_of(plan_chunks(shards, 700, 64)) == rows_of(plan_chunks(shards, 700, 5000))


def test_a_read_unit_returns_exactly_its_slices_with_shard_and_targets(shards):
    unit = [(shards[0], 0, 2400, 2500), (shards[1], 1, 0, 10)]
    targets = json.dumps([[7, "zero_shot"], [12, "teacher"]])
    out = read_unit({"slices": np.array([json.dumps(unit)], dtype=object),
                     "targets": np.array([targets], dtype=object)}, "clean", 16)
    assert out["id"].tolist() == list(range(2400, 2500)) + list(range(2800, 2810))
    assert out["path"].tolist() == [shards[0]] * 100 + [shards[1]] * 10
    assert out["targets"].tolist() == [targets] * 110  # every table (chunk, scorer mode) the row goes into
    assert out["image"].shape == (110, 16, 16, 3) and out["image"].dtype == np.uint8
    assert all(e for e in out["error"])  # undecodable bytes are reported per row, not dropped
    assert set(INPUT_COLUMNS) <= set(out)


def test_tables_of_the_same_shards_read_each_chunk_once_for_every_table_that_needs_it(shards, tmp_path):
    """Round 0's pool (zero-shot) and round 1's (its teacher is the same model): one read + decode per chunk, scored
    into each table whose chunk is not committed yet (a resumed job: only the table that lacks it)."""
    from loft_dist.scoring.job import _read_units, _Table

    def table(label, mode, paths):
        t = _Table(label, paths, f"/runs/{label}", mode)
        t.chunks = plan_chunks(paths, 1000, 256)
        return t

    r0, r1 = table("pool r0", "zero_shot", shards), table("pool r1", "teacher", shards)
    test = table("test", "zero_shot", [_shard(tmp_path / "test.parquet", range(5000, 5100))])
    n = len(r0.chunks)
    # job-wide chunk numbers, table by table as score_tables numbers them; r0's chunk 1 committed before (a resume)
    todo = {c: (r0, i) for c, i in enumerate(i for i in range(n) if i != 1)}
    todo.update({len(todo): (test, 0)})
    todo.update({len(todo) + i: (r1, i) for i in range(n)})
    units = _read_units(todo)
    read = [(u["slices"], u["targets"]) for u in units]
    assert len({s for s, _ in read}) == len(read), "a slice of the shards was read twice"
    number = {(id(t), i): c for c, (t, i) in todo.items()}
    want = [(json.dumps(u), ([[number[id(r0), i], "zero_shot"]] if i != 1 else []) + [[number[id(r1), i], "teacher"]])
            for i in range(n) for u in r0.chunks[i]] + \
           [(json.dumps(u), [[number[id(test), 0], "zero_shot"]]) for u in test.chunks[0]]
    assert sorted((s, json.loads(t)) for s, t in read) == sorted(want)
