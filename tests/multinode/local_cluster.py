"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`), with a role per node.

Roles are custom resources, as on a real fleet: `trainer` nodes take Ray Train workers
(`train.custom_resources={trainer: 0.5}`), `scorer` nodes take the scoring actor pool
(`scoring.custom_resources={scorer: 0.5}`); the head takes neither, so that it (and the driver attached
to it) survives when a test removes a trainer or a scorer node.

The cluster lives in its own Ray temp dir: `Cluster` writes its address to `<temp>/ray/ray_current_cluster`,
and a plain `ray.init()` anywhere on the machine (other test sessions included) would join the newest
address found there. With RAY_TMPDIR pointed at a private dir while the head starts, nobody finds it
by accident; drivers join it by its explicit address (`run.ray_address=…`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

ROLE_RESOURCES = {"head": {}, "trainer": {"trainer": 1}, "scorer": {"scorer": 1}}
# Node-death detection within ~10 s instead of ~30 s (the GCS health check of every raylet); not tighter,
# because a busy 2-core machine can delay a live raylet's answer by seconds.
SYSTEM_CONFIG = {"health_check_period_ms": 2000, "health_check_timeout_ms": 8000, "health_check_failure_threshold": 4}


class LocalCluster:
    """head + trainer/scorer nodes, each with its own logical CPUs and object store; `roles` maps role → nodes."""

    def __init__(self, trainers: int = 2, scorers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 200,
                 env: dict | None = None):
        from ray.cluster_utils import Cluster

        self.cpus_per_node, self.object_store_mb = cpus_per_node, object_store_mb
        # Short: a node's Unix socket paths live under it and are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="lmn", dir="/tmp")
        self._saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *(env or {}))}
        os.environ["RAY_TMPDIR"] = self.temp_dir  # nodes started from here inherit it, the address file goes there
        os.environ.update(env or {})  # e.g. DS_ACCELERATOR=cpu, HF_HUB_OFFLINE=1 for every worker process
        self.roles: dict[str, list] = {"head": [], "trainer": [], "scorer": []}
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=self._node_args("head", head=True))
            self.roles["head"].append(self.cluster.head_node)
            for _ in range(trainers):
                self.add("trainer")
            for _ in range(scorers):
                self.add("scorer")
            self.cluster.wait_for_nodes()
        except BaseException:
            self.shutdown()
            raise

    def _node_args(self, role: str, head: bool = False) -> dict:
        args = {"num_cpus": self.cpus_per_node, "resources": dict(ROLE_RESOURCES[role]), "labels": {"role": role},
                "object_store_memory": self.object_store_mb * 1024 * 1024}
        if head:  # the dashboard serves the state API (who ran where); bound to localhost
            args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                        _system_config=SYSTEM_CONFIG)
        return args

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, role: str):
        node = self.cluster.add_node(**self._node_args(role))
        self.roles[role].append(node)
        return node

    def remove(self, node) -> None:
        """Kill every process of a node at once (SIGKILL: a crash, not a drain)."""
        for nodes in self.roles.values():
            if node in nodes:
                nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def role_of(self, node_id: str) -> str | None:
        for role, nodes in self.roles.items():
            if any(n.node_id == node_id for n in nodes):
                return role
        return None

    def node(self, node_id: str):
        return next(n for nodes in self.roles.values() for n in nodes if n.node_id == node_id)

    def actors(self, class_name: str) -> list:
        """Actors of a class, dead ones included, with their node ids (Ray's state API, served by the head)."""
        from ray.util.state import list_actors

        for attempt in range(5):
            try:
                return list_actors(address=self.address, filters=[("class_name", "=", class_name)], limit=10000,
                                   detail=True, raise_on_missing_output=False)
            except Exception:  # the state API is briefly unavailable while the head is busy
                if attempt == 4:
                    raise
                time.sleep(1)
        return []

    def shutdown(self) -> None:
        import ray.experimental.internal_kv as kv

        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            # Cluster.shutdown resets this process's internal-KV client; an in-process Ray of another fixture
            # (tests/conftest.py's ray_session) still needs its own.
            saved = kv.global_gcs_client
            cluster.shutdown()
            if saved is not None:
                kv._initialize_internal_kv(saved)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(self.temp_dir, ignore_errors=True)
