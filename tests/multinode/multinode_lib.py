"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`) with a role per node, and the
`loft-dist run` driver that joins it. Used by tests/multinode and bench/multinode.py.

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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
# Placement through config: train workers on trainer nodes, spread one per node; scoring actors on scorer nodes.
PLACEMENT = ["train.num_workers=2", "train.placement_strategy=SPREAD", "train.custom_resources={trainer: 0.5}",
             "scoring.custom_resources={scorer: 0.5}"]
# Fractional CPUs: a node's 1 CPU holds a worker or an actor and still runs Ray Data's read/decode tasks.
FRACTIONS = ["train.cpus_per_worker=0.5", "scoring.cpus_per_actor=0.5", "scoring.cpus_per_data_task=0.25",
             "train.cpus_per_data_task=0.25"]
# One round of the tiny run; no ood_test split (one scoring pool less per evaluation: these tests are about where
# things run and what survives a lost node, not about OOD metrics).
TINY_ROUND = ["rounds.num_rounds=1", "train.epochs_per_round=2", "data.ood_test=0"]
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
RUN_TIMEOUT_S = 900
ROLE_RESOURCES = {"head": {}, "trainer": {"trainer": 1}, "scorer": {"scorer": 1}}
# Node-death detection within ~10 s instead of ~30 s (the GCS health check of every raylet); not tighter,
# because a busy 2-core machine can delay a live raylet's answer by seconds.
SYSTEM_CONFIG = {"health_check_period_ms": 2000, "health_check_timeout_ms": 8000, "health_check_failure_threshold": 4}


class LocalCluster:
    """head + trainer/scorer nodes, each with its own logical CPUs and object store; `roles` maps role → nodes."""

    def __init__(self, trainers: int = 2, scorers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 200,
                 env: dict | None = None, head_resources: dict | None = None, head_cpus: int | None = None):
        """`head_resources` gives the head a role too (e.g. {"scorer": 1}, or both roles for a 1-node baseline)."""
        from ray.cluster_utils import Cluster

        self.cpus_per_node, self.object_store_mb = cpus_per_node, object_store_mb
        self.head_resources, self.head_cpus = dict(head_resources or {}), head_cpus
        # Short: a node's Unix socket paths live under it and are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="lmn", dir="/tmp")
        self._saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *(env or {}))}
        os.environ["RAY_TMPDIR"] = self.temp_dir  # nodes started from here inherit it, the address file goes there
        os.environ.update(env or {})  # e.g. DS_ACCELERATOR=cpu, HF_HUB_OFFLINE=1 for every worker process
        self.roles: dict[str, list] = {"head": [], "trainer": [], "scorer": []}  # live nodes
        self.role_by_id: dict[str, str] = {}  # every node ever added, removed ones included
        self.removed: set[str] = set()
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=self._node_args("head", head=True))
            self._track("head", self.cluster.head_node)
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
            args["resources"].update(self.head_resources)
            args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                        _system_config=SYSTEM_CONFIG)
            if self.head_cpus is not None:
                args["num_cpus"] = self.head_cpus
                args["object_store_memory"] = self.object_store_mb * self.head_cpus * 1024 * 1024
        return args

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, role: str):
        return self._track(role, self.cluster.add_node(**self._node_args(role)))

    def _track(self, role: str, node):
        self.roles[role].append(node)
        self.role_by_id[node.node_id] = role
        return node

    def remove(self, node) -> None:
        """Kill every process of a node at once (SIGKILL: a crash, not a drain)."""
        for nodes in self.roles.values():
            if node in nodes:
                nodes.remove(node)
        self.removed.add(node.node_id)
        self.cluster.remove_node(node, allow_graceful=False)

    def role_of(self, node_id: str) -> str | None:
        return self.role_by_id.get(node_id)

    def node(self, node_id: str):
        """The live node with this id."""
        return next(n for nodes in self.roles.values() for n in nodes if n.node_id == node_id)

    def actors(self, class_name: str) -> list:
        """Actors whose class name contains `class_name`, dead ones included, with their node ids and restart
        counts (Ray's state API, served by the head's dashboard)."""
        from ray.util.state import list_actors

        for attempt in range(5):
            try:
                return [a for a in list_actors(address=self.address, limit=10000, detail=True,
                                               raise_on_missing_output=False) if class_name in a.class_name]
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


class Driver:
    """A `loft-dist run` process joined to the cluster; its output goes to a log file read on failure."""

    def __init__(self, cluster: LocalCluster, storage: Path, name: str, overrides: list[str]):
        self.run_dir = storage / name
        self.log = storage / f"{name}.log"
        cmd = [sys.executable, "-m", "loft_dist.cli", "run", TINY, f"run.storage_path={storage}", f"run.name={name}",
               f"run.ray_address={cluster.address}", *overrides]
        self.cmd = " ".join(cmd)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.time()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> float:
        """Wait for a clean exit; returns the run's wall time. A timeout kills the driver's process group."""
        try:
            rc = self.proc.wait(timeout=max(1.0, timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise TimeoutError(f"`{self.cmd}` did not finish in {timeout:.0f} s; log tail:\n{self.tail()}")
        if rc != 0:
            raise RuntimeError(f"`{self.cmd}` exited with {rc}; log tail:\n{self.tail()}")
        return time.time() - self.t0

    def stop(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def completed(self) -> list[str]:
        try:
            return json.loads((self.run_dir / "state.json").read_text())["completed"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []
