"""`prepare` of an image folder of many small files: Ray Data tasks (one per group of data.rows_per_shard rows)
against the driver alone, which is what prepare did before (issue 22: 200,000 small files, images/s on 2 cores).

Each side runs in its own fresh process on the same folder and writes its own dataset; the two datasets must be
byte for byte the same (dataset.json checksums). The parallel side starts Ray first, as `loft-dist prepare` does
for a split of 4 groups or more, and its time is reported beside the build's.

    python bench/prepare_folder.py                   # 200,000 files in 100 class dirs
    python bench/prepare_folder.py --n 5000 --no-record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, append_section, generated_pngs  # noqa: E402

CLASSES = 100


def make_folder(root: Path, n: int) -> None:
    pngs = generated_pngs(32)
    for i in range(n):
        d = root / f"class{i % CLASSES:03d}"
        if i < CLASSES:
            d.mkdir(parents=True)
        (d / f"{i:07d}.png").write_bytes(pngs[i % len(pngs)])


def child(folder: str, root: str, parallel: bool) -> dict:
    from loft_dist.config import load_config
    from loft_dist.data import prepare
    from loft_dist.runtime import init_ray

    cfg = load_config(None, [f"data.root={root}", "data.source=imagefolder", f"data.source_path={folder}",
                             "data.protocol=percent", "data.labeled_percent=10", "data.test_per_class=20",
                             "data.ood_ratio=0", "data.ood_test=0"])
    ray_s = 0.0
    if parallel:
        t0 = time.perf_counter()
        init_ray(cfg.run)
        ray_s = time.perf_counter() - t0
    else:
        prepare.PARALLEL_MIN_GROUPS = 1 << 62  # every split in the driver: the serial prepare
    t0 = time.perf_counter()
    info = prepare.prepare_dataset(cfg, force=True)
    return {"seconds": time.perf_counter() - t0, "ray_s": ray_s, "rows": sum(info["rows"].values()),
            "checksums": info["checksums"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*json.loads(a.child))))
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        make_folder(tmp / "folder", a.n)
        make_s = time.perf_counter() - t0
        res = {}
        for side in ("serial", "parallel"):
            out = subprocess.run([sys.executable, __file__, "--child",
                                  json.dumps([str(tmp / "folder"), str(tmp / side), side == "parallel"])],
                                 cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    s, q = res["serial"], res["parallel"]
    assert s["rows"] == q["rows"] == a.n and s["checksums"] == q["checksums"], "the two builds differ"
    body = f"""
An image folder of {a.n:,} generated 32 px PNGs (~1-3 kB each) in {CLASSES} class directories (written in
{make_s:.0f} s), prepared with the percent protocol (10 % labeled, 20 test images per class carved, no OOD):
every file is read once into one split. Each side in a fresh process; both write the same bytes (checksums equal).

| prepare | Ray start s | build s | images/s (build) | images/s (with Ray start) | vs driver alone |
|---|---:|---:|---:|---:|---:|
| driver alone (before issue 22) | – | {s['seconds']:.1f} | {a.n / s['seconds']:.0f} | {a.n / s['seconds']:.0f} | 1.00x |
| Ray Data tasks | {q['ray_s']:.1f} | {q['seconds']:.1f} | {a.n / q['seconds']:.0f} | {a.n / (q['seconds'] + q['ray_s']):.0f} | **{s['seconds'] / q['seconds']:.2f}x** ({s['seconds'] / (q['seconds'] + q['ray_s']):.2f}x with Ray start) |
"""
    print(body)
    if not a.no_record:
        append_section("Image-folder prepare: Ray Data tasks vs the driver alone (bench/prepare_folder.py)",
                       "python bench/prepare_folder.py", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
