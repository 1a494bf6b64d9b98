"""Scoring throughput: the actor-pool job (Ray Data → decode → Scorer actors → Parquet) against a plain
single-process PyTorch loop over the same Parquet shards, the same decode function and the same Scorer class;
scale-out with 1 and 2 actors. Also the memory of N vs 10N images (driver and actors, peak RSS).

    python bench/score_throughput.py                     # N = 40,000 (memory: 20,000 vs 200,000)
    python bench/score_throughput.py --n 4000 --no-record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, append_section, rss_mb, write_pool  # noqa: E402

EXTRA: list[str] = []
CLASSES = [f"class{i}" for i in range(10)]


def _cfg(tmp: Path, *extra: str):
    from loft_dist.config import load_config

    return load_config(None, [f"run.storage_path={tmp}", "scoring.batch_size=512", "scoring.shards_per_chunk=0",
                              "scoring.torch_threads=1", *extra])


def plain_loop(paths: list[str], threads: int, batch: int = 512) -> float:
    """rows/s of read → decode → score in one process (the Scorer class called directly)."""
    import pyarrow.parquet as pq
    import torch

    from loft_dist.config import to_dict
    from loft_dist.data.transforms import decode_batch
    from loft_dist.scoring.scorer import Scorer

    torch.set_num_threads(threads)
    cfg = _cfg(Path(tempfile.mkdtemp()), f"scoring.torch_threads={threads}")
    scorer = Scorer(to_dict(cfg), CLASSES, "zero_shot")
    rows, t0 = 0, time.perf_counter()
    for p in paths:
        for b in pq.ParquetFile(p).iter_batches(batch_size=batch, columns=["id", "image", "true_label"]):
            d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in b.schema.names}
            out = scorer(decode_batch(d, "clean", cfg.data.image_size))
            rows += out.num_rows
    return rows / (time.perf_counter() - t0)


def actor_pool(paths: list[str], actors: int, tmp: Path) -> tuple[float, float]:
    """(seconds end to end, rows) of the scoring job with `actors` actors (Ray already initialised)."""
    from loft_dist.data.store import count_rows
    from loft_dist.scoring.job import score_shards

    cfg = _cfg(tmp, f"scoring.min_actors={actors}", f"scoring.max_actors={actors}", *EXTRA)
    out = tmp / f"out-{actors}-{time.time_ns()}"
    t0 = time.perf_counter()
    rows = score_shards(cfg, paths, str(out), class_names=CLASSES, mode="zero_shot")
    assert rows == count_rows(paths)
    return time.perf_counter() - t0, rows


def memory_child(n: int, root: str) -> dict:
    """Score n rows with 1 actor; sample the RSS of this driver and of every Ray worker process."""
    import psutil
    import ray

    from loft_dist.runtime import configure_ray_data

    tmp = Path(root)
    paths = write_pool(tmp / "pool", n, shards=max(4, n // 5000))
    ray.init(num_cpus=4, object_store_memory=400 * 2**20, include_dashboard=False)
    configure_ray_data()
    peak = {"driver": 0.0, "actor": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["driver"] = max(peak["driver"], rss_mb())
            for p in psutil.process_iter(["cmdline"]):
                if "Scorer" in " ".join(p.info["cmdline"] or []):
                    try:
                        peak["actor"] = max(peak["actor"], p.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    secs, rows = actor_pool(paths, 1, tmp)
    stop.set()
    th.join()
    ray.shutdown()
    return {"n": n, "rows": rows, "seconds": secs, "driver_peak_mb": peak["driver"], "actor_peak_mb": peak["actor"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--mem-n", type=int, default=20_000)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(memory_child(a.child, a.root)))
        return 0

    import ray

    from loft_dist.runtime import configure_ray_data

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_pool(tmp / "pool", a.n, shards=16)
        plain2 = plain_loop(paths, threads=2)
        plain1 = plain_loop(paths, threads=1)
        ray.init(num_cpus=4, object_store_memory=400 * 2**20, include_dashboard=False)
        configure_ray_data()
        startup, _ = actor_pool(paths[:1][:1], 1, tmp)  # one shard: mostly pipeline + actor start-up
        small = startup / (a.n / 16)
        res = {}
        for k in (1, 2):
            secs, rows = actor_pool(paths, k, tmp)
            res[k] = {"seconds": secs, "rows_s": rows / secs,
                      "steady_rows_s": (rows - a.n / 16) / max(secs - startup, 1e-9)}
        ray.shutdown()
    mem = []
    for n in (a.mem_n, a.mem_n * 10):
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--root", d], cwd=REPO,
                                 capture_output=True, text=True, check=True)
            mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratio_plain = res[1]["steady_rows_s"] / plain2
    line = (f"score N={a.n}: plain loop {plain2:.0f} rows/s (2 threads), {plain1:.0f} (1 thread); actor pool 1 actor "
            f"{res[1]['rows_s']:.0f} rows/s end to end, {res[1]['steady_rows_s']:.0f} steady "
            f"({ratio_plain:.2f}x plain); 2 actors {res[2]['rows_s']:.0f} / {res[2]['steady_rows_s']:.0f}; "
            f"start-up {startup:.1f} s; memory {mem[0]['n']}→{mem[1]['n']}: driver {mem[0]['driver_peak_mb']:.0f}→"
            f"{mem[1]['driver_peak_mb']:.0f} MB ({mem[1]['driver_peak_mb'] / mem[0]['driver_peak_mb']:.2f}x), actor "
            f"{mem[0]['actor_peak_mb']:.0f}→{mem[1]['actor_peak_mb']:.0f} MB "
            f"({mem[1]['actor_peak_mb'] / max(mem[0]['actor_peak_mb'], 1):.2f}x)")
    print(line)
    if not a.no_record:
        body = f"""
