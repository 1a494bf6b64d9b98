"""Fixtures of the multi-node tests: role nodes on the session's shared Ray head, and the `loft-dist run` driver.

Layout (each worker node 1 logical CPU, a 200 MB object store, its own raylet and temp dir):
  head     the session's `ray start` head (tests/conftest.py `ray_cluster`), no role resources: GCS, dashboard
           (job and state API); the drivers attach to it
  trainer  x2, {"trainer": 1}: Ray Train workers (`train.custom_resources={trainer: 0.5}`)
  scorer   x1, {"scorer": 1}: the scoring actor pool (`scoring.custom_resources={scorer: 0.5}`)
Tests remove and add trainer/scorer nodes; the head stays, and the module removes every node it added at its end.

The driver is a separate `loft-dist run … run.ray_address=<cluster>` process, as under `ray job submit` on a real
cluster: this pytest process never joins the cluster nor holds a client of it (it reads the state API over HTTP),
so an in-process Ray of other test modules (tests/conftest.py's `ray_session`) is neither shut down nor shadowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from multinode_lib import WORKER_ENV, Driver, RoleNodes


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    c = RoleNodes(ray_cluster, trainers=2, scorers=1, cpus_per_node=1, object_store_mb=200, env=WORKER_ENV)
    yield c
    c.shutdown()


@pytest.fixture
def driver(cluster):
    """Starts drivers; kills any still running at the end of the test (a failed assertion mid-run)."""
    started: list[Driver] = []

    def start(storage: Path, name: str, overrides: list[str]) -> Driver:
        d = Driver(cluster, storage, name, overrides)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
