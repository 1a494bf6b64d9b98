"""A real `ray start` head node on 127.0.0.1, with its own temp dir and ports, for tests that need a cluster
the test process is not part of (`ray job submit`, a driver killed and resubmitted).

Stopped by process id, never with `ray stop`: that kills every Ray process on the machine, the test
session's own (tests/conftest.py `ray_session`) and other people's included. Every process of this
cluster carries a marker in its environment (inherited from `ray start`), so teardown finds exactly
those, workers that renamed themselves `ray::…` included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

MARKER = "LOFT_DIST_TEST_CLUSTER"
# This interpreter's own `ray` script; a venv that borrows the system's packages has it only on PATH.
_OWN_RAY = Path(sys.executable).with_name("ray")
RAY = str(_OWN_RAY) if _OWN_RAY.exists() else (shutil.which("ray") or "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker_value: str) -> list[psutil.Process]:
    """Processes whose environment carries MARKER=marker_value: this cluster's, and only those."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == marker_value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class LocalRayCluster:
    """`ray start --head --block` in a child process; `.gcs_address` for drivers, `.dashboard_url` for `ray job`."""

    def __init__(self, num_cpus: int = 4, object_store_bytes: int = 400_000_000, start_timeout: float = 300.0,
                 node_env: dict | None = None, attempts: int = 3):
        """`node_env`: extra environment of the node's processes (its workers, actors and job drivers inherit it)."""
        self.num_cpus, self.object_store_bytes, self.start_timeout = num_cpus, object_store_bytes, start_timeout
        self.node_env = {"DS_ACCELERATOR": "cpu", **(node_env or {})}
        self.attempts = attempts
        # Short: Ray's Unix socket paths live under it and must stay below ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self.proc: subprocess.Popen | None = None

    def env(self, **extra: str) -> dict:
        """Environment for a process that belongs to this cluster (a driver, `ray job submit`)."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({MARKER: self.temp_dir, "RAY_AUTH_MODE": "disabled", **extra})
        return env

    def start(self) -> "LocalRayCluster":
        """Start the head and wait for its job API. `ray start` gives the raylet a fixed 30 s to register, which a
        2-core machine under load can miss ("The current node timed out during startup"): that is retried."""
        for attempt in range(1, self.attempts + 1):
            if self._start_once():
                return self
            log = self.log_path.read_text()
            self.stop(remove_temp_dir=False)
            if "timed out during startup" not in log or attempt == self.attempts:
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
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env(**self.node_env))
        deadline = time.monotonic() + self.start_timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            # `ray start` prints this once its own start-up checks passed (the dashboard answers before that).
            if "Ray runtime started" in self.log_path.read_text() and self._job_api_ready() \
                    and self._agent_listening():
                return True
            time.sleep(1.0)
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

    def diagnostics(self) -> str:
        """Tails of `ray start`'s log and of its record of processes that died, for a failure message."""
        parts = []
        for path in [self.log_path, *Path(self.temp_dir).glob("session_latest/logs/ray_process_exit.log")]:
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop(self, remove_temp_dir: bool = True) -> None:
        """SIGTERM `ray start --block` (it shuts its node down), then SIGKILL whatever of ours is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for _ in range(3):
            left = marked_processes(self.temp_dir)
            if not left:
                break
            for p in left:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(left, timeout=10)
        if remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
