"""cluster/README.md section 10, "A dry run on one machine", run as written (it is also the test of `ray job
submit` through cluster/submit.sh: the job joins the head, and its tables hold one row per pool image): its bash block is read from the README,
so the two cannot drift apart.

The block runs in one bash process, command after command, from a copy of the repository (what a new user has:
the tracked and non-ignored files, no runs/). Its `pip install` line is not run (it would reinstall this
environment under the other tests' feet); the test checks instead that what it asks for is installed. What the
README leaves to the machine is chosen as the README says: free ports and a fresh short temp dir exported before
the block, and the token in a file of the test's own named by RAY_AUTH_TOKEN_PATH (so ~/.ray is left alone).
CI exports RAY_AUTH_MODE=disabled; the block's own `export RAY_AUTH_MODE=token` overrides it, so the head runs with
token authentication on, as a head does by default once a token exists.

While the head is up (the block is fed to bash up to its stop command), the test also checks what a user without
the token meets: submit.sh without a token, or with another one, stops in one line before anything is submitted,
and so does a loft-dist command joining the cluster; with the token in RAY_AUTH_TOKEN_PATH and
RAY_AUTH_MODE=disabled it joins. Then the block's stop command runs, and no process of the head may be left. The
token may appear in no log, no config dump and no run file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from local_ray_cluster import marked_processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"
MARKER = "LOFT_DIST_README_DRY_RUN"
PHASES = ["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]
BLOCK_TIMEOUT_S = 1200  # a safety net for a hung head or job, not a timing assertion
PLACES = ("~/.ray/auth_token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


def section_10_block() -> list[str]:
    """The lines of the one bash block of section 10."""
    text = README.read_text()
    section = text[text.index("## 10. "):text.index("## 11. ")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"section 10 of {README} should hold one bash block, found {len(blocks)}"
    return blocks[0].rstrip("\n").split("\n")


def split_block(lines: list[str]) -> tuple[str, str, str]:
    """(the pip install line, the commands up to the stop command, the stop command)."""
    pip, *rest = lines
    assert pip.startswith("pip install "), f"the block should start with its pip install line, not {pip!r}"
    stops = [i for i, line in enumerate(rest) if line.startswith("kill $HEAD_PID")]
    assert stops == [len(rest) - 1], "the block should end with the one command that stops its head"
    return pip, "\n".join(rest[:-1]) + "\n", rest[-1] + "\n"


def test_section_10_block_is_self_contained():
    """The parts the test relies on: a head in token mode of its own, stopped by its own pid, never `ray stop`."""
    pip, body, stop = split_block(section_10_block())
    assert "export RAY_AUTH_MODE=token" in body
    assert "ray start --head --block" in body and "HEAD_PID=$!" in body
    for var in ("GCS_PORT", "DASHBOARD_PORT", "AGENT_PORT", "RAY_TEMP"):
        assert f"{var}=${{{var}:-" in body, f"{var} must be overridable from the environment (README: how to choose)"
    assert "ray stop" not in body + stop
    assert "cluster/submit.sh configs/tiny.yaml" in body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_repository(dest: Path) -> Path:
    """The tracked and non-ignored files of the working tree: a fresh checkout, with the code under test."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "__pycache__",
                                                                  ".pytest_cache", ".benchmarks"))
        return dest
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@dataclass
class DryRun:
    repo: Path
    env: dict
    token: str
    log: Path
    shell: subprocess.Popen | None = None
    submit_output: str = ""
    stopped: bool = False
    failed_commands: list[str] = field(default_factory=list)

    @property
    def marker(self) -> str:
        return self.env[MARKER]

    @property
    def temp_dir(self) -> Path:
        return Path(self.env["RAY_TEMP"])

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.env['DASHBOARD_PORT']}"

    def run(self, script: str, label: str, timeout: float) -> str:
        """Feed `script` to the shell; return what it printed meanwhile. Failed commands are recorded (ERR trap)."""
        start = self.log.stat().st_size
        done = f"@@done {label} {uuid.uuid4().hex}"
        self.shell.stdin.write(f"{script}echo '{done}'\n")
        self.shell.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.log.read_bytes()[start:].decode(errors="replace")
            if done in out:
                self.failed_commands += re.findall(r"^@@failed (.*)$", out, re.M)
                return out
            if self.shell.poll() is not None:
                raise AssertionError(f"the shell exited ({self.shell.returncode}) during {label}:\n{out[-4000:]}")
            time.sleep(1.0)
        raise AssertionError(f"{label} did not finish within {timeout:.0f} s:\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = [f"--- shell output\n{self.log.read_text(errors='replace')[-6000:]}"]
        logs = [Path(f"{self.temp_dir}.log")]
        session_logs = self.temp_dir / "session_latest" / "logs"
        for pattern in ("runtime_env_setup-*.log", "runtime_env_agent.log", "job-driver-*.log",
                        "ray_process_exit.log"):
            logs += sorted(session_logs.glob(pattern))
        for path in logs:
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def stop(self, stop_command: str) -> str:
        """The README's stop command, then the shell's exit."""
        out = self.run(stop_command, "stop", timeout=180)
        self.stopped = True
        self.shell.stdin.write("exit\n")
        self.shell.stdin.flush()
        self.shell.wait(timeout=60)
        return out

    def kill_leftovers(self) -> list[str]:
        """SIGKILL whatever of this dry run is still alive; returns what that was."""
        if self.shell is not None and self.shell.poll() is None:
            try:
                os.killpg(self.shell.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = marked_processes(self.marker, MARKER)
        names = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left if p.is_running()]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        return names


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if importlib.util.find_spec("aiohttp") is None:
        pytest.skip('the Ray job API needs the dashboard: pip install "ray[default]" (the dev extra lists it)')
    pip, body, stop = split_block(section_10_block())
    work = tmp_path_factory.mktemp("readme_dry_run")
    repo = copy_repository(work / "repo")
    token = secrets.token_hex(32)
    token_file = work / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({
        MARKER: uuid.uuid4().hex,
        # this environment's `ray` and `python3` first (a venv that borrows the system's packages)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "GCS_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()), "AGENT_PORT": str(free_port()),
        # short: Ray's Unix socket paths live under it
        "RAY_TEMP": tempfile.mkdtemp(prefix="rt", dir="/tmp"),
    })
    run = DryRun(repo=repo, env=env, token=token, log=work / "shell.log")
    with open(run.log, "w") as log:
        run.shell = subprocess.Popen(["bash", "--noprofile", "--norc", "-s"], stdin=subprocess.PIPE, text=True,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env,
                                     start_new_session=True)
    try:
        run.run("trap 'echo \"@@failed rc=$? $BASH_COMMAND\"' ERR\n", "trap", timeout=30)
        run.submit_output = run.run(body, "section 10 up to the stop", timeout=BLOCK_TIMEOUT_S)
        yield run
        if not run.stopped:
            run.stop(stop)
    finally:
        run.kill_leftovers()  # the stop test asserts there are none; this only keeps a failed run from leaking
        shutil.rmtree(env["RAY_TEMP"], ignore_errors=True)
        Path(f"{env['RAY_TEMP']}.log").unlink(missing_ok=True)


def test_pip_line_asks_for_what_is_installed():
    pip, _, _ = split_block(section_10_block())
    assert '"ray[default]==2.60.0"' in pip and '".[dev]"' in pip
    import ray

    assert ray.__version__ == "2.60.0"
    assert importlib.util.find_spec("aiohttp") is not None, "ray[default] (the dashboard) is not installed"
    assert importlib.util.find_spec("loft_dist") is not None


def test_readme_dry_run_submits_the_tiny_config_with_token_auth_on(dry_run):
    output = dry_run.submit_output
    assert not dry_run.failed_commands, f"commands of section 10 failed: {dry_run.failed_commands}\n" \
                                        + dry_run.diagnostics()
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), dry_run.diagnostics()
    with urllib.request.urlopen(f"{dry_run.dashboard_url}/api/authentication_mode", timeout=30) as r:
        assert json.load(r)["authentication_mode"] == "token", "the README's head must run with token auth on"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dry_run.dashboard_url}/api/version", timeout=30)
    assert refused.value.code == 401

    # The job's driver joined this head (RAY_ADDRESS from the job; run.ray_address unset), not a Ray of its own.
    assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{dry_run.env['GCS_PORT']}\b", output), \
        output[-4000:]

    run_dir = dry_run.repo / "runs" / "job"
    assert json.loads((run_dir / "state.json").read_text())["completed"] == PHASES
    assert '"completed"' in output and '"r1.eval"' in output, "`cat runs/job/state.json` printed nothing"
    report = (run_dir / "report" / "report.md").read_text()
    assert "zero-shot" in report and report.strip().splitlines()[0] in output, "`cat runs/job/report/report.md`"
    pool = sorted(_ids(run_dir / "data" / "unlabeled"))
    for r in (0, 1):  # the actor pool wrote one row per pool image, and the table's _SUCCESS says how many
        table = run_dir / "rounds" / f"r{r}" / "pseudo_labels"
        ids = _ids(table)
        assert len(ids) == len(set(ids)) and sorted(ids) == pool, f"round {r}: not one row per pool image"
        assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
    ckpt = run_dir / "rounds" / "r1" / "checkpoint"
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((ckpt / "train_state.json").read_text())["epoch"] == 0
    assert 0.0 <= json.loads((run_dir / "rounds" / "r1" / "metrics.json").read_text())["test"]["accuracy"] <= 1.0


