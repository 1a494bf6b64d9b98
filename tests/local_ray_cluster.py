"""Real `ray start` nodes on 127.0.0.1, each with its own temp dir and ports, for tests that need a cluster the test
process is not part of (`ray job submit`, a driver killed and resubmitted, nodes added and lost).

One head serves the whole test session (tests/conftest.py `ray_cluster`): the kill-driver and multi-node
tests all drive it, and the multi-node tests add worker nodes to it (`add_node`) and crash them (`kill_node`).

Stopped by process id, never with `ray stop`: that kills every Ray process on the machine, the test session's own
(tests/conftest.py `ray_session`) and other people's included. Every process of this cluster carries a marker in its
environment (inherited from `ray start`), so teardown finds exactly those, workers that renamed themselves `ray::…`
included; the processes of a worker node carry a second marker of their own, so a node can be killed alone.
The test process never joins the cluster (no `ray.init`): it reads the cluster's state over the dashboard's HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

MARKER = "LOFT_DIST_TEST_CLUSTER"  # every process of the cluster (its nodes, and drivers started with `env()`)
NODE_MARKER = "LOFT_DIST_TEST_NODE"  # the processes of one worker node
# This interpreter's own `ray` script; a venv that borrows the system's packages has it only on PATH.
_OWN_RAY = Path(sys.executable).with_name("ray")
RAY = str(_OWN_RAY) if _OWN_RAY.exists() else (shutil.which("ray") or "ray")
NODE_START_TIMEOUT_S = 180.0  # a raylet's registration with the GCS on a busy machine
STOP_GRACE_S = 5.0  # SIGTERM → SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker_value: str, marker: str = MARKER) -> list[psutil.Process]:
    """Processes whose environment carries marker=marker_value: this cluster's (or node's), and only those."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(marker) == marker_value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _kill_all(marker_value: str, marker: str = MARKER) -> None:
    """SIGKILL every marked process, sweeping again for any started meanwhile (a raylet starting a worker)."""
    for _ in range(3):
        left = marked_processes(marker_value, marker)
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)


def _retryable(log: str) -> bool:
    """A start that failed for the machine's sake, not Ray's: a raylet too slow to register in `ray start`'s fixed 30 s,
    or a port picked free that something else bound before Ray did."""
    return "timed out during startup" in log or "Address already in use" in log


def _started(log: Path) -> bool:
    return log.is_file() and "Ray runtime started" in log.read_text(errors="replace")


@dataclass
class WorkerNode:
    name: str  # unique in the cluster: `ray start --node-name`
    marker: str  # NODE_MARKER value of its processes
    proc: subprocess.Popen
    log_path: Path
    temp_dir: str
    node_id: str = ""


