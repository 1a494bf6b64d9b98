"""Store a generated pool of small PNGs as Parquet shards, then stream it through the decode step and measure
images/s and the driver's peak memory, for N and for 10 x N images.

Each size runs in its own subprocess, so each peak RSS is that run's own. The claim checked: streaming
(read_split → map_batches(decode_batch) → iter_batches) keeps the driver's memory flat as the pool grows
(target: peak at 10 x N within 1.2 x the peak at N).

    python bench/prepare_stream.py                  # N = 20,000 and 200,000; appends to BENCHMARKS.md
    python bench/prepare_stream.py --n 2000 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DISTINCT, REPO, generated_pngs, rss_mb, versions  # noqa: E402


def child(n: int, size: int, root: str, batch_size: int) -> dict:
    """One measured run: write the pool, then stream it once; returns the figures."""
    from loft_dist.data.store import read_split, write_split

    pngs = generated_pngs(size)
    rows = ({"id": i, "image": pngs[i % DISTINCT], "label": -1, "true_label": i % 10, "source": f"gen:{i}"}
            for i in range(n))
    t0 = time.perf_counter()
    written = write_split(rows, root, "unlabeled", rows_per_shard=2048, target_mb=128)
    prepare_s = time.perf_counter() - t0

    import ray

    from loft_dist.data.transforms import decode_batch
    from loft_dist.runtime import configure_ray_data

    ray.init(num_cpus=2, object_store_memory=1024 * 2**20, include_dashboard=False, log_to_driver=False)
    configure_ray_data()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    rss_before = rss_mb()
    peak = {"rss": rss_before}
    stop = threading.Event()

    def sample() -> None:  # the sampled peak during streaming, beside ru_maxrss (the whole process's peak)
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ds = read_split(root, "unlabeled", columns=["id", "image"]).map_batches(
        decode_batch, fn_kwargs={"view": "clean", "image_size": size}, batch_format="numpy", batch_size=batch_size,
        num_cpus=1)
    t0 = time.perf_counter()
    first, seen, bad = None, 0, 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if first is None:
            first = time.perf_counter() - t0
        seen += len(batch["id"])
        bad += int((batch["error"] != "").sum())
    stream_s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    ray.shutdown()
    assert seen == n and bad == 0, (seen, bad)
    return {"n": n, "shards": written["shards"], "store_mb": written["bytes"] / 2**20,
            "prepare_img_s": n / prepare_s, "stream_img_s": n / stream_s,
            "steady_img_s": (n - batch_size) / max(stream_s - first, 1e-9), "first_batch_s": first,
            "stream_s": stream_s, "rss_before_mb": rss_before, "rss_peak_sampled_mb": peak["rss"],
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.size, args.root, args.batch_size)))
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="prepare_stream-") as tmp:
        for n in (args.n, args.n * args.scale):
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--size", str(args.size), "--batch-size",
                   str(args.batch_size), "--root", os.path.join(tmp, f"n{n}")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    a, b = results
    ratio = b["ru_maxrss_mb"] / a["ru_maxrss_mb"]
    sampled = b["rss_peak_sampled_mb"] / a["rss_peak_sampled_mb"]

    def fmt(r: dict) -> str:
        return (f"N={r['n']:,}: store {r['prepare_img_s']:,.0f} img/s ({r['shards']} shards, {r['store_mb']:.0f} MB), "
                f"stream {r['stream_img_s']:,.0f} img/s (steady {r['steady_img_s']:,.0f}, first batch "
                f"{r['first_batch_s']:.1f} s), driver peak RSS {r['ru_maxrss_mb']:,.0f} MiB "
                f"(sampled while streaming {r['rss_peak_sampled_mb']:,.0f}, before {r['rss_before_mb']:,.0f})")

    line = f"prepare_stream: {fmt(a)}; {fmt(b)}; peak ratio {args.scale}N/N = {ratio:.2f} (sampled {sampled:.2f})"
    print(line)
    if not args.no_record:
        command = "python bench/prepare_stream.py" + (f" --n {args.n}" if args.n != 20_000 else "")
        rows = "\n".join(
            f"| {r['n']:,} | {r['shards']} | {r['prepare_img_s']:,.0f} | {r['stream_img_s']:,.0f} | "
            f"{r['steady_img_s']:,.0f} | {r['first_batch_s']:.1f} | {r['rss_before_mb']:,.0f} | "
            f"{r['rss_peak_sampled_mb']:,.0f} | {r['ru_maxrss_mb']:,.0f} |" for r in results)
        section = f"""
## Store and stream a generated pool (bench/prepare_stream.py)

`{command}` — {time.strftime('%Y-%m-%d')}; {versions()}; machine: 2 cores, 24 GiB, no GPU.
{DISTINCT:,} distinct generated {args.size} px PNGs cycled into N rows; `write_split` (zstd, ≤ 2,048 rows per shard),
then `read_split → map_batches(decode_batch, clean view) → iter_batches({args.batch_size})` on a local Ray
(2 CPUs, 1 GiB object store), each size in its own process.

| images | shards | store img/s | stream img/s | steady img/s | first batch s | RSS before MiB | RSS peak streaming MiB | ru_maxrss MiB |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

Driver peak memory at {args.scale}×N / N: **{ratio:.2f}** (ru_maxrss), {sampled:.2f} (sampled during streaming);
target ≤ 1.2.
"""
        with open(REPO / "BENCHMARKS.md", "a") as f:
            if f.tell() == 0:
                f.write("# Benchmarks\n")
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