def _ids(directory: Path) -> list[int]:
    import pyarrow.parquet as pq

    return pq.read_table(sorted(str(p) for p in directory.glob("*.parquet")), columns=["id"]).column("id").to_pylist()


def _submit(dry_run, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in dry_run.env.items() if not k.startswith("RAY_AUTH_") and k != MARKER}
    env.update({"RAY_ADDRESS": dry_run.dashboard_url, "RAY_AUTH_MODE": "disabled", **env_extra})
    return subprocess.run(["bash", "cluster/submit.sh", "configs/tiny.yaml", "run.storage_path=/tmp/never",
                           "run.name=no-token"], cwd=dry_run.repo, env=env, capture_output=True, text=True,
                          timeout=120)


def _jobs(dry_run) -> list:
    request = urllib.request.Request(f"{dry_run.dashboard_url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {dry_run.token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def test_submit_without_the_token_fails_in_one_line(dry_run, tmp_path):
    before = len(_jobs(dry_run))
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    done = _submit(dry_run, HOME=str(home))
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: the Ray cluster at {dry_run.dashboard_url} uses token authentication and no "
                               f"token was found"), lines[0]
    assert all(p in lines[0] for p in PLACES), lines[0]

    wrong = _submit(dry_run, HOME=str(home), RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
    assert "rejected the token from RAY_AUTH_TOKEN" in wrong.stderr
    assert len(_jobs(dry_run)) == before, "a submission without the right token must not reach the cluster"


_JOIN = """
import sys
from types import SimpleNamespace
from loft_dist.errors import LoftError
from loft_dist.runtime import init_ray
try:
    init_ray(SimpleNamespace(ray_address=sys.argv[1], num_cpus=1, object_store_mb=100))
except LoftError as e:
    print(f"loft-dist: error: {e}", file=sys.stderr)
    sys.exit(2)
import ray
print("joined", ray.cluster_resources().get("CPU"))
"""


def test_loft_dist_joins_with_the_token_and_names_where_it_belongs_without(dry_run, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in dry_run.env.items() if not k.startswith("RAY_AUTH_") and k != MARKER}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled")
    address = f"127.0.0.1:{dry_run.env['GCS_PORT']}"
    without = subprocess.run([sys.executable, "-c", _JOIN, address], cwd=dry_run.repo, env=env, capture_output=True,
                             text=True, timeout=120)
    assert without.returncode == 2, without
    (line,) = [x for x in without.stderr.splitlines() if x.startswith("loft-dist: error:")]
    assert f"run.ray_address={address}: the Ray cluster there uses token authentication" in line
    assert all(p in line for p in PLACES), line

    env["RAY_AUTH_TOKEN_PATH"] = dry_run.env["RAY_AUTH_TOKEN_PATH"]
    joined = subprocess.run([sys.executable, "-c", _JOIN, address], cwd=dry_run.repo, env=env, capture_output=True,
                            text=True, timeout=180)
    assert joined.returncode == 0 and "joined 4.0" in joined.stdout, joined.stderr[-3000:]
    assert dry_run.token not in joined.stdout + joined.stderr + without.stdout + without.stderr


def test_stop_command_stops_the_head_and_no_token_was_written(dry_run):
    _, _, stop = split_block(section_10_block())
    out = dry_run.stop(stop)
    # `wait` returns `ray start`'s own status, 1 after the SIGTERM that stopped it (as the README says)
    failed = [c for c in re.findall(r"^@@failed (.*)$", out, re.M) if not re.fullmatch(r"rc=1 wait \$HEAD_PID", c)]
    assert not failed, out
    deadline = time.monotonic() + 60  # workers notice their raylet is gone within seconds
    while marked_processes(dry_run.marker, MARKER) and time.monotonic() < deadline:
        time.sleep(2)
    left = dry_run.kill_leftovers()
    assert not left, f"processes of the README's head outlived `{stop.strip()}`: {left}"

    token = dry_run.token.encode()
    places = [dry_run.log, Path(f"{dry_run.temp_dir}.log"), dry_run.temp_dir, dry_run.repo / "runs"]
    files = [p for place in places for p in ([place] if place.is_file() else place.rglob("*")) if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".log" for p in files)
    leaks = [str(p) for p in files if token in p.read_bytes()]
    assert not leaks, f"the cluster's token was written to {leaks}"
