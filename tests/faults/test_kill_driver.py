"""SIGKILL the driver (`loft-dist run` on a `ray start` cluster) mid-round, twice, and run the same command again:
killed while scoring the pool (a chunk of round 1's table committed: round 0's job writes it, the zero-shot model
is round 1's teacher), then while training (one checkpoint reported). Each rerun
resumes after the last completed phase ("resuming after …"), keeps the committed scoring chunk, continues
training from Ray Train's last checkpoint in the run dir (its adapter, head and optimizer state restored exactly:
resume_checks.check_restores), and the final tables hold every id exactly once.

The cluster (the test session's shared `ray start` head, tests/conftest.py `ray_cluster`) outlives its drivers, as
on KubeRay: a dead driver's actors and workers are cleaned up by Ray, and the resubmission finds the run dir where the
first one left it. The driver's environment carries a fake secret, and the cluster's processes another: neither may
appear in the run dir or the driver's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from faultlib import DATA_OVERRIDES, TINY, completed, split_ids, table_ids
from resume_checks import check_restores, registered_epochs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
LOFT_DIST = str(Path(sys.executable).with_name("loft-dist"))
EPOCHS = 3
PHASES = ["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]
DRIVER_TIMEOUT_S = 1800  # a safety net for a hung driver; 2-core machines shared with other jobs are slow


def _drive(cmd: list[str], env: dict, log: Path, kill_when: Callable[[], bool] | None = None) -> str:
    """Run the driver until it exits ("exited <rc>") or, once `kill_when()` holds, SIGKILL it ("killed")."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + DRIVER_TIMEOUT_S
    try:
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                proc.kill()
                proc.wait()
                return "killed"
            if time.monotonic() > deadline:
                raise TimeoutError(f"driver still running after {DRIVER_TIMEOUT_S} s; log: {log}")
            time.sleep(0.02)
        return f"exited {proc.returncode}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_the_driver_mid_round_and_run_it_again(tmp_path, prepared_root, ray_cluster):
    cluster = ray_cluster
    name = "kill_driver"
    run_dir = tmp_path / name
    secret = f"not-a-real-secret-{uuid.uuid4().hex}"
    cmd = [LOFT_DIST, "run", TINY, f"run.storage_path={tmp_path}", f"run.name={name}", f"data.root={prepared_root}",
           *DATA_OVERRIDES, "rounds.num_rounds=1", f"train.epochs_per_round={EPOCHS}", "train.checkpoint_every=1",
           f"train.num_to_keep={EPOCHS + 2}",  # keep every checkpoint, to see which epochs were reported
           # small chunks and batches: chunks commit one by one while the rest is still scored (the job streams
           # every chunk in one execution, so a pool this small leaves a short window to kill in)
           "scoring.rows_per_chunk=64", "scoring.batch_size=8", f"run.ray_address={cluster.gcs_address}"]
    env = cluster.env(AWS_SECRET_ACCESS_KEY=secret, DS_ACCELERATOR="cpu")
    r1 = run_dir / "rounds" / "r1"
    work = r1 / ".pseudo_labels.work"
    trial = run_dir / "ray_train" / "r1"
    logs = [tmp_path / f"driver{i}.log" for i in range(3)]

    def scoring_chunk_committed() -> bool:
        return any(work.glob("chunk-*/_SUCCESS")) and "r0.score" not in completed(run_dir)

    outcome = _drive(cmd, env, logs[0], kill_when=scoring_chunk_committed)
    assert outcome == "killed", \
        f"{outcome} before round 1's first scoring chunk was committed:\n{logs[0].read_text()[-3000:]}"
    assert completed(run_dir) == PHASES[:1]
    committed_files = {f"{f.parent.name}-{f.name}": f.stat().st_mtime_ns for f in work.glob("chunk-*/*.parquet")
                       if (f.parent / "_SUCCESS").is_file()}
    assert committed_files

    def training_checkpointed() -> bool:
        return len(registered_epochs(trial)) >= 1 and "r1.train" not in completed(run_dir)

    outcome = _drive(cmd, env, logs[1], kill_when=training_checkpointed)
    assert outcome == "killed", f"{outcome} before round 1 reported a checkpoint:\n{logs[1].read_text()[-3000:]}"
    assert "resuming after prepare" in logs[1].read_text()
    assert "took over the lease" in logs[1].read_text()  # the killed driver's lease (its pid is gone)
    assert completed(run_dir) == PHASES[:4]
    epochs_before = registered_epochs(trial)
    assert max(epochs_before) < EPOCHS - 1, f"killed after the last epoch ({epochs_before}): nothing was tested"

    outcome = _drive(cmd, env, logs[2])
    assert outcome == "exited 0", f"{outcome}:\n{logs[2].read_text()[-3000:]}"
    assert "resuming after r1.score" in logs[2].read_text()
    assert completed(run_dir) == PHASES

    # Scoring: one row per pool image in every round; the chunk committed before the kill was kept, not redone.
    pool = split_ids(prepared_root, "unlabeled")
    for r in (0, 1):
        ids = table_ids(run_dir / "rounds" / f"r{r}" / "pseudo_labels")
        assert len(ids) == len(set(ids)) and sorted(ids) == pool, f"round {r}: pool ids lost or duplicated"
    kept = {f.name: f.stat().st_mtime_ns for f in (r1 / "pseudo_labels").glob("chunk-*") if f.name in committed_files}
    assert kept == committed_files, "round 1's committed scoring chunks were rewritten after the driver was killed"

    # Training: continued from the last checkpoint the killed driver's run reported, each epoch once.
    assert registered_epochs(trial) == list(range(EPOCHS)), (epochs_before, registered_epochs(trial))
    # ... and what the re-run's workers held right after loading it was that checkpoint, tensor by tensor.
    # (the killed driver's controller may register one more epoch while Ray cleans it up: that one is the last)
    (restored,) = check_restores(trial)
    assert max(epochs_before) <= restored < EPOCHS - 1, (epochs_before, restored)
    assert json.loads((r1 / "checkpoint" / "train_state.json").read_text())["epoch"] == EPOCHS - 1

    # Evaluation: one prediction per test image; metrics and report written.
    for split in ("test", "ood_test"):
        ids = table_ids(r1 / "predictions" / split)
        assert len(ids) == len(set(ids)) and sorted(ids) == split_ids(prepared_root, split), split
    metrics = json.loads((r1 / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert (run_dir / "report" / "report.md").is_file()

    # No secret from the environment in anything the run wrote or printed.
    for whose, value in (("driver", secret), ("cluster", cluster.secret)):
        leaks = [str(p) for p in [*run_dir.rglob("*"), *logs] if p.is_file() and value.encode() in p.read_bytes()]
        assert not leaks, f"the {whose}'s AWS_SECRET_ACCESS_KEY was written to {leaks}"
    assert "AWS_SECRET_ACCESS_KEY" not in (run_dir / "config.yaml").read_text()
