"""Starting or joining Ray, the checks a run makes before it does, and the Ray Data settings every job uses."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def preflight(cfg) -> None:
    """What can fail without Ray, checked before Ray starts: the run dir can be written, the weights file exists."""
    from loft_dist.models.clip import WEIGHT_SUFFIXES, MissingWeightsError

    check_writable(cfg.run.storage_path, "run.storage_path")
    p = cfg.model.pretrained
    if p and (p.endswith(WEIGHT_SUFFIXES) or os.sep in p) and not Path(p).is_file():
        raise MissingWeightsError(
            f"model.pretrained={p!r}: no such file. Place the {cfg.model.name} weights there (a .pt/.bin/.safetensors "
            f"state dict), or set model.pretrained to the file's path (on a cluster: a path every node sees)")


def check_writable(directory: str, key: str) -> None:
    """Create `directory` if needed and write a file in it; a ConfigError naming `key` if that fails."""
    from loft_dist.config import ConfigError

    if "://" in str(directory):
        return  # an object store: checked by whoever writes there first
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".loft-dist-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={directory}: cannot create or write a directory there ({e.strerror or e}); set "
                          f"{key} to a writable directory (on a cluster: the shared volume every node mounts)") from e


def init_ray(run_cfg, use_gpu: bool = False) -> None:
    """Join the cluster named by run.ray_address / RAY_ADDRESS, or start a local Ray sized for this machine."""
    import ray

    # Tracking settings reach the train workers too (rank 0 logs epoch curves), also on a remote cluster.
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME") if k in os.environ}
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
