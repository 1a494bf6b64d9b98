"""Token authentication without a Ray cluster: the manifests carry the token from a Secret to every Ray container and
the submitter; submit.sh (cluster/check_token.py) and init_ray find the token where Ray does, send it only where a
cluster asks for it, and stop with one line when it is missing or wrong. The real head with token auth on is
tests/cluster/test_readme_dry_run.py.

The job API is a small stdlib HTTP server that answers like Ray's dashboard (public /api/authentication_mode, 401
without a token, 403 with a wrong one); `ray` is a stub on PATH that records what submit.sh ran it with. The GCS is
a gRPC server with Ray's own NodeInfoGcsService stubs, in a subprocess, since joining switches the process's Ray
config to token mode.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SECRET = "loft-dist-ray-auth"
PLACES = ("~/.ray/auth_token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")


# ---------------------------------------------------------------- manifests


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_containers(manifest: dict) -> dict[str, dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    out = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for g in spec["workerGroupSpecs"]:
        out[f"worker group {g['groupName']}"] = g["template"]["spec"]["containers"][0]
    if manifest["kind"] == "RayJob":
        out["submitter"] = manifest["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    return out


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_manifest_carries_the_token_from_the_secret_to_every_ray_container(name):
    manifest = _load(name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}, "KubeRay must know the mode and the Secret"
    containers = _ray_containers(manifest)
    if manifest["kind"] == "RayJob":
        assert "submitter" in containers
    for where, c in containers.items():
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name} {where}: RAY_AUTH_MODE=token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref == {"name": SECRET, "key": "auth_token"}, f"{name} {where}: RAY_AUTH_TOKEN from the Secret"
        assert "value" not in env["RAY_AUTH_TOKEN"], f"{name} {where}: a token written into the manifest"


def test_submitter_pod_template_is_what_kuberay_runs():
    """KubeRay requires restartPolicy Never and fills in the command; the image is the cluster's (it has `ray`)."""
    job = _load("rayjob.yaml")
    pod = job["spec"]["submitterPodTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert "command" not in c and "args" not in c
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert c["image"] == head["image"]


def test_docs_create_the_secret_the_manifests_name():
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {SECRET} --from-literal=auth_token=" in readme
    for name in ("rayjob.yaml", "raycluster.yaml"):
        assert f"kubectl create secret generic {SECRET}" in (CLUSTER / name).read_text()


# ---------------------------------------------------------------- submit.sh against a fake job API


class _JobAPI(BaseHTTPRequestHandler):
    mode = "token"
    token = ""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/api/authentication_mode":
            return self._send(200, {"authentication_mode": self.mode})
        header = self.headers.get("Authorization", "")
        if self.mode == "token" and not header:
            return self._send(401, "Unauthorized: Missing authentication token")
        if self.mode == "token" and header != f"Bearer {self.token}":
            return self._send(403, "Forbidden: Invalid authentication token")
        return self._send(200, {"ray_version": "2.60.0"})

    def _send(self, status, body):
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def job_api():
    servers = []

    def start(mode: str, token: str = "") -> str:
        handler = type("Handler", (_JobAPI,), {"mode": mode, "token": token})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def fake_ray(tmp_path):
    """A `ray` on PATH that records its argv and RAY_AUTH_MODE instead of submitting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ray_call.json"
    script = bin_dir / "ray"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump({{'argv': sys.argv[1:], 'mode': os.environ.get('RAY_AUTH_MODE')}}, "
                      f"open({str(record)!r}, 'w'))\n")
    script.chmod(0o755)
    return bin_dir, record


def _submit(address: str, fake_ray, home: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    bin_dir, record = fake_ray
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "HOME": str(home), "RAY_ADDRESS": address,
                "RAY_AUTH_MODE": "disabled", **env_extra})  # CI exports RAY_AUTH_MODE=disabled: the cluster's wins
    done = subprocess.run(["bash", str(CLUSTER / "submit.sh"), "configs/tiny.yaml", "run.name=x"], env=env,
                          capture_output=True, text=True, timeout=60)
    return done, (json.loads(record.read_text()) if record.exists() else None)


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done
    assert done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def test_submit_sends_the_token_from_the_default_file(job_api, fake_ray, home):
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token + "\n")
    done, call = _submit(job_api("token", token), fake_ray, home)
    assert done.returncode == 0, done.stderr
    assert call["mode"] == "token", "ray job submit must run in token mode against a token cluster"
    assert call["argv"][:2] == ["job", "submit"] and token not in json.dumps(call["argv"])
    assert token not in done.stdout + done.stderr


def test_submit_prefers_ray_auth_token_then_the_path(job_api, fake_ray, home, tmp_path):
    token = secrets.token_hex(32)
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("stale-token")
    path = tmp_path / "tok"
    path.write_text(token)
    done, call = _submit(job_api("token", token), fake_ray, home, RAY_AUTH_TOKEN_PATH=str(path))
    assert done.returncode == 0 and call["mode"] == "token", done.stderr
    done, _ = _submit(job_api("token", token), fake_ray, home, RAY_AUTH_TOKEN_PATH=str(path), RAY_AUTH_TOKEN="wrong")
    assert "rejected the token from RAY_AUTH_TOKEN " in _one_line_error(done)


def test_submit_without_a_token_fails_in_one_line_naming_where_it_belongs(job_api, fake_ray, home):
    done, call = _submit(job_api("token", secrets.token_hex(32)), fake_ray, home)
    line = _one_line_error(done)
    assert call is None, "nothing may be submitted without the token"
    assert "uses token authentication and no token was found" in line
    assert all(p in line for p in PLACES), line
    assert str(home / ".ray" / "auth_token") in line


def test_submit_with_a_wrong_token_fails_in_one_line(job_api, fake_ray, home):
    token = secrets.token_hex(32)
    wrong = secrets.token_hex(32)
    done, call = _submit(job_api("token", token), fake_ray, home, RAY_AUTH_TOKEN=wrong)
    line = _one_line_error(done)
    assert call is None and "rejected the token from RAY_AUTH_TOKEN" in line and "HTTP 403" in line
    assert wrong not in line and token not in line


def test_submit_with_an_unreadable_token_path_fails_in_one_line(job_api, fake_ray, home, tmp_path):
    done, call = _submit(job_api("token", "t"), fake_ray, home, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"))
    line = _one_line_error(done)
    assert call is None and f"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'}: cannot read a token there" in line


def test_submit_to_a_cluster_without_auth_sends_no_token(job_api, fake_ray, home):
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    done, call = _submit(job_api("disabled"), fake_ray, home, RAY_AUTH_MODE="token")
    assert done.returncode == 0, done.stderr
    assert call["mode"] == "disabled"


def test_submit_to_nothing_fails_in_one_line(fake_ray, home):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done, call = _submit(f"http://127.0.0.1:{port}", fake_ray, home)
    assert call is None and "no Ray job API answers at" in _one_line_error(done)


# ---------------------------------------------------------------- init_ray against a fake GCS

_GCS_PROBE = r"""
import json, os, sys
from concurrent import futures
from types import SimpleNamespace

import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

TOKEN = sys.argv[1]

class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
    def __init__(self, token):
        self.token = token

    def GetClusterId(self, request, context):
        if self.token and dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: token missing or incorrect")
        return gcs_service_pb2.GetClusterIdReply()

servers, addresses = [], {}
for name, token in [("token", TOKEN), ("open", "")]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(token), server)
    addresses[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    servers.append(server)

from loft_dist.errors import ConfigError
from loft_dist.runtime import _send_token_if_asked
from ray._raylet import AuthenticationMode, get_authentication_mode

out = {}
for case, server, env in [("open", "open", {"RAY_AUTH_TOKEN_PATH": os.environ["HOME"] + "/tok"}),
                          ("none", "token", {}), ("wrong", "token", {"RAY_AUTH_TOKEN": "not-the-token"}),
                          ("bad_path", "token", {"RAY_AUTH_TOKEN_PATH": os.environ["HOME"] + "/missing"}),
                          ("right", "token", {"RAY_AUTH_TOKEN_PATH": os.environ["HOME"] + "/tok"})]:
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        _send_token_if_asked(addresses[server], "run.ray_address")
        out[case] = {"ok": True, "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN}
    except ConfigError as e:
        out[case] = {"error": str(e)}
for server in servers:
    server.stop(0)
print(json.dumps(out))
"""


def test_init_ray_sends_the_token_a_cluster_asks_for_and_names_where_it_belongs(tmp_path):
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    home.mkdir()
    (home / "tok").write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled")  # as in CI; the cluster's mode wins
    done = subprocess.run([sys.executable, "-c", _GCS_PROBE, token], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("none", "wrong", "bad_path"):
        msg = out[case]["error"]
        assert "\n" not in msg and msg.startswith("run.ray_address=127.0.0.1:"), msg
        assert all(p in msg for p in PLACES), msg
    assert "no token was found" in out["none"]["error"] and str(home / ".ray" / "auth_token") in out["none"]["error"]
    assert "rejected the token from RAY_AUTH_TOKEN" in out["wrong"]["error"]
    assert f"RAY_AUTH_TOKEN_PATH={home}/missing cannot be read" in out["bad_path"]["error"]
    assert out["open"] == {"ok": True, "token_mode": False}, "a cluster without auth gets no token"
    assert out["right"] == {"ok": True, "token_mode": True}
    assert token not in done.stdout + done.stderr
