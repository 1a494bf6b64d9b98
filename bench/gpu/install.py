"""Install the carried wheels the GPU machine lacks, offline, into a target directory (put first on PYTHONPATH).

The kit's roots (open_clip_torch, omegaconf, deepspeed; with --ray also ray[data,train] from the trimmed tarball
that fetch_ray.sh packs) always come from what is carried: the versions this repository is tested with. Each
dependency, read from the carried metadata, is taken from the machine when it has a version that satisfies the
requirement, else from a carried wheel; one that is neither is listed as missing (a warning: run.sh's import check
decides). Nothing is fetched: `pip install --no-index --no-deps --target`, and the tarball is unpacked there.

    python bench/gpu/install.py --wheels bench/gpu/wheels --target /tmp/site [--ray] [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # the machine's pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

ROOTS = ("open_clip_torch", "omegaconf", "deepspeed")
RAY_ROOT = "ray[data,train]"
ABI = f"cp{sys.version_info.major}{sys.version_info.minor}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    """One carried distribution: a wheel, or a trimmed tarball (ray-<version>-<abi>-trimmed.tar.xz)."""

    path: Path
    name: str
    version: str
    requires: list  # Requires-Dist lines


def _requires(meta: str) -> list[str]:
    headers = meta.split("\n\n", 1)[0]  # the headers, not the description
    return [line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith("Requires-Dist:")]


def _tar_metadata(path: Path) -> str:
    with tarfile.open(path, "r:xz") as tar:  # the dist-info comes first: only the start is decompressed
        for member in tar:
            if member.name.endswith(".dist-info/METADATA"):
                return tar.extractfile(member).read().decode("utf-8", "replace")
    raise ValueError(f"{path}: no .dist-info/METADATA inside")


def read_carried(directory: Path) -> dict[str, Dist]:
    """Canonical name → the carried distribution (its version and Requires-Dist from its own METADATA)."""
    found = {}
    for path in sorted(directory.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            found[canonical(name)] = Dist(path, name, version, _requires(z.read(meta).decode("utf-8", "replace")))
    for path in sorted(directory.glob(f"*-{ABI}-trimmed.tar.xz")):  # another Python's tarball cannot run here
        name, version = path.name.split("-")[:2]
        found[canonical(name)] = Dist(path, name, version, _requires(_tar_metadata(path)))
    return found


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _applies(req, extras=()) -> bool:
    """A requirement line applies unless its marker says otherwise for this interpreter and the requested extras."""
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def plan(carried: dict[str, Dist], roots=ROOTS) -> tuple[list[Dist], dict[str, str], list[str]]:
    """(distributions to install, dependencies the machine already satisfies → its version, unmet requirements)."""
    queue = [Requirement(r) for r in roots]
    forced = {canonical(r.name) for r in queue}
    install, present, missing, seen = [], {}, [], set()
    while queue:
        req = queue.pop(0)
        name = canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        have = installed(name)
        if name not in forced and have is not None and req.specifier.contains(have, prereleases=True):
            present[name] = have
            continue
        dist = carried.get(name)
        clash = clashes(dist, carried) if dist is not None else []
        if dist is not None and req.specifier.contains(dist.version, prereleases=True) and not clash:
            install.append(dist)
            deps = [Requirement(r) for r in dist.requires]
            queue += [Requirement(str(d).split(";")[0]) for d in deps if _applies(d, req.extras)]
        else:
            why = f"carried {dist.version}" + (f", which needs {'; '.join(clash)}" if clash else "") \
                if dist else "nothing carried"
            missing.append(f"{req} (this machine: {have or 'not installed'}; {why})")
    return install, present, missing


def clashes(dist: Dist, carried: dict[str, Dist]) -> list[str]:
    """Requirements of a carried distribution that the machine's installed version breaks and nothing carried
    mends, e.g. torchvision 0.26 (torch==2.11.0) on a machine with another torch: installing it would break it."""
    out = []
    for r in map(Requirement, dist.requires):
        if not _applies(r):
            continue
        have, other = installed(r.name), carried.get(canonical(r.name))
        if have is not None and not r.specifier.contains(have, prereleases=True) and \
                not (other is not None and r.specifier.contains(other.version, prereleases=True)):
            out.append(f"{r} (this machine: {have})")
    return out


def unpack(tarball: Path, target: Path) -> None:
    with tarfile.open(tarball, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--roots", nargs="+", default=list(ROOTS))
    ap.add_argument("--ray", action="store_true", help=f"also {RAY_ROOT} from the trimmed tarball")
    ap.add_argument("--dry-run", action="store_true", help="print what would be installed, install nothing")
    a = ap.parse_args()
    roots = [*a.roots, *([RAY_ROOT] if a.ray else [])]
    carried = read_carried(a.wheels) if a.wheels.is_dir() else {}
    absent = [r for r in roots if canonical(Requirement(r).name) not in carried]
    if absent:
        print(f"install: nothing carried for {', '.join(absent)} in {a.wheels} (Python {ABI}); run "
              f"bench/gpu/fetch_wheels.sh{' and fetch_ray.sh' if a.ray else ''} on a connected machine and carry "
              f"{a.wheels}", file=sys.stderr)
        return 2
    install, present, missing = plan(carried, roots)
    size = sum(d.path.stat().st_size for d in install)
    print(f"install: {len(install)} distributions ({size / 2**20:.1f} MiB carried) into {a.target}")
    for d in install:
        print(f"  would install {d.path.name}" if a.dry_run else f"  {d.path.name}")
    print("  already here: " + (", ".join(f"{n} {v}" for n, v in sorted(present.items())) or "nothing needed"))
    for m in missing:
        print(f"  WARNING missing: {m}")
    if a.dry_run:
        return 0
    a.target.mkdir(parents=True, exist_ok=True)
    for d in install:
        if d.path.name.endswith(".tar.xz"):
            unpack(d.path, a.target)
    wheels = [str(d.path) for d in install if d.path.suffix == ".whl"]
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--quiet",
           "--disable-pip-version-check", "--target", str(a.target), *wheels]
    return subprocess.run(cmd).returncode if wheels else 0


if __name__ == "__main__":
    sys.exit(main())
