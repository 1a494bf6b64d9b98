"""Safety properties of the package itself: nothing it reads is unpickled unless restricted, and a local Ray it
starts does not expose its dashboard beyond this machine. (Secrets: tests/faults/test_kill_driver.py runs with a fake
AWS_SECRET_ACCESS_KEY and searches the run dir for it; tests/cluster/test_readme_dry_run.py does so for the token.)"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "loft_dist"
# The one unpickler of the package: CIFAR's python pickles, through a find_class that admits numpy arrays only.
RESTRICTED_UNPICKLER = ("data/sources.py", "_RestrictedUnpickler")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, any pickle-family load, numpy
    loads with allow_pickle=True, yaml.load, and pickle.Unpickler subclasses that do not restrict find_class."""
    tree = ast.parse(source, filename)
    found = []

    def where(node) -> str:
        return f"{filename}:{node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append(f"{where(node)}: from {node.module} import {alias.name}")
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            if any(b.endswith("Unpickler") for b in bases):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if "find_class" not in methods:
                    found.append(f"{where(node)}: class {node.name}({', '.join(bases)}) does not restrict find_class")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        if owner == "torch" and name == "load":
            w = kwargs.get("weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                found.append(f"{where(node)}: torch.load without weights_only=True")
        elif owner in PICKLE_MODULES and name in ("load", "loads", "Unpickler"):
            found.append(f"{where(node)}: {owner}.{name}")
        elif owner in ("np", "numpy") and name == "load":
            a = kwargs.get("allow_pickle")
            if isinstance(a, ast.Constant) and a.value is True:
                found.append(f"{where(node)}: {owner}.load(allow_pickle=True)")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
            found.append(f"{where(node)}: yaml.{name}")
    return found


def test_scanner_sees_each_unsafe_form():
    bad = textwrap.dedent("""
        import pickle, torch, numpy as np, yaml
        from pickle import loads
        torch.load(p)
        torch.load(p, weights_only=False)
        pickle.load(f)
        pickle.loads(b)
        np.load(p, allow_pickle=True)
        yaml.load(s)
        class Open(pickle.Unpickler):
            pass
    """)
    assert len(unsafe_loads(bad)) == 8
    good = textwrap.dedent("""
        import torch, numpy as np
        torch.load(p, weights_only=True, map_location="cpu")
        np.load(p)
        class Closed(pickle.Unpickler):
            def find_class(self, module, name):
                raise pickle.UnpicklingError(name)
    """)
    assert unsafe_loads(good) == []


def test_package_reads_checkpoints_and_data_without_unrestricted_unpickling():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += unsafe_loads(path.read_text(), str(path.relative_to(PACKAGE)))
    assert found == [], "unrestricted unpickling in the package:\n" + "\n".join(found)
    rel, cls = RESTRICTED_UNPICKLER
    tree = ast.parse((PACKAGE / rel).read_text())
    (restricted,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls]
    assert "find_class" in {n.name for n in restricted.body if isinstance(n, ast.FunctionDef)}


_PROBE = """
import json, psutil, ray
from loft_dist.config import RunConfig
from loft_dist.runtime import init_ray
init_ray(RunConfig(num_cpus=1, object_store_mb=100))
out = []
for p in psutil.Process().children(recursive=True):
    try:
        cmd = p.cmdline()
        if any(a.endswith("dashboard/dashboard.py") for a in cmd):
            port = next(a.split("=", 1)[1] for a in cmd if a.startswith("--port="))
            listen = [c.laddr.ip for c in p.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and str(c.laddr.port) == port]
            out.append({"args": [a for a in cmd if a.startswith("--host=")], "listen": listen})
    except psutil.NoSuchProcess:
        pass
print("PROBE " + json.dumps(out))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_ray_dashboard_listens_on_localhost_only():
    """runtime.init_ray starting a local Ray: its dashboard (the job and state API; a full one when ray[default]
    is installed) binds 127.0.0.1, never an address other machines reach."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("PROBE ")]
    dashboards = json.loads(line[len("PROBE "):])
    assert dashboards, "no dashboard process found under the probe's Ray"
    for d in dashboards:
        assert d["args"] == ["--host=127.0.0.1"], d
        assert all(ip == "127.0.0.1" for ip in d["listen"]), d
