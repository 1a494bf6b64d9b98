"""Training step time: a Ray Train worker running the DeepSpeed engine against a plain PyTorch loop, same model,
same micro batch, same loss. The worker's step time is measured inside train_loop_per_worker (forward + backward
+ step, data wait excluded and reported apart); the plain loop times the same work on pre-decoded tensors.

    python bench/train_step.py            # micro batch 8 and 32, 1 and 2 workers; appends to BENCHMARKS.md
    python bench/train_step.py --no-record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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
            ds = plain_step_s(root, micro, threads=1, engine=True)
            for workers, zero in ((1, 0), (2, 1)):
                step, wait = ray_step_s(root, micro, workers, zero)
                rows.append((micro, workers, zero, plain, ds, step, wait))
        ray.shutdown()
    lines = [f"micro {m}, {w} worker(s), ZeRO {z}: plain {1e3 * pl:.1f} ms, DeepSpeed engine {1e3 * e:.1f} ms "
             f"({e / pl:.2f}x), worker {1e3 * s:.1f} ms ({s / pl:.2f}x), data wait {1e3 * wt:.1f} ms"
             for m, w, z, pl, e, s, wt in rows]
    print("train step: " + "; ".join(lines))
    if not a.no_record:
        table = "\n".join(f"| {m} | {w} | {z} | {1e3 * pl:.1f} | {1e3 * e:.1f} ({e / pl:.2f}x) | {1e3 * s:.1f} | "
                          f"{s / pl:.2f}x | {1e3 * wt:.1f} |" for m, w, z, pl, e, s, wt in rows)
        append_section("Training step time (Ray Train + DeepSpeed worker vs plain PyTorch loop)",
                       "python bench/train_step.py", f"""
Tiny open_clip ViT with LoRA (defaults), LoFT loss, fp32 on CPU, 1 torch thread in both (a worker has 0.5 CPU).
Step = forward + backward + clipping at train.grad_clip (1.0) + optimizer step; data wait is the time the worker waited for its next batch.
The plain loop and the one-process DeepSpeed engine step on a fixed in-memory batch; the worker steps while Ray
Data reads and decodes its next batches on the same 2 cores, so its step shares the CPU with the pipeline.

| micro batch | workers | ZeRO | plain loop ms/step | DeepSpeed engine, no Ray, ms/step | worker ms/step | worker / plain | worker data wait ms/step |
|---:|---:|---:|---:|---:|---:|---:|---:|
{table}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
