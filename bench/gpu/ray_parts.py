"""The kit's Ray parts (issue 18, item 2; `kit.py --ray`): the paths that run inside Ray, on the device.

  ray-score  the scoring job (scoring/job.py score_shards: Ray Data decode tasks → a Scorer actor on the GPU →
             Parquet) against the Scorer called in one process on the same shards with the same decode function.
  ray-train  one Ray Train worker (train/trainer.py fit_round, train_loop_per_worker, DeepSpeed bf16 on the GPU) on
             the embedded digits at the kit's image size; its step time (data wait apart) is compared with the
             in-process engine step and loop epoch of step-adaptformer at the same micro batch in the summary.

Ray comes from the trimmed tarball that fetch_ray.sh packs (run.sh --ray installs it); here, the installed Ray.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import kit

sys.path.insert(0, str(kit.REPO / "bench"))
from common import write_pool  # noqa: E402 - the generated pool every scoring benchmark uses

ROWS_PER_SHARD = 256  # a prepared pool's shard size


def _plain_rows_s(paths: list[str], scorer, cfg) -> float:
    """rows/s of read → decode (uint8, as the job's tasks do) → Scorer in this process."""
    import pyarrow.parquet as pq

    from loft_dist.data.transforms import decode_batch

    rows, t0 = 0, time.perf_counter()
    for path in paths:
        for b in pq.ParquetFile(path).iter_batches(batch_size=cfg.scoring.batch_size, columns=["id", "image",
                                                                                                "true_label"]):
            d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in b.schema.names}
            rows += scorer(decode_batch(d, "clean", cfg.data.image_size, normalized=False)).num_rows
    kit.sync(scorer.device)
    return rows / (time.perf_counter() - t0)


def ray_score(p: kit.Profile) -> dict:
    import ray

    from loft_dist.config import to_dict
    from loft_dist.runtime import init_ray
    from loft_dist.scoring.job import score_shards
    from loft_dist.scoring.scorer import Scorer

    n = 32768 if p.device == "cuda" else 1024  # on the GPU: enough rows for the job's start-up to be a small share
    gpu = p.device == "cuda"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        small = [] if gpu else ["run.num_cpus=4", "run.object_store_mb=512"]  # 2 cores: fractional actors fit
        cfg = kit.make_cfg(p, f"run.storage_path={tmp}", *small)
        names = kit.class_names(p)
        paths = write_pool(tmp / "pool", n, shards=max(4, n // ROWS_PER_SHARD))
        scorer = Scorer(to_dict(cfg), names, "zero_shot")
        _plain_rows_s(paths[:1], scorer, cfg)  # warm-up: allocator, kernels
        plain = _plain_rows_s(paths[:32], scorer, cfg)  # at most 8,192 rows: its rate is steady from the start
        del scorer
        t0 = time.perf_counter()
        init_ray(cfg.run, use_gpu=gpu)
        ray_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        score_shards(cfg, paths[:1], str(tmp / "first"), class_names=names, mode="zero_shot")
        startup = time.perf_counter() - t0  # one shard: mostly the pipeline's and the actor's start-up
        t0 = time.perf_counter()
        rows = score_shards(cfg, paths, str(tmp / "all"), class_names=names, mode="zero_shot")
        secs = time.perf_counter() - t0
        ray.shutdown()
    # rows/s once running: the first shard's time (start-up) taken off; none when the pool is too small to tell
    steady = (rows - ROWS_PER_SHARD) / (secs - startup) if secs > 2 * startup else None
    return {"rows": rows, "image_size": p.image_size, "model": p.model, "batch": cfg.scoring.batch_size,
            "plain_rows_s": plain, "job_rows_s": rows / secs, "job_steady_rows_s": steady, "job_seconds": secs,
            "job_startup_s": startup, "ray_init_s": ray_init, "ratio_job_vs_plain": rows / secs / plain,
            "ratio_steady_vs_plain": steady / plain if steady else None}


def ray_train(p: kit.Profile) -> dict:
    import ray

    from loft_dist.data.prepare import prepare_dataset
    from loft_dist.data.pseudo_labels import training_dataset
    from loft_dist.data.store import read_dataset_info
    from loft_dist.runtime import init_ray
    from loft_dist.train.trainer import fit_round

    gpu = p.device == "cuda"
    micro = p.micro[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # The embedded digits (1,000 labeled rows, clean view) at the kit's image size; the paper's model, adapter
        # (r = 4, what r = auto gives 100 classes, as in step-adaptformer), loss and optimizer settings.
        cfg = kit.make_cfg(p, "data.source=embedded", "data.source_path=''", "data.test_source=carve",
                           "data.ood_test=0", "data.n1=100", "data.gamma_l=1.0", "data.m1=20",
                           "data.rows_per_shard=256", f"data.root={tmp / 'data'}", f"run.storage_path={tmp}",
                           "train.labeled_view=clean", "train.shuffle_buffer=0", "train.epochs_per_round=2",
                           "rounds.num_rounds=1", "peft.r=4", "train.cpus_per_worker=1",
                           *([] if gpu else ["run.num_cpus=4", "run.object_store_mb=512"]))
        prepare_dataset(cfg)
        info = read_dataset_info(cfg.data_root)
        counts = info["counts"]["labeled"]
        ds = training_dataset(cfg.data_root, cfg, len(counts))
        init_ray(cfg.run, use_gpu=gpu)
        t0 = time.perf_counter()
        m = fit_round(cfg, ds, class_names=info["class_names"], prior=[c / sum(counts) for c in counts],
                      init_checkpoint=None, round_idx=1, storage_path=str(tmp / "ray"), out_dir=str(tmp / "out"))
        wall = time.perf_counter() - t0
        ray.shutdown()
    return {"micro": micro, "precision": cfg.train.precision, "rows": sum(counts), "epochs": 2, "fit_s": wall,
            "step_time_s": m["step_time_s"], "data_wait_s": m["data_wait_s"], "images_s": micro / m["step_time_s"],
            "worker_nodes": m.get("worker_nodes")}


def run(name: str, p: kit.Profile) -> dict:
    return {"score": ray_score, "train": ray_train}[name](p)
