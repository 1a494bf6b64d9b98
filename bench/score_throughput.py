"""Scoring throughput: the actor-pool job (Ray Data → decode → Scorer actors → Parquet) against a plain
single-process PyTorch loop over the same Parquet shards, the same decode function and the same Scorer class;
scale-out with 1 and 2 actors; a large pool end to end, each side from a fresh process (`loft-dist score` as a
user runs it: rows, distinct ids, time to its first committed chunk). Also the memory of `loft-dist score` on the
large pool against a 10x smaller one (its driver and its actor, peak RSS). Shards hold 256 rows, as a prepared
pool's do (data.rows_per_shard), and the job runs with its default chunking (scoring.rows_per_chunk).

    python bench/score_throughput.py                     # N = 40,000, large pool 1,000,000, memory 100,000 vs 1,000,000
    python bench/score_throughput.py --n 4000 --big-n 20000 --mem-n 2000 --no-record
    python bench/score_throughput.py --cpu-split 200000   # only: core-µs per scored row by process, printed
    python bench/score_throughput.py --round0 100000      # only: round 0's two pool tables, one job vs two, printed
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, append_section, rss_mb, write_pool  # noqa: E402

ROWS_PER_SHARD = 256  # the store's default data.rows_per_shard
CLASSES = [f"class{i}" for i in range(10)]


def _cfg(tmp: Path, *extra: str):
    from loft_dist.config import load_config

    return load_config(None, [f"run.storage_path={tmp}", "scoring.batch_size=512", "scoring.torch_threads=1", *extra])


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


def plain_cold(paths: list[str], threads: int, tmp: Path) -> float:
    """Seconds of the plain loop as a user's script runs it: a fresh process that imports torch and open_clip,
    builds the model and scores every shard (the like-for-like of the job's actor, which does the same)."""
    listing = tmp / f"paths-{time.time_ns()}.json"
    listing.write_text(json.dumps(paths))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--plain-child", str(listing), "--threads", str(threads)], cwd=REPO,
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def actor_pool(paths: list[str], actors: int, tmp: Path) -> tuple[float, float]:
    """(seconds end to end, rows) of the scoring job with `actors` actors (Ray already initialised)."""
    from loft_dist.data.store import count_rows
    from loft_dist.scoring.job import score_shards

    cfg = _cfg(tmp, f"scoring.min_actors={actors}", f"scoring.max_actors={actors}")
    out = tmp / f"out-{actors}-{time.time_ns()}"
    t0 = time.perf_counter()
    rows = score_shards(cfg, paths, str(out), class_names=CLASSES, mode="zero_shot")
    assert rows == count_rows(paths)
    return time.perf_counter() - t0, rows


def cli_score(pool: Path, tmp: Path, *extra: str) -> dict:
    """`loft-dist score` on a pool dir as a user runs it (its own Ray, default chunking): seconds from the command to
    the first committed chunk and to the end, and the table's rows and distinct ids."""
    import pyarrow.parquet as pq

    out = tmp / f"cli-{time.time_ns()}"
    work = out.with_name(f".{out.name}.work")
    cmd = ["loft-dist", "score", "configs/tiny.yaml", f"data.root={tmp / 'no_dataset'}", f"scoring.input={pool}",
           f"scoring.output={out}", f"scoring.class_names=[{','.join(CLASSES)}]", "scoring.batch_size=512", "scoring.torch_threads=1",
           "run.object_store_mb=400", *extra]
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first, peak, polls = None, {"driver": 0.0, "actor": 0.0}, 0
    cpu, at_first = CpuByRole(proc.pid), {}
    while proc.poll() is None:
        if first is None and any(work.glob("chunk-*/_SUCCESS")):
            first = time.perf_counter() - t0
            at_first = cpu.sample()
        if polls % 4 == 0:  # every 0.2 s: CPU by role; RSS of the driver (the command's process) and each Scorer actor
            cpu.sample()
            try:
                peak["driver"] = max(peak["driver"], rss_mb(proc.pid))
            except psutil.Error:
                pass
            for q in psutil.process_iter(["cmdline"]):
                if "Scorer" in " ".join(q.info["cmdline"] or []):
                    try:
                        peak["actor"] = max(peak["actor"], q.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
        polls += 1
        time.sleep(0.05)
    total = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr.read()[-3000:])
    ids = pq.read_table(out, columns=["id"]).column("id")
    after = cpu.totals()
    return {"n": len(ids), "first_commit_s": first if first is not None else total, "seconds": total,
            "rows": len(ids), "distinct": len(ids.unique()), "driver_peak_mb": peak["driver"],
            "actor_peak_mb": peak["actor"], "cpu_s": after,
            "cpu_s_after_first": {k: v - at_first.get(k, 0.0) for k, v in after.items()}}


class CpuByRole:
    """CPU seconds (user + system) of every process on the machine since it was made, by role in a scoring job:
    the command (driver), the Scorer actor, the read + decode tasks' workers, and the rest (Ray's own processes,
    idle workers, anything else running). A process's last sample counts after it exits (≤ 0.2 s lost)."""

    def __init__(self, driver: int):
        import psutil

        self.driver, self.seen, self.role = driver, {}, {}
        self.base = {p.pid: sum(p.cpu_times()[:2]) for p in psutil.process_iter()}

    def sample(self) -> dict[str, float]:
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            try:
                line, t = " ".join(p.info["cmdline"] or []), sum(p.cpu_times()[:2])
            except psutil.Error:
                continue
            role = "driver" if p.pid == self.driver else "actor" if "Scorer" in line else \
                "decode" if "read_unit" in line else None
            if role or p.pid not in self.role:  # a task worker shows read_unit only while it runs one
                self.role[p.pid] = role or self.role.get(p.pid) or "rest"
            self.seen[p.pid] = t - self.base.get(p.pid, 0.0)
        return self.totals()

    def totals(self) -> dict[str, float]:
        out = dict.fromkeys(("driver", "actor", "decode", "rest"), 0.0)
        for pid, t in self.seen.items():
            out[self.role[pid]] += t
        return out


def cpu_split(n: int, *extra: str) -> str:
    """Where a core-second goes per scored row: `loft-dist score` of an n-row pool, CPU by role, whole run and after
    its first committed chunk, against the plain loop's (1 thread: one core)."""
    first_chunk = _cfg(Path(tempfile.gettempdir())).scoring.rows_per_chunk  # the job's default chunking (cli_score)
    if not first_chunk or n <= first_chunk:
        sys.exit(f"--cpu-split {n}: the pool must hold more than one chunk ({first_chunk} rows) to have a steady part")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_pool(tmp / "pool", n, shards=max(4, n // ROWS_PER_SHARD))
        plain1 = plain_loop(paths[: max(1, len(paths) // 10)], threads=1)
        r = cli_score(tmp / "pool", tmp, *extra)
    assert r["rows"] == r["distinct"] == n, r
    steady_rows = n - first_chunk
    steady_s = r["seconds"] - r["first_commit_s"]
    us = {k: 1e6 * v / steady_rows for k, v in r["cpu_s_after_first"].items()}
    return (f"cpu split N={n} {' '.join(extra)}: {r['seconds']:.1f} s, first chunk {r['first_commit_s']:.1f} s, steady "
            f"{steady_rows / steady_s:.0f} rows/s; core-us per row after the first chunk: "
            + ", ".join(f"{k} {v:.0f}" for k, v in us.items()) + f", all {sum(us.values()):.0f} "
            f"(2 cores cap {2e6 / sum(us.values()):.0f} rows/s); whole run CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items())
            + f"; plain loop 1 thread {plain1:.0f} rows/s = {1e6 / plain1:.0f} core-us per row")


def round0(n: int) -> str:
    """Round 0's two pool tables of an n-row pool (zero-shot, and round 1's: the same model as teacher) written by one
    job that reads and decodes each row once for both, against two jobs (zero-shot, then the teacher reading round
    0's table for the stage-1 MSP), as the round driver ran them before; both ways must write the same tables."""
    import numpy as np
    import pyarrow.parquet as pq
    import ray

    from loft_dist.runtime import configure_ray_data
    from loft_dist.scoring.job import score_tables

    def table(path: Path) -> dict:
        t = pq.read_table(path, columns=["id", "pred", "decision", "zs_msp"]).sort_by("id")
        return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_pool(tmp / "pool", n, shards=max(4, n // ROWS_PER_SHARD))
        cfg = _cfg(tmp)
        ray.init(object_store_memory=400 * 2**20, include_dashboard=False)
        configure_ray_data()

        def job(tables: dict, **kw) -> float:
            t0 = time.perf_counter()
            rows = score_tables(cfg, {k: (paths, str(tmp / k), mode) for k, mode in tables.items()},
                                class_names=CLASSES, **kw)
            assert set(rows.values()) == {n}, rows
            return time.perf_counter() - t0

        two = job({"a0": "zero_shot"}) + job({"a1": "teacher"}, zs_table=str(tmp / "a0"))
        one = job({"b0": "zero_shot", "b1": "teacher"})
        ray.shutdown()
        for x, y in (("a0", "b0"), ("a1", "b1")):
            a, b = table(tmp / x), table(tmp / y)
            assert all(np.array_equal(a[c], b[c]) for c in a), f"{x} and {y} differ"
    return (f"round 0's two pool tables, N={n}: one job {one:.1f} s ({2 * n / one:.0f} table rows/s), two jobs "
            f"{two:.1f} s ({2 * n / two:.0f} table rows/s): {two / one:.2f}x; the same tables both ways")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--big-n", type=int, default=1_000_000, help="the large pool, scored end to end by both sides")
    p.add_argument("--mem-n", type=int, default=100_000, help="memory: `loft-dist score` of this pool vs the large one")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--cpu-split", type=int, default=0, metavar="N",
                   help="only: CPU per scored row by process role, `loft-dist score` of an N-row pool (printed)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="--cpu-split: overrides for the command")
    p.add_argument("--round0", type=int, default=0, metavar="N",
                   help="only: round 0's two pool tables of an N-row pool, one job against two (printed)")
    p.add_argument("--plain-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain_child:
        plain_loop(json.loads(Path(a.plain_child).read_text()), threads=a.threads)
        return 0
    if a.cpu_split:
        print(cpu_split(a.cpu_split, *a.set))
        return 0
    if a.round0:
        print(round0(a.round0))
        return 0

    import ray

    from loft_dist.runtime import configure_ray_data

    shards = lambda n: max(4, n // ROWS_PER_SHARD)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = write_pool(tmp / "pool", a.n, shards=shards(a.n))
        big = write_pool(tmp / "big", a.big_n, shards=shards(a.big_n))
        plain2 = plain_loop(paths, threads=2)
        plain1 = plain_loop(paths, threads=1)
        cold2 = plain_cold(paths, 2, tmp)
        big_plain = plain_cold(big, 2, tmp)
        t0 = time.perf_counter()
        ray.init(object_store_memory=400 * 2**20, include_dashboard=False)  # num_cpus: the machine's, as `loft-dist score` starts it
        configure_ray_data()
        ray_init = time.perf_counter() - t0
        startup, _ = actor_pool(paths[:1], 1, tmp)  # one shard: mostly pipeline + actor start-up
        first = ROWS_PER_SHARD
        res = {}
        for k in (1, 2):
            secs, rows = actor_pool(paths, k, tmp)
            res[k] = {"seconds": secs, "rows_s": rows / secs,
                      "steady_rows_s": (rows - first) / max(secs - startup, 1e-9)}
        ray.shutdown()
        write_pool(tmp / "mem", a.mem_n, shards=shards(a.mem_n))
        mem = [cli_score(tmp / "mem", tmp), cli_score(tmp / "big", tmp)]
        for run, n in zip(mem, (a.mem_n, a.big_n)):
            assert run["rows"] == run["distinct"] == n, run  # exactly one row per image
        cli = mem[1]
        big_secs, big_rows = cli["seconds"], cli["rows"]
    n_cold = a.n / cold2
    ratio_steady = res[1]["steady_rows_s"] / plain2
    big_ratio = big_rows / big_secs / (a.big_n / big_plain)
    line = (f"score N={a.n}: plain loop {plain2:.0f} rows/s (2 threads), {plain1:.0f} (1 thread), {n_cold:.0f} from a "
            f"fresh process; actor pool 1 actor {res[1]['rows_s']:.0f} rows/s end to end "
            f"({res[1]['rows_s'] / n_cold:.2f}x the fresh plain process), {res[1]['steady_rows_s']:.0f} steady "
            f"({ratio_steady:.2f}x plain); 2 actors {res[2]['rows_s']:.0f} / {res[2]['steady_rows_s']:.0f}; start-up "
            f"{startup:.1f} s; N={a.big_n} end to end: plain {a.big_n / big_plain:.0f} rows/s, `loft-dist score` "
            f"{big_rows / big_secs:.0f} rows/s ({big_ratio:.2f}x), {big_rows} rows = distinct ids, first chunk committed "
            f"{cli['first_commit_s']:.1f} s after the command; memory {mem[0]['n']}→{mem[1]['n']}: driver "
            f"{mem[0]['driver_peak_mb']:.0f}→{mem[1]['driver_peak_mb']:.0f} MB "
            f"({mem[1]['driver_peak_mb'] / mem[0]['driver_peak_mb']:.2f}x), actor "
            f"{mem[0]['actor_peak_mb']:.0f}→{mem[1]['actor_peak_mb']:.0f} MB "
            f"({mem[1]['actor_peak_mb'] / max(mem[0]['actor_peak_mb'], 1):.2f}x)")
    print(line)
    if not a.no_record:
        body = f"""
Tiny open_clip ViT (random init) at 32 px, generated 32 px PNGs in zstd Parquet shards of {ROWS_PER_SHARD} rows (a
prepared pool's shard size), zero-shot scoring, batch 512, the job's default chunking (scoring.rows_per_chunk). The
plain loop is the same decode function and Scorer class in one process; *in process* times its loop alone,
*fresh process* a whole `python` run of it (torch + open_clip import and model build included, as the job's actor
pays them). "Steady" excludes the job's start-up (measured as the time to score one shard: {startup:.1f} s; Ray
itself was started before, in {ray_init:.1f} s, and is not counted on either side).

| path | rows/s end to end | rows/s steady | vs plain loop (2 threads) |
|---|---:|---:|---:|
| plain PyTorch loop, 2 threads, in process | {plain2:.0f} | {plain2:.0f} | 1.00x |
| plain PyTorch loop, 1 thread, in process | {plain1:.0f} | {plain1:.0f} | {plain1 / plain2:.2f}x |
| plain PyTorch loop, 2 threads, fresh process | {n_cold:.0f} | | |
| actor pool, 1 actor (0.5 CPU, 1 torch thread) | {res[1]['rows_s']:.0f} ({res[1]['rows_s'] / n_cold:.2f}x fresh plain) | {res[1]['steady_rows_s']:.0f} | **{ratio_steady:.2f}x** |
| actor pool, 2 actors | {res[2]['rows_s']:.0f} ({res[2]['rows_s'] / n_cold:.2f}x fresh plain) | {res[2]['steady_rows_s']:.0f} | {res[2]['steady_rows_s'] / plain2:.2f}x |

A pool of {a.big_n:,} images ({shards(a.big_n)} shards, {math.ceil(a.big_n / 50_000)} chunks of 50,000 rows), end to end, each side from
a fresh process: the plain loop as a script, and `loft-dist score` as a user runs it (its own Ray start included):

| path | seconds | rows/s | ratio |
|---|---:|---:|---:|
| plain PyTorch loop, 2 threads | {big_plain:.1f} | {a.big_n / big_plain:.0f} | 1.00x |
| `loft-dist score` (1 actor) | {big_secs:.1f} | {big_rows / big_secs:.0f} | **{big_ratio:.2f}x** |

`loft-dist score` wrote {big_rows:,} rows, {cli['distinct']:,} distinct ids; its first chunk was committed
{cli['first_commit_s']:.1f} s after the command.

Memory of `loft-dist score` (1 actor) on {mem[0]['n']:,} and {mem[1]['n']:,} images (peak RSS of the command's process and of
the Scorer actor, sampled every 0.2 s):

| images | seconds | driver peak MB | actor peak MB |
|---:|---:|---:|---:|
| {mem[0]['n']} | {mem[0]['seconds']:.1f} | {mem[0]['driver_peak_mb']:.0f} | {mem[0]['actor_peak_mb']:.0f} |
| {mem[1]['n']} | {mem[1]['seconds']:.1f} | {mem[1]['driver_peak_mb']:.0f} | {mem[1]['actor_peak_mb']:.0f} |
| ratio | | {mem[1]['driver_peak_mb'] / mem[0]['driver_peak_mb']:.2f} | {mem[1]['actor_peak_mb'] / max(mem[0]['actor_peak_mb'], 1):.2f} |

Result line: `{line}`
"""
        append_section("Scoring throughput and memory (actor pool vs plain loop)",
                       "python bench/score_throughput.py", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
