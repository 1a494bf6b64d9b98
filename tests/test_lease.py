"""One driver per run: the lease on a local disk and on a real S3 API server (conditional writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from loft_dist import storage
from loft_dist.errors import LeaseError
from loft_dist.lease import Lease, _backend


@pytest.fixture(params=["local", "s3"])
def lease_at(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "lease.json")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket()}/runs/tiny/lease.json"


def _text(location: str) -> str:
    """The lease as a driver reads it (one GET on S3). Not storage.read_text: pyarrow sizes an object with a HEAD
    before it GETs it, so a heartbeat that rewrites the lease in between is read torn (seen: a trailing NUL)."""
    return _backend(location).read()[0]


def _holder(location: str) -> dict:
    return json.loads(_text(location))


def test_a_second_driver_is_refused_with_the_holder_named_and_the_lease_untouched(lease_at):
    with Lease(lease_at, "run X", timeout_s=60) as first:
        before = _text(lease_at)
        with pytest.raises(LeaseError) as e:
            Lease(lease_at, "run X", timeout_s=60).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "host " in msg and "last heartbeat" in msg and "started" in msg
        assert "run.lease_timeout_s=60" in msg and "\n" not in msg
        assert _text(lease_at) == before
        first.check()  # still held
    assert not storage.exists(lease_at), "release removes the lease"
    with Lease(lease_at, "run X", timeout_s=60):  # and the next driver takes it at once
        pass


def test_a_stale_lease_is_taken_over_and_its_old_holder_learns_it_lost(lease_at):
    old = Lease(lease_at, "run X", timeout_s=0.5)
    old.acquire()  # no heartbeat thread: it goes stale like a killed driver's on another host
    time.sleep(0.8)
    with Lease(lease_at, "run X", timeout_s=0.5) as new:
        assert _holder(lease_at)["owner"] == new.record["owner"]
        old.renew()
        with pytest.raises(LeaseError, match="lost the lease of run X"):
            old.check()
        assert _holder(lease_at)["owner"] == new.record["owner"], "the loser's renewal must not overwrite"
        old.release()  # the loser's release must not remove the new holder's lease
        assert _holder(lease_at)["owner"] == new.record["owner"]


def test_a_dead_driver_on_this_host_is_taken_over_at_once(lease_at):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Lease(lease_at, "run X", timeout_s=3600)
    stale.record["pid"] = int(dead.stdout)  # the lease of a process that has exited (a SIGKILLed driver)
    stale.acquire()
    with Lease(lease_at, "run X", timeout_s=3600) as new:
        assert _holder(lease_at)["owner"] == new.record["owner"]


def test_the_heartbeat_keeps_a_live_lease_fresh(lease_at):
    with Lease(lease_at, "run X", timeout_s=0.4):
        first = _holder(lease_at)["heartbeat"]
        time.sleep(1.0)
        assert _holder(lease_at)["heartbeat"] > first
        with pytest.raises(LeaseError, match="in use by another driver"):  # 1 s > timeout, yet still fresh
            Lease(lease_at, "run X", timeout_s=0.4).acquire()


@pytest.mark.s3
def test_a_lease_on_s3_without_credentials_is_one_line(monkeypatch, tmp_path):
    from loft_dist.errors import StorageError

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask on this machine
    with pytest.raises(StorageError, match=r"^s3://b/runs/x/lease.json: no AWS credentials found \(AWS_ACCESS_KEY_ID"):
        Lease("s3://b/runs/x/lease.json", "run x", 60).acquire()
