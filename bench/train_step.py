"""Training step time: a Ray Train worker running the DeepSpeed engine against a plain PyTorch loop, same model,
same micro batch, same loss. The worker's step time is measured inside train_loop_per_worker (forward + backward
+ step, data wait excluded and reported apart); the plain loop times the same work on a fixed in-memory batch and,
like for like, fed by a torch DataLoader decoding the same Parquet shards.

    python bench/train_step.py            # micro batch 8, 32 and 128, 1 and 2 workers; appends to BENCHMARKS.md
    python bench/train_step.py --no-record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
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
    time: the plain loop's input when it streams from the same data through a torch DataLoader."""

    def __init__(self, root: Path, micro: int, image_size: int):
        super().__init__()
        self.root, self.micro, self.size = root, micro, image_size

    def __iter__(self):
        import pyarrow.parquet as pq
        import torch

        from loft_dist.data.store import shard_paths
        from loft_dist.data.transforms import decode_batch

        torch.set_num_threads(1)
        for path in shard_paths(str(self.root / "data"), "labeled"):
            for b in pq.ParquetFile(path).iter_batches(batch_size=self.micro, columns=["image", "label"]):
                d = decode_batch({c: b.column(c).to_numpy(zero_copy_only=False) for c in b.schema.names}, "clean",
                                 self.size)
                yield torch.from_numpy(d["image"]), torch.from_numpy(d["label"].astype("int64"))


def plain_loader_step_s(root: Path, micro: int, epochs: int = 3) -> tuple[float, float]:
    """(step s, data wait s) of the plain loop fed by a torch DataLoader (1 decoding process) over the same
    labeled shards, timed like the worker: the step excludes the wait for the next batch."""
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
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(_LabeledShards(root, micro, cfg.data.image_size), batch_size=None, num_workers=1, persistent_workers=True, prefetch_factor=2)
    prior = torch.full((C,), 1.0 / C)
    step, wait, n = 0.0, 0.0, 0
    for _ in range(epochs):
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


def ray_step_s(root: Path, micro: int, workers: int, zero: int) -> tuple[float, float]:
    from loft_dist.data.pseudo_labels import training_dataset
    from loft_dist.data.store import read_dataset_info
    from loft_dist.train.trainer import fit_round

    cfg = _cfg(root, f"train.micro_batch_size={micro}", f"train.num_workers={workers}", f"train.zero_stage={zero}",
               "train.epochs_per_round=3", "train.shuffle_buffer=0")
    info = read_dataset_info(cfg.data_root)
    counts = info["counts"]["labeled"]
    ds, _ = training_dataset(cfg.data_root, cfg, len(counts), None)
    tag = f"m{micro}w{workers}z{zero}-{time.time_ns()}"
    m = fit_round(cfg, ds, class_names=info["class_names"], prior=[c / sum(counts) for c in counts],
                  init_checkpoint=None, round_idx=1, storage_path=str(root / f"rt-{tag}"), out_dir=str(root / tag))
    return m["step_time_s"], m["data_wait_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
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
        for micro in MICRO_BATCHES:
            plain = plain_step_s(root, micro, threads=1)
            loader, loader_wait = plain_loader_step_s(root, micro)
            ds = plain_step_s(root, micro, threads=1, engine=True)
            for workers, zero in ((1, 0), (2, 0), (2, 1)):  # stage 0 is the default; 1 shows what ZeRO-1 costs
                step, wait = ray_step_s(root, micro, workers, zero)
                rows.append((micro, workers, zero, plain, loader, loader_wait, ds, step, wait))
        ray.shutdown()
    lines = [f"micro {m}, {w} worker(s), ZeRO {z}: plain {1e3 * pl:.1f} ms, plain + DataLoader {1e3 * ld:.1f} ms, "
             f"DeepSpeed engine {1e3 * e:.1f} ms ({e / pl:.2f}x), worker {1e3 * s:.1f} ms ({s / pl:.2f}x plain, "
             f"{s / ld:.2f}x plain + DataLoader), data wait {1e3 * wt:.1f} ms"
             for m, w, z, pl, ld, lw, e, s, wt in rows]
    print("train step: " + "; ".join(lines))
    if not a.no_record:
        table = "\n".join(f"| {m} | {w} | {z} | {1e3 * pl:.1f} | {1e3 * ld:.1f} ({1e3 * lw:.1f}) | "
                          f"{1e3 * e:.1f} ({e / pl:.2f}x) | {1e3 * s:.1f} ({1e3 * wt:.1f}) | {s / pl:.2f}x | "
                          f"**{s / ld:.2f}x** |" for m, w, z, pl, ld, lw, e, s, wt in rows)
        append_section("Training step time (Ray Train + DeepSpeed worker vs plain PyTorch loop)",
                       "python bench/train_step.py", f"""
Tiny open_clip ViT with LoRA (defaults), LoFT loss, fp32 on CPU, 1 torch thread everywhere (a worker has 0.5 CPU).
Step = forward + backward + clipping at train.grad_clip (1.0) + optimizer step, timed without the wait for the
next batch (in brackets: that wait per step). Three references on the same model, loss and micro batch:
*plain* steps on one fixed in-memory batch (the model alone); *plain + DataLoader* streams the same labeled
Parquet shards through the same decode function in a torch DataLoader with one worker process, as a hand-written
loop would, so its step shares the 2 cores with decoding as the Ray Train worker's does with Ray Data's tasks
(1,000 rows, 3 epochs, like the worker); *DeepSpeed engine* is the worker's engine (build_engine, ZeRO 0, one
rank, gloo) in one process on the fixed batch. The like-for-like ratio is worker / plain + DataLoader.

| micro batch | workers | ZeRO | plain ms/step | plain + DataLoader ms/step (wait) | DeepSpeed engine ms/step | worker ms/step (wait) | worker / plain | worker / plain + DataLoader |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{table}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
