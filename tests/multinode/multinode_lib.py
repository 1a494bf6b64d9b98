"""Multi-node Ray on one machine with a role per node, and the `loft-dist run` driver that joins it.

Two ways to get the nodes, with one interface (`address`, `add`, `remove`, `role_of`, `removed`, `actors`):
  RoleNodes     role nodes added to a running `ray start` head (tests/local_ray_cluster.py): the test session's
                shared cluster, which tests/multinode uses (tests/multinode/conftest.py)
  LocalCluster  a cluster of its own (`ray.cluster_utils.Cluster`, head included): bench/multinode.py, whose
                topologies also give the head roles or more CPUs

Roles are custom resources, as on a real fleet: `trainer` nodes take Ray Train workers
(`train.custom_resources={trainer: 0.5}`), `scorer` nodes take the scoring actor pool
(`scoring.custom_resources={scorer: 0.5}`); the head takes neither, so that it (and the driver attached
to it) survives when a test removes a trainer or a scorer node.

LocalCluster is owned by a helper process (`python multinode_lib.py --serve`, driven over a pipe), never by the
caller's process: an in-process GCS client of a cluster that has been shut down makes Ray terminate its process
60 s later ("Failed to connect to GCS within 60 seconds"), which would kill a pytest session that goes on to
other modules. The caller stays free of Ray state, so an in-process Ray of other tests is untouched. The helper
shuts the cluster down when the pipe closes, also when its caller dies.

LocalCluster lives in its own Ray temp dir (RAY_TMPDIR, set in the helper only): `Cluster` writes its address
to `<temp>/ray/ray_current_cluster`, and a plain `ray.init()` anywhere on the machine (other test sessions
included) would join the newest address found there. Drivers join it by its explicit address
(`run.ray_address=…`).
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
from types import SimpleNamespace

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
NODE_START_TIMEOUT_S = 180  # a raylet's registration with the GCS on a busy machine (Ray's own limit: 30 s)
ROLE_RESOURCES = {"head": {}, "trainer": {"trainer": 1}, "scorer": {"scorer": 1}}
# Node-death detection within ~10 s instead of ~30 s (the GCS health check of every raylet); not tighter,
# because a busy 2-core machine can delay a live raylet's answer by seconds.
SYSTEM_CONFIG = {"health_check_period_ms": 2000, "health_check_timeout_ms": 8000, "health_check_failure_threshold": 4}


def _patient_node_startup(limit_s: float = NODE_START_TIMEOUT_S) -> None:
    """Give a starting raylet `limit_s` to register with the GCS instead of Ray's fixed 30 s.

    On a 2-core machine shared with other test sessions (load average 50+), a raylet or the GCS can take longer
    than 30 s to answer; Ray's `Node` then raises "The current node timed out during startup" and leaves the
    half-started raylet behind. Only this helper process is patched."""
    import ray._private.services as services

    get_node = services.get_node

    def patient_get_node(*args, **kwargs):
        t0 = time.monotonic()
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() - t0 > limit_s:
                    raise
                time.sleep(0.5)

    services.get_node = patient_get_node


class _Server:
    """The helper process's side: the `ray.cluster_utils.Cluster` itself; one JSON request per stdin line."""

    def __init__(self, trainers: int, scorers: int, cpus_per_node: int, object_store_mb: int,
                 head_resources: dict | None = None, head_cpus: int | None = None):
        from ray.cluster_utils import Cluster

        _patient_node_startup()
        self.cpus_per_node, self.object_store_mb = cpus_per_node, object_store_mb
        self.head_resources, self.head_cpus = dict(head_resources or {}), head_cpus
        self.nodes: dict[str, object] = {}  # live node id → Node
        self.cluster = Cluster()
        self.head_id = self._start(self._node_args("head", head=True)).node_id
        self.layout = {self.head_id: "head"}
        for role, n in (("trainer", trainers), ("scorer", scorers)):
            for _ in range(n):
                self.layout[self.add(role)] = role
        self.cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)

    def _node_args(self, role: str, head: bool = False) -> dict:
        args = {"num_cpus": self.cpus_per_node, "resources": dict(ROLE_RESOURCES[role]), "labels": {"role": role},
                "object_store_memory": self.object_store_mb * 1024 * 1024}
        if head:  # the dashboard serves the state API (who ran where); bound to localhost
            args["resources"].update(self.head_resources)
            args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                        _system_config=SYSTEM_CONFIG)
            if self.head_cpus is not None:  # a bigger head (the 1-node baseline): object store scales with CPUs
                args["num_cpus"] = self.head_cpus
                args["object_store_memory"] = self.object_store_mb * self.head_cpus * 1024 * 1024
        return args

    def _start(self, node_args: dict):
        import ray._private.services as services

        node = self.cluster.add_node(wait=False, **node_args)  # the first one is the head
        services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, NODE_START_TIMEOUT_S)
        return node

    def add(self, role: str) -> str:
        node = self._start(self._node_args(role))
        self.nodes[node.node_id] = node
        return node.node_id

    def remove(self, node_id: str) -> None:
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)  # SIGKILL: a crash, not a drain

    def actors(self) -> list[dict]:
        from ray.util.state import list_actors

        for attempt in range(5):
            try:
                return [{"actor_id": a.actor_id, "class_name": a.class_name, "state": a.state,
                         "node_id": a.node_id, "num_restarts": int(a.num_restarts or 0)}
                        for a in list_actors(address=self.cluster.address, limit=10000, detail=True,
                                             raise_on_missing_output=False)]
            except Exception:  # the state API is briefly unavailable while the head is busy
                if attempt == 4:
                    raise
                time.sleep(1)
        return []