class LocalRayCluster:
    """`ray start --head --block` in a child process; `.gcs_address` for drivers, `.dashboard_url` for `ray job` and
    the state API; `add_node` / `kill_node` for worker nodes."""

    def __init__(self, num_cpus: int = 4, object_store_bytes: int = 400_000_000, start_timeout: float = 300.0,
                 node_env: dict | None = None, attempts: int = 3, system_config: dict | None = None):
        """`node_env`: extra environment of the head's processes (its workers, actors and job drivers inherit it);
        `system_config`: Ray's `_system_config` of the cluster (e.g. faster node-death detection)."""
        self.num_cpus, self.object_store_bytes, self.start_timeout = num_cpus, object_store_bytes, start_timeout
        self.node_env = {"DS_ACCELERATOR": "cpu", **(node_env or {})}
        self.attempts = attempts
        self.system_config = dict(system_config or {})
        # Short: Ray's Unix socket paths live under it and must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self.proc: subprocess.Popen | None = None
        self.workers: list[WorkerNode] = []
        self.head_node_id = ""
        self.stopped = False

    def env(self, **extra: str) -> dict:
        """Environment for a process that belongs to this cluster (a driver, `ray job submit`)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", NODE_MARKER)}
        env.update({MARKER: self.temp_dir, "RAY_AUTH_MODE": "disabled", **extra})
        return env

    def start(self) -> "LocalRayCluster":
        """Start the head and wait for its job API. `ray start` gives the raylet a fixed 30 s to register, which a
        2-core machine under load can miss ("The current node timed out during startup"), and a port found free can
        be taken before Ray binds it: both are retried."""
        for attempt in range(1, self.attempts + 1):
            if self._start_once():
                self.head_node_id = next(n["node_id"] for n in self._wait_for_nodes(lambda ns: any(
                    n["is_head_node"] for n in ns)) if n["is_head_node"])
                return self
            log = self.log_path.read_text()
            self.stop(remove_temp_dir=False)
            self.stopped = False
            if not _retryable(log) or attempt == self.attempts:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                raise RuntimeError(f"`ray start` failed (attempt {attempt}):\n{log[-5000:]}")
        raise AssertionError("unreachable")

    def _start_once(self) -> bool:
        # The job agent's HTTP port defaults to a fixed 52365: on a machine with other Ray instances it is taken, the
        # agent then serves no HTTP, and every submission fails with "No available agent to submit job".
        self.port, self.dashboard_port, self.agent_port = free_port(), free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(self.agent_port),
               "--num-cpus", str(self.num_cpus), "--object-store-memory", str(self.object_store_bytes),
               "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        if self.system_config:
            cmd += ["--system-config", json.dumps(self.system_config)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env(**self.node_env))
        deadline = time.monotonic() + self.start_timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            # `ray start` prints this once its own start-up checks passed (the dashboard answers before that).
            if _started(self.log_path) and self._job_api_ready() and self._agent_listening():
                return True
            time.sleep(0.5)
        return False

    def _job_api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def _agent_listening(self) -> bool:
        """The job agent submits jobs; it registers with the head right after its HTTP server is up."""
        try:
            with socket.create_connection(("127.0.0.1", self.agent_port), timeout=5):
                return True
        except OSError:
            return False

    # --- worker nodes

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, labels: dict | None = None,
                 object_store_bytes: int = 200_000_000, env: dict | None = None, attempts: int = 3) -> WorkerNode:
        """`ray start --address <head> --block` with its own temp dir and ports; returns once the GCS lists the node
        alive. Like the head's, a start that failed for the machine's sake (`_retryable`) is retried."""
        for attempt in range(1, attempts + 1):
            name = f"node{len(self.workers) + 1}-{os.urandom(3).hex()}"
            temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
            log_path = Path(temp_dir) / "ray_start.log"
            cmd = [RAY, "start", "--block", "--address", self.gcs_address, "--node-ip-address", "127.0.0.1",
                   "--node-name", name, "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
                   "--object-store-memory", str(object_store_bytes), "--temp-dir", temp_dir,
                   # 0: the agent binds a port of the kernel's choosing (the default is a fixed 52365, taken by the
                   # head's machine-mates). Every other port of a worker node is bound the same way by default: a
                   # port picked here and passed on could be taken by any outgoing connection before Ray binds it.
                   "--dashboard-agent-listen-port", "0", "--disable-usage-stats"]
            if labels:
                cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
            node_env = self.env(**{**self.node_env, **(env or {}), NODE_MARKER: name})
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=node_env)
            node = WorkerNode(name=name, marker=name, proc=proc, log_path=log_path, temp_dir=temp_dir)
            self.workers.append(node)
            deadline = time.monotonic() + NODE_START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline and not _started(log_path):
                time.sleep(0.5)
            if _started(log_path):
                alive = self._wait_for_nodes(lambda ns: any(n["node_name"] == name and n["state"] == "ALIVE"
                                                            for n in ns))
                node.node_id = next(n["node_id"] for n in alive if n["node_name"] == name)
                return node
            text = log_path.read_text(errors="replace")
            self.kill_node(node)
            if not _retryable(text) or attempt == attempts:
                raise RuntimeError(f"`ray start --address` failed (attempt {attempt}):\n{text[-5000:]}")
        raise AssertionError("unreachable")

    def kill_node(self, node: WorkerNode) -> None:
        """SIGKILL every process of the node at once (raylet, object store, agents, workers): a crash, not a drain."""
        _kill_all(node.marker, NODE_MARKER)
        if node.proc.poll() is None:
            node.proc.kill()
        node.proc.wait()
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    # --- state, over the dashboard's HTTP API (the test process does not join the cluster)

    def nodes(self) -> list[dict]:
        """node_id, node_name, state, is_head_node and resources_total of every node the GCS knows, dead ones too."""
        from ray.util.state import list_nodes

        return [{"node_id": n.node_id, "node_name": n.node_name, "state": n.state, "is_head_node": n.is_head_node,
                 "resources_total": n.resources_total}
                for n in _retry(lambda: list_nodes(address=self.dashboard_url, limit=10000, detail=True,
                                                   raise_on_missing_output=False))]

    def actors(self) -> list[dict]:
        """actor_id, class_name, state, node_id (the last node it lived on) and num_restarts of every actor."""
        from ray.util.state import list_actors

        return [{"actor_id": a.actor_id, "class_name": a.class_name, "state": a.state, "node_id": a.node_id,
                 "num_restarts": int(a.num_restarts or 0)}
                for a in _retry(lambda: list_actors(address=self.dashboard_url, limit=10000, detail=True,
                                                    raise_on_missing_output=False))]

    def _wait_for_nodes(self, condition, timeout: float = NODE_START_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.nodes()
            if condition(nodes):
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes after {timeout:.0f} s: {nodes}\n{self.diagnostics()}")
            time.sleep(0.5)

    def diagnostics(self) -> str:
        """Tails of `ray start`'s logs and of Ray's record of processes that died, for a failure message."""
        parts = []
        paths = [self.log_path, *(w.log_path for w in self.workers),
                 *Path(self.temp_dir).glob("session_latest/logs/ray_process_exit.log")]
        for path in paths:
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self, remove_temp_dir: bool = True, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM `ray start --block` (it starts shutting its node down), then, after `grace_s`, SIGKILL whatever of
        ours is left: the cluster is disposable, and Ray's orderly shutdown of every process took 30-35 s on a busy
        2-core machine. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        procs = [w.proc for w in self.workers] + ([self.proc] if self.proc is not None else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _kill_all(self.temp_dir)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for w in self.workers:
            shutil.rmtree(w.temp_dir, ignore_errors=True)
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _retry(call, attempts: int = 5):
    """The state API is briefly unavailable while the head is busy (a 2-core machine under load)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:  # noqa: BLE001 - re-raised on the last attempt
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    return []
