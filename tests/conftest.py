"""Shared fixtures: one local Ray per session for the in-process tests (ray.init costs ~3 s, each fit ~17 s of
overhead) and one `ray start` cluster per session for the tests that drive a cluster from outside (job submit, the
killed driver, the multi-node tests); and the order and markers that keep each of them alive only while needed.

Order (pytest_collection_modifyitems): modules that use no shared Ray first, then those that use `ray_session`, then
those that use `ray_cluster`; the original order within each group. Each shared Ray is shut down right after the last
test that uses it, so that it never idles beside unrelated tests. Under pytest-xdist (pyproject's `-n 2 --dist
loadgroup`) the tests of each shared Ray are one xdist group: each Ray starts in one test process only.
Every test that uses either is marked `slow` (the fast tier, `-m "not slow"`, starts no Ray at all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_RAY = ("ray_session", "ray_cluster")  # in the order their modules run
# The shared cluster detects a lost node within ~10 s instead of ~30 s (the GCS health check of every raylet; the
# multi-node tests crash nodes); not tighter, because a busy 2-core machine can delay a live raylet's answer by seconds.
FAST_NODE_DEATH = {"health_check_period_ms": 2000, "health_check_timeout_ms": 8000,
                   "health_check_failure_threshold": 4}

def pytest_configure(config):
    """Model caches (the CLIP stand-in that `loft-dist demo` builds) go to a directory of this test run, never the
    user's ~/.cache: the demo test then starts from an empty cache, as on a fresh machine, and every process of the
    run (Ray's workers, the demo's own) reads the same one. xdist's workers inherit the controller's."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["LOFT_DIST_CACHE"] = tempfile.mkdtemp(prefix="loft_dist-test-cache-")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ.pop("LOFT_DIST_CACHE", ""), ignore_errors=True)


_release: dict[str, Callable[[], None]] = {}  # shared Ray fixture → its shutdown, once it is up
_last_user: dict[str, list[str]] = {}  # test node id → the shared Ray fixtures it is the last user of


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray sized like CI (2 cores), with a capped object store and extra logical CPUs for fractional actors."""
    import ray

    from loft_dist.runtime import configure_ray_data

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    configure_ray_data()
    _release["ray_session"] = ray.shutdown
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start` head on 127.0.0.1 (4 logical CPUs, job API, state API) that this process never joins.

    Its processes carry a fake AWS_SECRET_ACCESS_KEY (`.secret`), which the tests look for in what runs wrote; the
    multi-node tests add role nodes to it (tests/multinode/conftest.py) and remove them again."""
    from local_ray_cluster import LocalRayCluster

    secret = f"not-a-real-secret-{uuid.uuid4().hex}"
    cluster = LocalRayCluster(num_cpus=4, object_store_bytes=400_000_000, system_config=FAST_NODE_DEATH,
                              node_env={"HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": secret})
    cluster.secret = secret
    cluster.start()
    _release["ray_cluster"] = cluster.stop
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on 127.0.0.1 for the whole session; this process (and every process it starts, Ray's
    included) reaches it through the AWS_* environment, as users reach theirs."""
    from s3_server import S3Server

    server = S3Server().start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env().items():
            mp.setenv(k, v)
        yield server
    server.stop()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists only beside the project's checkout, not on a user's machine)")
    return SHARED


def _shared_ray_group(item) -> int:
    """0: no shared Ray; 1 + the index in SHARED_RAY of the last shared Ray fixture the test uses."""
    return max((1 + i for i, name in enumerate(SHARED_RAY) if name in item.fixturenames), default=0)


def pytest_itemcollected(item):
    """Before -m selects: a test that starts or uses a shared Ray is slow, one on the S3 server is s3, marked or
    not. The tests of each shared Ray form one xdist group, so that under `-n 2 --dist loadgroup` (pyproject's
    addopts) that Ray starts once, in one test process, and its last user there shuts it down."""
    group = _shared_ray_group(item)
    if group:
        item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(SHARED_RAY[group - 1]))
    if "s3_server" in item.fixturenames:
        item.add_marker(pytest.mark.s3)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the last user found here is the last one that runs
def pytest_collection_modifyitems(config, items):
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    group: dict[str, int] = {}
    for item in items:
        group[module(item)] = max(group.get(module(item), 0), _shared_ray_group(item))
    items.sort(key=lambda item: group[module(item)])  # stable: the original order within each group
    _last_user.clear()
    for name in SHARED_RAY:
        users = [item for item in items if name in item.fixturenames]
        if users:
            _last_user.setdefault(users[-1].nodeid, []).append(name)


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name in _last_user.get(item.nodeid, []):
        release = _release.pop(name, None)
        if release is not None:
            release()
