"""`ray job submit` of the tiny config to a real `ray start` cluster, through cluster/submit.sh as README §9 does it.

The cluster is the test session's shared head on 127.0.0.1 (tests/conftest.py `ray_cluster`, tests/local_ray_cluster.py),
with its own temp dir and ports, so the session's in-process Ray is untouched; it is stopped by process id (`ray stop`
would stop every Ray on the machine). The job API is served by the dashboard, which needs the `ray[default]` extra.
Every process of the cluster carries a fake secret in its environment (`ray_cluster.secret`), which must appear
nowhere in the run dir or the job's output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]
PHASES = ["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]
JOB_TIMEOUT_S = 1800  # a safety net for a hung job, not a timing assertion


def _ids(directory: Path) -> list[int]:
    return pq.read_table(sorted(str(p) for p in directory.glob("*.parquet")), columns=["id"]).column("id").to_pylist()


def test_ray_job_submit_runs_the_tiny_config_to_a_report(tmp_path, ray_cluster):
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip('the Ray job API needs the dashboard: pip install "ray[default]" (the dev extra lists it)')
    cluster = ray_cluster
    secret = cluster.secret  # in the environment of every process of the cluster
    env = cluster.env(RAY_ADDRESS=cluster.dashboard_url)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's `ray`
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        # No ood_test split: one scoring job less per evaluation; this test is about the job path, not OOD metrics.
        done = subprocess.run(
            ["bash", str(REPO / "cluster" / "submit.sh"), "configs/tiny.yaml", f"run.storage_path={tmp_path}",
             "run.name=job", "rounds.num_rounds=1", "train.epochs_per_round=1", "data.ood_test=0"],
            stdout=out, stderr=subprocess.STDOUT, env=env, timeout=JOB_TIMEOUT_S)
    output = log.read_text()
    assert done.returncode == 0, output[-4000:] + cluster.diagnostics()
    submission = re.search(r"Job '(raysubmit_\w+)' succeeded", output)
    assert submission, output[-4000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(cluster.dashboard_url).get_job_status(submission.group(1)) == JobStatus.SUCCEEDED
    # The driver joined this cluster (run.ray_address unset: RAY_ADDRESS from the job), not a Ray of its own.
    joined = re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{cluster.port}\b", output)
    assert joined, output[-4000:]

    run_dir = tmp_path / "job"
    assert json.loads((run_dir / "state.json").read_text())["completed"] == PHASES
    pool = sorted(_ids(run_dir / "data" / "unlabeled"))
    for r in (0, 1):
        table = run_dir / "rounds" / f"r{r}" / "pseudo_labels"
        ids = _ids(table)
        assert len(ids) == len(set(ids)) and sorted(ids) == pool, f"round {r}: not one row per pool image"
        assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
    ckpt = run_dir / "rounds" / "r1" / "checkpoint"
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((ckpt / "train_state.json").read_text())["epoch"] == 0
    assert 0.0 <= json.loads((run_dir / "rounds" / "r1" / "metrics.json").read_text())["test"]["accuracy"] <= 1.0
    assert "zero-shot" in (run_dir / "report" / "report.md").read_text()
    leaks = [str(p) for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaks and secret not in output, \
        f"the cluster's AWS_SECRET_ACCESS_KEY was written to {leaks or 'the log'}"
