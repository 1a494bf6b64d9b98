"""`loft-dist run` with everything of a run in s3:// (a real S3 API server, the endpoint from run.s3_endpoint): the
dataset (data.root defaults to <run dir>/data), the run dir, Ray Train's
storage. While a first driver runs, a second one on the same run exits 2 naming the first and changes nothing; the
first is then SIGKILLed mid-run, and running the same command again takes its lease over and finishes with every
table holding each id exactly once, no staging, work or lease object left behind.

On a local disk the same guarantees are tested without a second full run: the lease's refusal and takeover in
tests/test_lease.py (both stores), a killed driver's takeover and exactly-once tables in
tests/faults/test_kill_driver.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from loft_dist import storage
from loft_dist.data.store import shard_paths
from loft_dist.storage import RunLayout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]
PHASES = ["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]


def _snapshot(root: str, server) -> dict:
    """Every file of the run with what would change if anyone wrote it (S3: ETag; local: mtime and size)."""
    if storage.is_uri(root):
        bucket, _, prefix = root[len("s3://"):].partition("/")
        pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(root).rglob("*") if p.is_file()}


def _ids(table: str) -> list[int]:
    return sorted(i for f in storage.committed_files(table)
                  for i in pq.read_table(storage.open_input(f), columns=["id"]).column("id").to_pylist())


def _completed(lay: RunLayout) -> list[str]:
    try:
        return storage.read_json(lay.state)["completed"]
    except Exception:  # not written yet, or mid-write on a local disk
        return []


def test_second_driver_is_refused_and_a_killed_driver_is_taken_over(tmp_path, s3_server):
    server = s3_server  # requested first: its fixture puts the credentials into this process's environment
    storage_path = f"s3://{server.bucket()}/runs"
    extra = [f"run.s3_endpoint={server.endpoint}"]
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"}  # run.s3_endpoint must be enough
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "loft_dist.cli", "run", str(REPO / "configs" / "tiny.yaml"),
           f"run.storage_path={storage_path}", "run.name=leased", "rounds.num_rounds=1", "train.epochs_per_round=2",
           "data.rows_per_shard=64", "run.object_store_mb=300", *extra]
    lay = RunLayout(storage.join(storage_path, "leased"))

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while "r0.score" not in _completed(lay):  # mid-run: Ray up, the pool's round-0 table committed
            assert first.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, first_log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGSTOP)  # frozen, so that any change to its files is the second driver's
        before = _snapshot(lay.root, server)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert _snapshot(lay.root, server) == before, "the refused driver changed the run's files"
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("loft-dist: error: run ") and "in use by another driver" in line, line
        assert f"pid {first.pid}" in line and "last heartbeat" in line, line
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have failed already (the asserts above say why)
            os.killpg(first.pid, signal.SIGKILL)  # SIGKILL reaches a stopped process too
        first.wait()

    third = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log[-4000:]
    assert "took over the lease" in log and re.search(r"resuming after r0\.(score|eval)", log), log[-4000:]
    assert _completed(lay) == PHASES
    data = lay.data
    pool = sorted(i for p in shard_paths(data, "unlabeled")
                  for i in pq.read_table(storage.open_input(p), columns=["id"]).column("id").to_pylist())
    test = sorted(i for p in shard_paths(data, "test")
                  for i in pq.read_table(storage.open_input(p), columns=["id"]).column("id").to_pylist())
    for r in (0, 1):
        assert _ids(lay.pseudo_labels(r)) == pool, f"round {r} pseudo-labels: not every pool id exactly once"
        assert _ids(lay.predictions(r, "test")) == test, f"round {r} predictions: not every test id exactly once"
    assert storage.is_committed(lay.checkpoint(1)) and storage.is_file(storage.join(lay.report, "report.md"))
    names = list(_snapshot(lay.root, server))
    left = [n for n in names if ".tmp-" in n or ".work" in n or n.endswith("lease.json")]
    assert left == [], f"left behind: {left[:10]}"
    assert not (tmp_path / "runs").exists()  # nothing of the run went to the local disk instead
