"""`loft-dist score` from and into s3:// on a real S3 API server, configured as a user would: credentials from the
environment, the endpoint from run.s3_endpoint; and one job per output (the lease, on S3's conditional writes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loft_dist import storage
from loft_dist.lease import Lease

sys.path.insert(0, os.path.dirname(__file__))
from test_score_job import CLASSES, _write_pool  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL_S3"}  # run.s3_endpoint must be enough
    env.update(RAY_AUTH_MODE="disabled")
    command, *overrides = args
    return subprocess.run([sys.executable, "-m", "loft_dist.cli", command, TINY, *overrides,
                           f"run.s3_endpoint={server.endpoint}"],
                          capture_output=True, text=True, env=env, timeout=540)


def test_score_reads_a_pool_from_s3_and_commits_its_table_there(tmp_path, s3_server):
    bucket = s3_server.bucket()
    ids = _write_pool(tmp_path / "pool", 3_000, shards=6)
    storage.upload_dir(tmp_path / "pool", f"s3://{bucket}/pool")
    storage.write_json(f"s3://{bucket}/data/dataset.json", {"schema_version": 1, "class_names": CLASSES})
    out = f"s3://{bucket}/scored/pool"
    run = _cli(s3_server, "score", f"data.root=s3://{bucket}/data", f"scoring.input=s3://{bucket}/pool",
               f"scoring.output={out}", "scoring.batch_size=500", "scoring.rows_per_chunk=1200", "run.num_cpus=2",
               "run.object_store_mb=300")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"done: 3000 rows in {out}" in run.stdout
    record = storage.committed(out)
    assert record["rows"] == 3_000
    assert {f.split("-part-")[0] for f in record["files"]} == {"chunk-00000", "chunk-00001", "chunk-00002"}
    got = pa.concat_tables([pq.read_table(storage.open_input(f), columns=["id", "probs"])
                            for f in storage.committed_files(out)])
    assert sorted(got.column("id").to_pylist()) == sorted(ids)
    assert all(len(p) == len(CLASSES) for p in got.column("probs").to_pylist()[:10])
    keys = s3_server.keys(bucket)
    # (keys ending in "/" are the empty directory markers pyarrow keeps for a prefix it emptied)
    leftovers = [k for k in keys if k.startswith("scored/") and not k.startswith("scored/pool/") and k[-1] != "/"]
    assert leftovers == [], f"work, staging or lease objects left behind: {leftovers}"

    # A second job into the same output while a live driver holds it: one line, nothing written.
    with Lease(storage.join(f"s3://{bucket}", "scored", ".pool.lease.json"), "scoring.output", 600):
        before = s3_server.keys(bucket)
        busy = _cli(s3_server, "score", f"data.root=s3://{bucket}/data", f"scoring.input=s3://{bucket}/pool",
                    f"scoring.output={out}")
        assert s3_server.keys(bucket) == before
    assert busy.returncode == 2, busy.stderr[-2000:]
    line = busy.stderr.strip().splitlines()[-1]
    assert line.startswith("loft-dist: error: scoring.output") and "in use by another driver" in line
    assert f"pid {os.getpid()}" in line
