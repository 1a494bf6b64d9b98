"""The TorchTrainer of one round: scaling, storage, failure handling; returns the final checkpoint dir."""

from __future__ import annotations

import logging

from loft_dist import storage
from loft_dist.config import to_dict
from loft_dist.errors import DataError

log = logging.getLogger(__name__)


def worker_resources(t) -> dict:
    """One Ray Train worker's resources: what fit_round asks for and runtime.check_fits checks against the cluster."""
    resources = {"CPU": t.cpus_per_worker, **t.custom_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    return resources


def training_ask(cfg):
    """What a round's training asks of the cluster (runtime.check_fits)."""
    from loft_dist.runtime import Ask

    t = cfg.train
    return Ask("training", t.num_workers, "worker", worker_resources(t), t.cpus_per_data_task,
               ("train.num_workers", "train.cpus_per_worker", "train.cpus_per_data_task"))


def fit_round(cfg, train_ds, *, class_names: list[str], prior: list[float], init_checkpoint: str | None,
              round_idx: int, storage_path: str, out_dir: str, tracking_dir: str | None = None,
              pool_stats: dict | None = None) -> dict:
    """Train one round on `train_ds` with Ray Train workers running DeepSpeed; copy the last checkpoint to out_dir."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from loft_dist.train.loop import train_loop_per_worker

    t = cfg.train
    resources = worker_resources(t)
    fs, fs_path = storage.resolve(storage_path)  # Ray Train writes its checkpoints through the same filesystem
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = ingest.preserve_order or t.preserve_order
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg), "class_names": class_names, "prior": prior, "init_checkpoint": init_checkpoint,
            "epoch_offset": (round_idx - 1) * t.epochs_per_round_for(cfg.rounds.num_rounds),
            "total_epochs": cfg.rounds.num_rounds * t.epochs_per_round_for(cfg.rounds.num_rounds),
            "round_idx": round_idx, "tracking_dir": tracking_dir,  # rank 0 logs epoch curves to the run's tracker
            "has_pool": isinstance(train_ds, dict) and "pool" in train_ds,
            "pool_stats": pool_stats,  # per-class statistics of the round's table, for methods that start from them
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name=f"r{round_idx}", storage_path=fs_path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
        ),
        datasets=train_ds if isinstance(train_ds, dict) else {"train": train_ds},  # {"train"[, "pool"]}
        dataset_config=DataConfig(execution_options=ingest),
    )
    log.info("round %d train: %d Ray Train workers x %s, DeepSpeed ZeRO stage %d, %s, micro batch %d x accum %d "
             "→ global batch %d", round_idx, t.num_workers, resources, t.zero_stage, t.precision,
             *t.batch_plan(), t.num_workers * t.batch_plan()[0] * t.batch_plan()[1])
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise DataError(f"round {round_idx}: training reported no checkpoint (empty training set?)")
    storage.remove_stale_staging(out_dir)
    staged = storage.staging(out_dir)
    with result.checkpoint.as_directory() as d:
        storage.upload_dir(d, staged)
    storage.commit(staged, out_dir)
    return dict(result.metrics or {})
