"""Starting or joining Ray, and the Ray Data settings every loft_dist job uses."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(run_cfg, use_gpu: bool = False) -> None:
    """Join the cluster named by run.ray_address / RAY_ADDRESS, or start a local Ray sized for this machine."""
    import ray

    env = {}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its CPU accelerator and gloo inside train workers
    if not ray.is_initialized():
        address = run_cfg.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, runtime_env={"env_vars": env})
        else:
            ray.init(num_cpus=run_cfg.num_cpus, object_store_memory=run_cfg.object_store_mb * 1024 * 1024,
                     include_dashboard=False, dashboard_host="127.0.0.1", runtime_env={"env_vars": env})
    configure_ray_data()
    log.info("Ray resources: %s", ray.cluster_resources())


def configure_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Ray 2.60's datasource V2 packs small Parquet files into one block (one actor task, no parallelism).
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = True