Tiny open_clip ViT (random init) at 32 px, generated 32 px PNGs in 16 zstd Parquet shards, zero-shot scoring,
batch 512. "Steady" excludes the pipeline start-up (measured as the time to score one shard, {startup:.1f} s).

| path | rows/s end to end | rows/s steady | vs plain loop (2 threads) |
|---|---:|---:|---:|
| plain PyTorch loop, 2 threads | {plain2:.0f} | {plain2:.0f} | 1.00x |
| plain PyTorch loop, 1 thread | {plain1:.0f} | {plain1:.0f} | {plain1 / plain2:.2f}x |
| actor pool, 1 actor (0.5 CPU, 1 torch thread) | {res[1]['rows_s']:.0f} | {res[1]['steady_rows_s']:.0f} | {ratio_plain:.2f}x |
| actor pool, 2 actors | {res[2]['rows_s']:.0f} | {res[2]['steady_rows_s']:.0f} | {res[2]['steady_rows_s'] / plain2:.2f}x |

Memory, scoring N and 10N images with 1 actor (peak RSS, sampled every 0.2 s):

| images | seconds | driver peak MB | actor peak MB |
|---:|---:|---:|---:|
| {mem[0]['n']} | {mem[0]['seconds']:.1f} | {mem[0]['driver_peak_mb']:.0f} | {mem[0]['actor_peak_mb']:.0f} |
| {mem[1]['n']} | {mem[1]['seconds']:.1f} | {mem[1]['driver_peak_mb']:.0f} | {mem[1]['actor_peak_mb']:.0f} |
| ratio 10N/N | | {mem[1]['driver_peak_mb'] / mem[0]['driver_peak_mb']:.2f} | {mem[1]['actor_peak_mb'] / max(mem[0]['actor_peak_mb'], 1):.2f} |

Result line: `{line}`
"""
        append_section("Scoring throughput and memory (actor pool vs plain loop)",
                       "python bench/score_throughput.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
