"""The GPU kit (bench/gpu/): its CPU profile end to end, and the offline installer's choice of wheels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "bench" / "gpu"


def _env(**extra) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~40 s of CPU on 2 quiet cores (4 processes: torch + open_clip imports dominate)
def test_cpu_profile_writes_every_part_with_positive_rates(tmp_path):
    run = subprocess.run([sys.executable, str(KIT / "kit.py"), "--cpu", "--out", str(tmp_path)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=580)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_kit.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"score-fp32", "score-bf16", "step-adaptformer", "step-lora"}
    assert all(v["status"] == "ok" for v in parts.values())

    def rate(r):
        assert math.isfinite(r["images_s"]) and r["images_s"] > 0 and r["iters"] >= 1
        return r["images_s"]

    for prec in ("fp32", "bf16"):
        v = parts[f"score-{prec}"]
        assert v["precision"] == prec
        assert v["ratio_scorer_vs_peak"] == pytest.approx(rate(v["scorer"]) / rate(v["peak"]))
    for method in ("adaptformer", "lora"):
        v = parts[f"step-{method}"]
        assert v["method"] == method and v["trainable"]["trainable"] > 0
        assert v["engine"]["module_dtype"] == "torch.float32"  # bf16 = autocast on fp32 weights, no module cast
        assert v["engine"]["optimizer"] == "SGD"  # the torch optimizer itself, no DeepSpeed wrapper
        for row in v["micro"].values():
            for path in ("plain_autocast", "plain_bf16_weights", "engine", "loop"):
                rate(row[path])
            assert row["ratio_engine_vs_plain"] == pytest.approx(
                row["engine"]["s_per_iter"] / row["plain_autocast"]["s_per_iter"])
    s = report["summary"]
    assert {"scoring_vs_peak_fp32", "scoring_vs_peak_bf16", "bf16_speedup_peak", "bf16_speedup_scorer"} <= set(s)
    assert set(s["engine_vs_plain"]) == {"adaptformer", "lora"}
    md = (tmp_path / "gpu_kit.md").read_text()
    assert "| part | path | images/s |" in md and "DeepSpeed engine" in md and "Scorer.__call__" in md
    assert "_train_epoch" in md


def _fake_wheel(directory: Path, name: str, version: str, requires: list[str]) -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n\nA description.\nRequires-Dist: not-a-header\n"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   meta.format(name, version, "\n".join(f"Requires-Dist: {r}" for r in requires)))
    return path


def _dry_run(wheels: Path, *roots: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KIT / "install.py"), "--wheels", str(wheels), "--target",
                           str(wheels / "site"), "--roots", *roots, "--dry-run"],
                          capture_output=True, text=True, timeout=60)


def test_installer_takes_roots_from_wheels_and_only_the_dependencies_this_machine_lacks(tmp_path):
    _fake_wheel(tmp_path, "kitroot_fake", "1.0", ["kitdep-fake>=2", "numpy", "kitnever_fake; python_version < '3'",
                                                  "kitextra_fake; extra == 'docs'"])
    _fake_wheel(tmp_path, "kitdep_fake", "2.1", ["kitleaf-fake"])
    _fake_wheel(tmp_path, "kitleaf_fake", "0.1", [])
    _fake_wheel(tmp_path, "numpy", "0.0.1", [])  # the machine's numpy satisfies "numpy": never installed
    run = _dry_run(tmp_path, "kitroot_fake")
    assert run.returncode == 0, run.stderr
    would = [line.split()[-1] for line in run.stdout.splitlines() if "would install" in line]
    assert would == ["kitroot_fake-1.0-py3-none-any.whl", "kitdep_fake-2.1-py3-none-any.whl",
                     "kitleaf_fake-0.1-py3-none-any.whl"]
    assert "numpy" in run.stdout.split("already here:")[1] and "missing" not in run.stdout


def test_installer_warns_of_what_nobody_satisfies_and_skips_a_wheel_the_machine_would_clash_with(tmp_path):
    _fake_wheel(tmp_path, "kitroot_fake", "1.0", ["kitdep-fake>=3", "kitvision-fake"])
    _fake_wheel(tmp_path, "kitdep_fake", "2.1", [])  # too old for >=3
    _fake_wheel(tmp_path, "kitvision_fake", "0.26", ["numpy==0.0.1"])  # like torchvision pinning another torch
    run = _dry_run(tmp_path, "kitroot_fake")
    assert run.returncode == 0, run.stderr
    missing = [line for line in run.stdout.splitlines() if "WARNING missing" in line]
    assert len(missing) == 2
    assert "kitdep-fake>=3" in missing[0] and "carried 2.1" in missing[0]
    assert "kitvision-fake" in missing[1] and "numpy==0.0.1" in missing[1]
    assert [line for line in run.stdout.splitlines() if "would install" in line] == \
        ["  would install kitroot_fake-1.0-py3-none-any.whl"]


def test_installer_refuses_without_the_root_wheels(tmp_path):
    run = _dry_run(tmp_path, "kitroot_fake")
    assert run.returncode == 2 and "fetch_wheels.sh" in run.stderr and "kitroot_fake" in run.stderr


def test_run_sh_dry_run_lists_the_wheels_and_installs_nothing(tmp_path):
    _fake_wheel(tmp_path, "kitroot_fake", "1.0", [])
    site = tmp_path / "site"
    # run.sh passes the real roots: with only a fake wheel it must say which root wheels are absent
    run = subprocess.run(["bash", str(KIT / "run.sh"), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=_env(KIT_WHEELS=str(tmp_path), KIT_SITE=str(site)))
    assert run.returncode == 2 and "open_clip_torch" in run.stderr
    for name in ("open_clip_torch", "omegaconf", "deepspeed"):
        _fake_wheel(tmp_path, name, "99.0", [])
    run = subprocess.run(["bash", str(KIT / "run.sh"), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=_env(KIT_WHEELS=str(tmp_path), KIT_SITE=str(site)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("would install") == 3 and not site.exists()


def test_installer_unpacks_a_trimmed_tarball_with_the_dependencies_of_the_requested_extras(tmp_path, monkeypatch):
    import io
    import tarfile

    abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
    meta = ("Metadata-Version: 2.1\nName: kitray_fake\nVersion: 1.0\nRequires-Dist: kitdep-fake\n"
            "Requires-Dist: kitdata-fake; extra == \"data\"\nRequires-Dist: kitserve-fake; extra == \"serve\"\n\n")
    with tarfile.open(tmp_path / f"kitray_fake-1.0-{abi}-trimmed.tar.xz", "w:xz") as tar:
        for name, text in (("kitray_fake-1.0.dist-info/METADATA", meta), ("kitray_fake/__init__.py", "X = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    _fake_wheel(tmp_path, "kitdep_fake", "1.0", [])
    _fake_wheel(tmp_path, "kitdata_fake", "1.0", [])
    (tmp_path / "kitray_fake-1.0-cp27-trimmed.tar.xz").write_bytes(b"another Python's tarball: never read")
    run = _dry_run(tmp_path, "kitray_fake[data]")
    assert run.returncode == 0, run.stderr
    would = [line.split()[-1] for line in run.stdout.splitlines() if "would install" in line]
    assert would == [f"kitray_fake-1.0-{abi}-trimmed.tar.xz", "kitdep_fake-1.0-py3-none-any.whl",
                     "kitdata_fake-1.0-py3-none-any.whl"]  # not kitserve: its extra was not asked for
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("kit_install", KIT / "install.py")
    install = module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kit_install", install)  # its dataclass looks its module up
    spec.loader.exec_module(install)
    install.unpack(tmp_path / f"kitray_fake-1.0-{abi}-trimmed.tar.xz", tmp_path / "site")
    assert (tmp_path / "site" / "kitray_fake" / "__init__.py").read_text() == "X = 1\n"
