"""Training step time: a Ray Train worker running the DeepSpeed engine against a plain PyTorch loop, same model,
same micro batch, same loss. The worker's step time is measured inside train_loop_per_worker (forward + backward
+ step, data wait excluded and reported apart); the plain loop times the same work on a fixed in-memory batch and,
like for like, fed by a torch DataLoader decoding the same Parquet shards.

    python bench/train_step.py            # micro 8, 32, 128; 1 and 2 workers; medians of 3; appends to BENCHMARKS.md
    python bench/train_step.py --micro 8 32 --configs 1:0 --no-record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from torch.utils.data import IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_section  # noqa: E402


MICRO_BATCHES = (8, 32, 128)  # the tiny model's step is ms long: larger batches show the fixed overhead amortised


def _cfg(root: Path, *extra: str):
    from loft_dist.config import load_config

    return load_config(None, [f"data.root={root / 'data'}", f"run.storage_path={root}", "data.ood_test=0",
                              "train.labeled_view=clean", "rounds.num_rounds=1",
                              # 1,000 labeled rows (100 per class): full micro batches of 128 on each of 2 workers
                              "data.n1=100", "data.gamma_l=1.0", "data.m1=20", *extra])


def plain_step_s(root: Path, micro: int, threads: int, steps: int = 60, engine: bool = False) -> float:
    """Mean seconds of forward + backward + SGD step in one process (the loop's own loss and model).

    engine=True wraps the same model and optimizer in the DeepSpeed engine the worker uses (ZeRO 0, one rank,
    gloo), still without Ray: it splits the worker's overhead into DeepSpeed's share and the rest."""
    import torch

    from loft_dist.algorithms.loft import LABELED, loft_loss
    from loft_dist.data.store import read_dataset_info
    from loft_dist.models.clip import build_classifier

    torch.set_num_threads(threads)
    cfg = _cfg(root)
    info = read_dataset_info(cfg.data_root)
    C = len(info["class_names"])
    model = build_classifier(cfg.model, cfg.peft, info["class_names"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    if engine:
        import os

        import deepspeed

        from loft_dist.train.deepspeed_config import build_engine

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        deepspeed.init_distributed(dist_backend="gloo")
        t = cfg.train
        t.micro_batch_size, t.num_workers, t.zero_stage = micro, 1, 0
        model, opt = build_engine(model, opt, params, t)
    x = torch.randn(micro, 3, cfg.data.image_size, cfg.data.image_size)
    code = torch.full((micro,), LABELED, dtype=torch.int8)
    target = torch.randint(0, C, (micro,))
    weight, soft, prior = torch.ones(micro), torch.zeros(micro, C), torch.full((C,), 1.0 / C)
    times = []
    for i in range(steps + 10):
        t0 = time.perf_counter()
        loss, _ = loft_loss(model(x), code, target, weight, soft, prior, cfg.algorithm)
        if engine:
            model.backward(loss)
            model.step()
        else:
            opt.zero_grad()
            loss.backward()
            if cfg.train.grad_clip > 0:  # the worker's engine clips at train.grad_clip: the same work here
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
        if i >= 10:  # warm-up excluded, as in the worker where the first epoch's steps are all counted
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


class _LabeledShards(IterableDataset):
    """The labeled Parquet shards read and decoded like the worker's pipeline (clean view), one micro batch at a
    time: the plain loop's input when it streams from the same data through a torch DataLoader. With `world`
    ranks, rank r takes every world-th micro batch and all ranks take as many, as Ray Train's equal split does
    (a rank with one batch more would wait forever in DDP's all-reduce)."""

    def __init__(self, root: Path, micro: int, image_size: int, rank: int = 0, world: int = 1):
        super().__init__()
        self.root, self.micro, self.size, self.rank, self.world = root, micro, image_size, rank, world

    def __iter__(self):
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from loft_dist.data.store import shard_paths
        from loft_dist.data.transforms import decode_batch

        torch.set_num_threads(1)
        table = pa.concat_tables(pq.read_table(p, columns=["image", "label"])
                                 for p in shard_paths(str(self.root / "data"), "labeled"))
        starts = list(range(0, len(table), self.micro))
        mine = starts[self.rank::self.world][:len(starts) // self.world]
        for i in mine:
            b = table.slice(i, self.micro)
            d = decode_batch({c: b.column(c).to_numpy(zero_copy_only=False) for c in b.column_names}, "clean",
                             self.size)
            yield torch.from_numpy(d["image"]), torch.from_numpy(d["label"].astype("int64"))


def plain_loader_step_s(root: Path, micro: int, epochs: int = 3, rank: int = 0, world: int = 1) -> tuple[float, float]:
    """(step s, data wait s) of the plain loop fed by a torch DataLoader (1 decoding process) over the same
    labeled shards, timed like the worker: the step excludes the wait for the next batch, and the figure is the
    last epoch's. With world > 1 the caller has made the process group and the model is wrapped in torch DDP."""
    import torch
    from torch.utils.data import DataLoader

    from loft_dist.algorithms.loft import LABELED, loft_loss
    from loft_dist.data.store import read_dataset_info
    from loft_dist.models.clip import build_classifier

    torch.set_num_threads(1)
    cfg = _cfg(root)
    info = read_dataset_info(cfg.data_root)
    C = len(info["class_names"])
    model = build_classifier(cfg.model, cfg.peft, info["class_names"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(_LabeledShards(root, micro, cfg.data.image_size, rank, world), batch_size=None,
                        num_workers=1, persistent_workers=True, prefetch_factor=2)
    prior = torch.full((C,), 1.0 / C)
    for _ in range(epochs):
        step, wait, n = 0.0, 0.0, 0
        t_ready = time.perf_counter()
        for x, y in loader:
            t0 = time.perf_counter()
            b = len(y)
            loss, _ = loft_loss(model(x), torch.full((b,), LABELED, dtype=torch.int8), y, torch.ones(b),
                                torch.zeros(b, C), prior, cfg.algorithm)
            opt.zero_grad()
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            t1 = time.perf_counter()
            step, wait, n = step + t1 - t0, wait + t0 - t_ready, n + 1
            t_ready = t1
    return step / n, wait / n


def _ddp_rank(rank: int, world: int, port: int, root: Path, micro: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results.put(plain_loader_step_s(root, micro, rank=rank, world=world))
    dist.destroy_process_group()


def plain_ddp_step_s(root: Path, micro: int, world: int) -> tuple[float, float]:
    """The plain loop with `world` processes under torch DDP (gloo), each fed by its own DataLoader: the
    like-for-like reference of `world` Ray Train workers. Rank means of (step s, data wait s)."""
    if world == 1:
        return plain_loader_step_s(root, micro)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_ddp_rank, args=(world, port, root, micro, results), nprocs=world, start_method="spawn")
    per_rank = [results.get() for _ in range(world)]
    return tuple(sum(r[i] for r in per_rank) / world for i in range(2))


def ray_step_s(root: Path, micro: int, workers: int, zero: int) -> tuple[float, float]:
    from loft_dist.data.pseudo_labels import training_dataset
    from loft_dist.data.store import read_dataset_info
    from loft_dist.train.trainer import fit_round

    cfg = _cfg(root, f"train.micro_batch_size={micro}", f"train.num_workers={workers}", f"train.zero_stage={zero}",
               "train.epochs_per_round=3", "train.shuffle_buffer=0")
    info = read_dataset_info(cfg.data_root)
    counts = info["counts"]["labeled"]
    ds = training_dataset(cfg.data_root, cfg, len(counts))
    tag = f"m{micro}w{workers}z{zero}-{time.time_ns()}"
    m = fit_round(cfg, ds, class_names=info["class_names"], prior=[c / sum(counts) for c in counts],
                  init_checkpoint=None, round_idx=1, storage_path=str(root / f"rt-{tag}"), out_dir=str(root / tag))
    return m["step_time_s"], m["data_wait_s"]


CONFIGS = ((1, 0), (2, 0), (2, 1))  # (workers, ZeRO): stage 0 is the default; 1 shows what ZeRO-1 costs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved repetitions of every measurement; the table shows medians (one run on 2 "
                        "shared cores varies by up to ±30 %%)")
    p.add_argument("--micro", type=int, nargs="+", default=list(MICRO_BATCHES), help="micro batch sizes")
    p.add_argument("--configs", nargs="+", default=[f"{w}:{z}" for w, z in CONFIGS],
                   help="WORKERS:ZERO pairs of the Ray Train runs (default %(default)s)")
    a = p.parse_args()
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs]
    import ray

    from loft_dist.data.prepare import prepare_dataset
    from loft_dist.runtime import configure_ray_data

    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        prepare_dataset(_cfg(root))
        ray.init(num_cpus=4, object_store_memory=400 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        configure_ray_data()
        for micro in a.micro:
            runs = defaultdict(list)
            for _ in range(a.repeats):  # interleaved, so a slow spell of the machine hits every column alike
                runs["plain"].append(plain_step_s(root, micro, threads=1))
                runs["engine"].append(plain_step_s(root, micro, threads=1, engine=True))
                for world in sorted({w for w, _ in configs}):
                    runs["loader", world].append(plain_ddp_step_s(root, micro, world))
                for wz in configs:
                    runs[wz].append(ray_step_s(root, micro, *wz))
            pl, e = statistics.median(runs["plain"]), statistics.median(runs["engine"])
            for wz in configs:
                ld, lw = (statistics.median(x) for x in zip(*runs["loader", wz[0]]))
                s, wt = (statistics.median(x) for x in zip(*runs[wz]))
                # per-repeat worker / plain loop at the same worker count: how far one run lands from the median
                ratios = [w[0] / l[0] for w, l in zip(runs[wz], runs["loader", wz[0]])]
                rows.append((micro, *wz, pl, ld, lw, e, s, wt, min(ratios), max(ratios)))
        ray.shutdown()
    lines = [f"micro {m}, {w} worker(s), ZeRO {z}: plain {1e3 * pl:.1f} ms, plain + DataLoader x {w} "
             f"{1e3 * ld:.1f} ms, DeepSpeed engine {1e3 * e:.1f} ms ({e / pl:.2f}x), worker {1e3 * s:.1f} ms "
             f"({s / pl:.2f}x plain, {s / ld:.2f}x plain + DataLoader x {w}, runs {lo:.2f}-{hi:.2f}x), "
             f"data wait {1e3 * wt:.1f} ms" for m, w, z, pl, ld, lw, e, s, wt, lo, hi in rows]
    print(f"train step (medians of {a.repeats}): " + "; ".join(lines))
    if not a.no_record:
        table = "\n".join(f"| {m} | {w} | {z} | {1e3 * pl:.1f} | {1e3 * e:.1f} ({e / pl:.2f}x) | "
                          f"{1e3 * ld:.1f} ({1e3 * lw:.1f}) | {1e3 * s:.1f} ({1e3 * wt:.1f}) | {s / pl:.2f}x | "
                          f"**{s / ld:.2f}x** ({lo:.2f}-{hi:.2f}) |" for m, w, z, pl, ld, lw, e, s, wt, lo, hi in rows)
        append_section("Training step time (Ray Train + DeepSpeed worker vs plain PyTorch loop)",
                       f"python bench/train_step.py --repeats {a.repeats} --micro {' '.join(map(str, a.micro))} "
                       f"--configs {' '.join(a.configs)}", f"""
Tiny open_clip ViT with LoRA (defaults), LoFT loss, fp32 on CPU, 1 torch thread everywhere (a worker has 0.5 CPU).
Step = forward + backward + clipping at train.grad_clip (1.0) + optimizer step, timed without the wait for the
next batch (in brackets: that wait per step). References on the same model, loss and micro batch: *plain* steps
in one process on one fixed in-memory batch (the model alone); *DeepSpeed engine* is the worker's engine
(build_engine, ZeRO 0, one rank, gloo) in one process on that batch; *plain + DataLoader* is the like-for-like
loop: as many processes as the Ray Train run has workers (torch DDP over gloo for 2), each streaming its equal
share of the same labeled Parquet shards through the same decode function in a torch DataLoader with one worker
process, so its steps share the 2 cores with decoding as the Ray Train workers' do with Ray Data's tasks.
1,000 labeled rows, 3 epochs; every streamed figure is the last epoch's. Each figure is the median of
{a.repeats} interleaved runs; in brackets after the like-for-like ratio, its lowest and highest single run.

| micro batch | workers | ZeRO | plain ms/step | DeepSpeed engine ms/step | plain + DataLoader, same workers, ms/step (wait) | Ray Train worker ms/step (wait) | worker / plain | worker / plain + DataLoader (runs) |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{table}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
