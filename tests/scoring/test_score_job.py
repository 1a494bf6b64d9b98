"""The standalone scoring job: an actor pool over a large generated pool, exactly one row per image, resumable."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loft_dist.config import load_config
from loft_dist.data.store import IMAGE_SCHEMA
from loft_dist.scoring.job import run_score_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
from faultlib import Watcher, traced_scorer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CLASSES = ["zero", "one", "two"]


def _write_pool(root: Path, n: int, shards: int, first_id: int = 13) -> list[int]:
    """n rows in `shards` Parquet files; 64 distinct small PNGs reused (decoding still runs per row)."""
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    root.mkdir(parents=True)
    ids = (np.arange(n, dtype=np.int64) * 7919 + first_id)  # non-contiguous, like real ids
    for s, part in enumerate(np.array_split(np.arange(n), shards)):
        table = pa.table({"id": ids[part], "image": [pngs[i % 64] for i in part],
                          "label": np.full(len(part), -1, np.int32), "true_label": np.full(len(part), -1, np.int32),
                          "source": ["generated"] * len(part)}, schema=IMAGE_SCHEMA)
        pq.write_table(table, root / f"part-{s:05d}.parquet")
    return ids.tolist()


def _cfg(tmp: Path, pool: Path, out: Path, *extra: str):
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    (data / "dataset.json").write_text(json.dumps({"schema_version": 1, "class_names": CLASSES}))
    return load_config(None, [f"data.root={data}", f"scoring.input={pool}", f"scoring.output={out}",
                              "scoring.batch_size=1024", *extra])


def _ids(table: Path) -> list[int]:
    return pq.read_table(sorted(table.glob("*.parquet")), columns=["id"]).column("id").to_pylist()


def test_pool_of_50000_images_with_two_actors_writes_exactly_one_row_each(tmp_path, ray_session):
    ids = _write_pool(tmp_path / "pool", 50_000, shards=16)
    out = tmp_path / "scored"
    cfg = _cfg(tmp_path, tmp_path / "pool", out, "scoring.min_actors=2", "scoring.max_actors=2",
               "scoring.rows_per_chunk=25000")
    # Each actor's first batch waits until both actors hold one: on a slow machine the actor that starts first could
    # otherwise score the whole pool before the second is up, and "two actors" would be a config value, not a fact.
    with traced_scorer(tmp_path / "trace", hold=True) as trace:
        def release_once_two_actors_hold_a_batch() -> bool:
            if len({b["pid"] for b in trace.batches()}) < 2:
                return False
            trace.release()
            return True

        watcher = Watcher(release_once_two_actors_hold_a_batch, interval=0.05)
        watcher.start()
        try:
            assert run_score_job(cfg) == 50_000
        finally:
            watcher.result()
        batches = trace.batches()
    rows_by_pid = {pid: sum(len(b["ids"]) for b in batches if b["pid"] == pid and b["done_at"] is not None)
                   for pid in {b["pid"] for b in batches}}
    assert len(rows_by_pid) == 2 and all(rows_by_pid.values()), f"rows scored per actor process: {rows_by_pid}"
    assert {i for b in batches for i in b["ids"]} == set(ids)  # the trace saw every batch
    got = _ids(out)
    assert len(got) == len(set(got)) == 50_000 and sorted(got) == sorted(ids)
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 50_000
    t = pq.read_table(sorted(out.glob("*.parquet")), columns=["decision", "probs"])
    assert set(t.column("decision").to_pylist()) <= {"hard", "soft", "rejected", "ood"}
    assert len(t.column("probs")[0].as_py()) == len(CLASSES)


def test_killed_scoring_job_resumes_without_duplicate_or_missing_id(tmp_path, ray_session):
    # Two shards of 4,000 rows, one row group each, in chunks of 1,000 rows: resume is bounded in rows, not shards.
    ids = _write_pool(tmp_path / "pool", 8_000, shards=2)  # 8 chunks: never all committed between two polls
    out = tmp_path / "scored"
    overrides = [f"data.root={tmp_path / 'data'}", f"scoring.input={tmp_path / 'pool'}", f"scoring.output={out}",
                 "scoring.rows_per_chunk=1000", "scoring.batch_size=256", "run.num_cpus=4",
                 "run.object_store_mb=300"]
    _cfg(tmp_path, tmp_path / "pool", out)  # writes data/dataset.json
    script = textwrap.dedent(f"""
        from loft_dist.config import load_config
        from loft_dist.scoring.job import run_score_job
        run_score_job(load_config(None, {overrides!r}))
    """)
    log = tmp_path / "job.log"
    # The job's driver joins the session's Ray, as a job on a running cluster does: a Ray of its own would be a third
    # on the machine, and under the suite's load its raylet has missed Ray's fixed 30 s registration wait.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    work = out.with_name(f".{out.name}.work")
    deadline = time.time() + 300
    # Chunks commit as their last row arrives, in one streaming execution: kill once two of the eight are in.
    while len(list(work.glob("chunk-*/_SUCCESS"))) < 2:
        assert proc.poll() is None, f"the scoring job ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"the scoring job made no progress:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_SUCCESS").exists()
    first = {f"{f.parent.name}-{f.name}": f.stat().st_mtime_ns for f in work.glob("chunk-*/*.parquet")
             if (f.parent / "_SUCCESS").is_file()}
    assert first
    committed = [json.loads(m.read_text())["rows"] for m in work.glob("chunk-*/_SUCCESS")]
    assert committed and all(n == 1000 for n in committed), committed  # what a kill can lose: one chunk of rows

    cfg = load_config(None, overrides)
    assert run_score_job(cfg) == 8_000
    got = _ids(out)
    assert len(got) == len(set(got)) == 8_000 and sorted(got) == sorted(ids)
    kept = {f.name: f.stat().st_mtime_ns for f in out.glob("chunk-*.parquet") if f.name in first}
    assert kept == first, "a chunk committed before the kill must not be scored again"
    assert not work.exists()


def test_zero_shot_labels_an_image_folder_with_class_names_from_the_config(tmp_path, ray_session):
    """No prepared dataset, no checkpoint: the classes come from scoring.class_names, as a list or a file."""
    from loft_dist.data.pseudo_labels import read_columns, table_rows

    folder = tmp_path / "raw"
    rng = np.random.default_rng(1)
    for i in range(40):
        (folder / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"d{i % 3}" / f"{i}.png")
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\n  dog \nbird\nfish\n")
    for k, given in enumerate(("[cat,dog,bird,fish]", str(names))):
        out = tmp_path / f"labels{k}"
        cfg = load_config(None, [f"data.root={tmp_path / 'no_dataset'}", f"scoring.input={folder}",
                                 f"scoring.output={out}", f"scoring.class_names={given}"])
        assert run_score_job(cfg) == 40 == table_rows(out)
        pred = read_columns(out, ["pred"])["pred"]
        assert set(pred.tolist()) <= {0, 1, 2, 3} and len(pred) == 40
    from loft_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="only for zero-shot scoring"):
        load_config(None, ["scoring.class_names=[a,b]", "scoring.checkpoint=/ckpt"])
    (tmp_path / "one.txt").write_text("cat\ncat\n")
    with pytest.raises(ConfigError, match=r"repeated: \['cat'\]"):
        run_score_job(load_config(None, [f"scoring.input={folder}", f"scoring.output={tmp_path / 'x'}",
                                         f"scoring.class_names={tmp_path / 'one.txt'}"]))


def test_two_tables_are_scored_by_one_execution_each_row_into_its_own_table(tmp_path, ray_session, monkeypatch):
    """score_tables (evaluation's test + ood_test) runs one Ray Data execution, one actor pool, for every table; job
    chunk numbers span the tables, and each chunk still commits into its own table's work dir."""
    import loft_dist.scoring.job as job

    # pool b's ids differ from a's: a row committed into the other table shows up as a wrong id
    ids = {"a": _write_pool(tmp_path / "a", 700, 3), "b": _write_pool(tmp_path / "b", 300, 2, first_id=14)}
    cfg = _cfg(tmp_path, tmp_path / "a", tmp_path / "unused", "scoring.rows_per_chunk=256", "scoring.batch_size=64")
    executions = []
    real = job._score_chunks
    monkeypatch.setattr(job, "_score_chunks", lambda cfg, todo, *a: executions.append(
        sorted((t.label, i) for t, i in todo.values())) or real(cfg, todo, *a))
    outs = {k: tmp_path / "out" / k for k in ids}
    paths = {k: [str(p) for p in sorted((tmp_path / k).glob("*.parquet"))] for k in ids}
    inputs = {k: (paths[k], str(outs[k]), "zero_shot") for k in ids}
    counts = job.score_tables(cfg, inputs, class_names=CLASSES)
    assert counts == {"a": 700, "b": 300}
    assert executions == [[("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]]
    for k in ids:
        assert sorted(_ids(outs[k])) == sorted(ids[k])
        assert not (outs[k].parent / f".{k}.work").exists()
    assert job.score_tables(cfg, inputs, class_names=CLASSES) == counts and len(executions) == 1  # nothing to do
