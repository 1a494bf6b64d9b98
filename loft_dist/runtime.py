"""Starting or joining Ray, the checks a run makes before it does, and the Ray Data settings every job uses."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from loft_dist.errors import ConfigError

log = logging.getLogger(__name__)


def preflight(cfg) -> None:
    """What can fail without Ray, checked before Ray starts: the run dir can be written, model.name is a model, the
    weights file exists."""
    from loft_dist.models.clip import check_model_name, check_weights_file
    from loft_dist.storage import check_writable

    check_writable(cfg.run.storage_path, "run.storage_path")
    check_model_name(cfg.model.name, cfg.model.pretrained)
    check_weights_file(cfg.model.name, cfg.model.pretrained)


def init_ray(run_cfg, use_gpu: bool = False) -> bool:
    """Join the cluster named by run.ray_address / RAY_ADDRESS, or start a local Ray sized for this machine.

    True when this call started a local Ray (which cannot grow: an ask it cannot hold is an error, not a wait)."""
    import ray

    # Tracking settings reach the train workers too (rank 0 logs epoch curves), also on a remote cluster; so does
    # the CLI's HF_HUB_OFFLINE (actors that load a pretrained tag fail at once offline instead of retrying).
    # run.s3_endpoint (AWS_ENDPOINT_URL_S3) too: actors and workers open s3:// locations of the same store.
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "HF_HUB_OFFLINE",
                                      "AWS_ENDPOINT_URL_S3") if k in os.environ}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its CPU accelerator and gloo inside train workers
    started = False
    if not ray.is_initialized():
        address = run_cfg.ray_address or os.environ.get("RAY_ADDRESS")
        started = not address
        if address:
            _send_token_if_asked(address, "run.ray_address" if run_cfg.ray_address else "RAY_ADDRESS")
            ray.init(address=address, runtime_env={"env_vars": env})
        else:
            ray.init(num_cpus=run_cfg.num_cpus, object_store_memory=run_cfg.object_store_mb * 1024 * 1024,
                     include_dashboard=False, dashboard_host="127.0.0.1", runtime_env={"env_vars": env})
    configure_ray_data()
    log.info("Ray resources: %s", ray.cluster_resources())
    return started


TOKEN_WHERE = ("put the cluster's token in ~/.ray/auth_token (mode 600), or name a file that holds it in "
               "RAY_AUTH_TOKEN_PATH, or set RAY_AUTH_TOKEN (on KubeRay: the auth_token key of the Secret named by "
               "authOptions.secretName, loft-dist-ray-auth in cluster/*.yaml)")


def _send_token_if_asked(address: str, key: str) -> None:
    """init_ray's part: before joining the GCS at `address`, ask it whether it wants a token; if so, send this
    machine's, found where Ray looks (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token), whatever RAY_AUTH_MODE says here.

    Ray sends a token only with RAY_AUTH_MODE=token and never turns it on for an explicit address, and a missing or
    wrong token makes ray.init retry for 20 s and fail with a bare ConnectionError under a stream of C++ warnings.
    Here it is one ConfigError naming where the token is expected. The token itself is never logged. An address
    that does not answer is left to ray.init, which says so."""
    if "://" in address or address in ("auto", "local"):
        return
    import grpc
    from ray._raylet import AuthenticationTokenLoader, Config
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray.exceptions import AuthenticationError

    def refused(token: str | None) -> bool:
        with grpc.insecure_channel(address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=15,
                                  metadata=[("authorization", f"Bearer {token}")] if token else [])
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    if not refused(None):
        return
    where = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN", "").strip() else
             f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}" if os.environ.get("RAY_AUTH_TOKEN_PATH")
             else str(Path("~/.ray/auth_token").expanduser()))
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # Ray caches the token of the first look-up; read what the environment says now
    try:
        token = loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None
    except AuthenticationError as e:
        raise ConfigError(f"{key}={address}: the Ray cluster there uses token authentication, and {where} cannot "
                          f"be read or is empty; {TOKEN_WHERE}") from e
    if not token:
        raise ConfigError(f"{key}={address}: the Ray cluster there uses token authentication and no token was found "
                          f"(RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH unset, no {where}); {TOKEN_WHERE}")
    if refused(token):
        raise ConfigError(f"{key}={address}: the Ray cluster there rejected the token from {where}: it is not this "
                          f"cluster's token; {TOKEN_WHERE}")
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"  # what Ray itself does to turn token mode on in a running process
        Config.initialize("")
        loader.reset_cache()
    log.info("the Ray cluster at %s uses token authentication: joining with the token from %s", address, where)


@dataclass(frozen=True)
class Ask:
    """What one phase asks of the cluster: `count` units of `each` (Ray resources) beside one Ray Data task.

    The phase that owns the resources says what it asks (scoring.job.scoring_ask, train.trainer.training_ask);
    this module only checks asks against the cluster, so it knows nothing of scoring or training."""
    phase: str  # "scoring", "training"
    count: int
    unit: str  # "actor", "worker"
    each: dict
    data_cpus: float
    keys: tuple[str, str, str]  # the config keys of count, per-unit CPUs and data-task CPUs, named in errors


def check_fits(asks: list[Ask], *, strict: bool) -> None:
    """Each ask (e.g. the scoring pool's first actors, the train workers), beside one Ray Data decode task, must fit
    in the cluster, or Ray waits for it forever without an error (ENVIRONMENT's 2-core hang trap).

    strict (a local Ray, which cannot grow): a ConfigError naming the keys to change. Otherwise a warning: an
    autoscaling cluster adds the nodes for an ask no running node can hold."""
    import ray

    have = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = []
    for a in asks:
        n, (n_key, cpu_key, data_key) = a.count, a.keys
        each = {k: float(v) for k, v in a.each.items() if v}
        total = {k: n * v for k, v in each.items()}
        total["CPU"] = total.get("CPU", 0.0) + a.data_cpus
        for k, v in total.items():
            if v > have.get(k, 0.0) + 1e-6:
                split = (f"{n} x {each.get('CPU', 0):g} ({n_key} x {cpu_key}) + {a.data_cpus:g} ({data_key})"
                         if k == "CPU" else f"{n} x {each[k]:g}")
                problems.append(f"{a.phase} asks for {v:g} {k} = {split}, but the cluster has {have.get(k, 0.0):g}")
        if not any(all(node.get(k, 0.0) >= v - 1e-6 for k, v in each.items()) for node in nodes):
            problems.append(f"no node can hold one {a.phase} {a.unit} ({each}); nodes offer "
                            f"{[{k: v for k, v in node.items() if k in each} for node in nodes]}")
    if not problems:
        return
    fix = (f"lower {', '.join(a.keys[0] for a in asks)} or the per-{'/'.join(a.unit for a in asks)} resources, "
           f"or give Ray more (run.num_cpus for a local Ray; more or larger nodes on a cluster)")
    msg = "; ".join(problems) + f": Ray would wait for it forever. Fix: {fix}"
    if strict:
        raise ConfigError(msg)
    log.warning("%s (unless the cluster's autoscaler adds nodes for it)", msg)


def configure_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Ray 2.60's datasource V2 packs small Parquet files into one block (one actor task, no parallelism).
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = True