def _serve() -> None:
    # The pipes get private descriptors; fds 0/1 of this process (inherited by every Ray process it starts)
    # become /dev/null and the log, so that nothing but the replies reaches the caller.
    requests, reply = os.fdopen(os.dup(0)), os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    server = None
    try:
        for line in requests:
            req = json.loads(line)
            op, args = req["op"], req.get("args", {})
            try:
                if op == "start":
                    server = _Server(**args)
                    out = {"address": server.cluster.address, "layout": server.layout}
                elif op == "add":
                    out = server.add(**args)
                elif op == "remove":
                    out = server.remove(**args)
                elif op == "actors":
                    out = server.actors()
                elif op == "shutdown":
                    break
                else:
                    raise ValueError(f"unknown op {op!r}")
                reply.write(json.dumps({"ok": out}) + "\n")
            except Exception as e:  # noqa: BLE001 - sent back, raised in the caller
                reply.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            reply.flush()
    finally:
        if server is not None:
            server.cluster.shutdown()


class LocalCluster:
    """head + trainer/scorer nodes, each with its own logical CPUs and object store, in a helper process.

    `roles` maps role → live node ids; `role_of` also knows removed nodes; `actors` lists Ray's actors."""

    def __init__(self, trainers: int = 2, scorers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 200,
                 env: dict | None = None, head_resources: dict | None = None, head_cpus: int | None = None):
        """`head_resources` gives the head a role too (e.g. {"scorer": 1}, or both roles for a 1-node baseline);
        `env` goes to every Ray process of the cluster (e.g. DS_ACCELERATOR=cpu)."""
        # Short: a node's Unix socket paths live under it and are capped at 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="lmn", dir="/tmp")
        self.log = Path(self.temp_dir) / "cluster.log"
        env = {**os.environ, **(env or {}), "RAY_TMPDIR": self.temp_dir}
        env.pop("RAY_ADDRESS", None)
        with open(self.log, "w") as log:
            self._proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, env=env, text=True, bufsize=1,
                                          start_new_session=True)
        self.roles: dict[str, list[str]] = {"head": [], "trainer": [], "scorer": []}  # live node ids
        self.role_by_id: dict[str, str] = {}  # every node ever added, removed ones included
        self.removed: set[str] = set()
        try:
            started = self._call("start", trainers=trainers, scorers=scorers, cpus_per_node=cpus_per_node,
                                 object_store_mb=object_store_mb, head_resources=head_resources, head_cpus=head_cpus)
        except BaseException:
            self.shutdown()
            raise
        self.address: str = started["address"]
        for node_id, role in started["layout"].items():
            self._track(role, node_id)

    def _call(self, op: str, **args):
        if self._proc.poll() is not None:
            raise RuntimeError(f"the cluster helper has exited; its log:\n{self.tail()}")
        self._proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster helper died during {op!r}; its log:\n{self.tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cluster {op!r} failed: {reply['error']}")
        return reply["ok"]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _track(self, role: str, node_id: str) -> str:
        self.roles[role].append(node_id)
        self.role_by_id[node_id] = role
        return node_id

    def add(self, role: str) -> str:
        """Start a node of a role (`trainer` or `scorer`); returns its node id."""
        return self._track(role, self._call("add", role=role))

    def remove(self, node_id: str) -> None:
        """Kill every process of a node at once (SIGKILL: a crash, not a drain)."""
        self._call("remove", node_id=node_id)
        self.roles[self.role_by_id[node_id]].remove(node_id)
        self.removed.add(node_id)

    def role_of(self, node_id: str) -> str | None:
        return self.role_by_id.get(node_id)

    def actors(self, class_name: str) -> list[SimpleNamespace]:
        """Actors whose class name contains `class_name`, dead ones included: actor_id, class_name, state,
        node_id (the last node it lived on), num_restarts (Ray's state API, served by the head's dashboard)."""
        return [SimpleNamespace(**a) for a in self._call("actors") if class_name in a["class_name"]]

    def driver_env(self) -> dict | None:
        return None  # this process's own

    def shutdown(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RoleNodes:
    """Trainer and scorer nodes added to a running `ray start` head (tests/local_ray_cluster.py `LocalRayCluster`, the
    test session's shared cluster), with LocalCluster's interface: the multi-node tests run on either.

    Each node is its own `ray start --address … --block` (own raylet, object store, temp dir; 1 logical CPU, a role
    resource and a `role` label); `remove` kills every process of the node at once. The head has no role resource,
    so nothing pinned to a role runs there, and it survives every removal."""

    def __init__(self, head, trainers: int = 2, scorers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 200,
                 env: dict | None = None):
        self.head, self.cpus_per_node, self.object_store_mb = head, cpus_per_node, object_store_mb
        self.env = dict(env or {})
        self.address: str = head.gcs_address
        self.roles: dict[str, list[str]] = {"head": [], "trainer": [], "scorer": []}  # live node ids
        self.role_by_id: dict[str, str] = {}  # every node ever added, removed ones included
        self.removed: set[str] = set()
        self._nodes: dict[str, object] = {}  # live node id → the head's WorkerNode
        self._track("head", head.head_node_id)
        try:
            for role, n in (("trainer", trainers), ("scorer", scorers)):
                for _ in range(n):
                    self.add(role)
        except BaseException:
            self.shutdown()
            raise

    def _track(self, role: str, node_id: str) -> str:
        self.roles[role].append(node_id)
        self.role_by_id[node_id] = role
        return node_id

    def add(self, role: str) -> str:
        """Start a node of a role (`trainer` or `scorer`); returns its node id once the GCS lists it alive."""
        node = self.head.add_node(num_cpus=self.cpus_per_node, resources=ROLE_RESOURCES[role], labels={"role": role},
                                  object_store_bytes=self.object_store_mb * 1024 * 1024, env=self.env)
        self._nodes[node.node_id] = node
        return self._track(role, node.node_id)

    def remove(self, node_id: str) -> None:
        """Kill every process of a node at once (SIGKILL: a crash, not a drain)."""
        self.head.kill_node(self._nodes.pop(node_id))
        self.roles[self.role_by_id[node_id]].remove(node_id)
        self.removed.add(node_id)

    def role_of(self, node_id: str) -> str | None:
        return self.role_by_id.get(node_id)

    def actors(self, class_name: str) -> list[SimpleNamespace]:
        """Actors whose class name contains `class_name`, dead ones included (see LocalCluster.actors)."""
        return [SimpleNamespace(**a) for a in self.head.actors() if class_name in a["class_name"]]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.head.diagnostics().splitlines()[-lines:])

    def driver_env(self) -> dict:
        """A driver's environment: the head's marker (its teardown finds a straggler) and its auth mode."""
        return self.head.env()

    def shutdown(self) -> None:
        """Remove every node this object added; the head goes on (it belongs to the session)."""
        for node_id in list(self._nodes):
            self.remove(node_id)


class Driver:
    """A `loft-dist run` process joined to the cluster; its output goes to a log file read on failure."""

    def __init__(self, cluster: LocalCluster, storage: Path, name: str, overrides: list[str]):
        self.run_dir = storage / name
        self.log = storage / f"{name}.log"
        cmd = [sys.executable, "-m", "loft_dist.cli", "run", TINY, f"run.storage_path={storage}", f"run.name={name}",
               f"run.ray_address={cluster.address}", *overrides]
        self.cmd = " ".join(cmd)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=cluster.driver_env())
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


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
