"""The recipe of one Ray Train worker: build the method's model, wrap it in a DeepSpeed engine, stream its data
shards, train with the method's loss, and report metrics + a checkpoint every train.checkpoint_every epochs and at
the round's last (every rank, same cadence; rank 0 logs every epoch's metrics to the tracker).

Both modes stream "train" (labeled rows) and, for methods that learn from the pool, "pool"; each step takes B
labeled rows and mu * B pool rows (SPEC A.0.2), and the method's loss divides its pool terms by those mu * B rows.
Offline mode's pool rows carry the round's table decisions (hard, soft, and rejected at weight 0) in the strong
view. Online mode (FixMatch-style) gives each pool row a weak and a strong view, runs one forward over [labeled,
weak, strong], pseudo-labels the weak view with the shared decision rule (teacher detached) and applies the same
loss to the strong view. An epoch is one pass over the labeled shard; the pool stream cycles across epochs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from loft_dist.algorithms import load_model, method_of
from loft_dist.algorithms.loft import HARD, LABELED, SOFT, pseudo_label_decision
from loft_dist.config import from_dict
from loft_dist.data.decisions import IGNORED
from loft_dist.models.checkpoint import DS_DIR, STATE_FILE
from loft_dist.train.deepspeed_config import build_engine



def cosine_lr(base_lr: float, epoch: int, total_epochs: int) -> float:
    """CosineAnnealingLR(T_max = total epochs), stepped per epoch, no warmup (SPEC A.0.3)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(total_epochs, 1)))


def _float(out):
    return {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()


def _rows(out, idx):
    """Rows idx of the model's outputs: a logits tensor, or a dict of per-row tensors and per-batch scalars."""
    if isinstance(out, dict):
        return {k: v[idx] if v.dim() > 0 else v for k, v in out.items()}
    return out[idx]


def _batches(shard, batch_size: int, t):
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=False, prefetch_batches=t.prefetch_batches,
                                    local_shuffle_buffer_size=t.shuffle_buffer or None)


def _cycle(shard, batch_size: int, t):
    """Pool batches forever: a new pass (fresh random views) each time the shard is exhausted; None forever if
    the shard is empty (e.g. stage 1 rejected the whole pool), so the steps train on labeled rows only.

    Ray Train splits with equal=True, so every rank's pass has the same batches and ranks start passes together.
    """
    while True:
        empty = True
        for batch in _batches(shard, batch_size, t):
            empty = False
            yield batch
        if empty:
            break
    while True:
        yield None


def soft_targets(batch: dict, num_classes: int, device) -> torch.Tensor:
    """A batch's soft targets as (rows, C): stored whole, or top-k (`soft` values at `soft_idx`) scattered here."""
    soft = batch["soft"].to(device)
    if "soft_idx" not in batch:
        return soft
    full = torch.zeros(len(soft), num_classes, dtype=soft.dtype, device=device)
    return full.scatter_(1, batch["soft_idx"].to(device), soft)


def offline_batch(engine, labeled: dict, pool: dict, device):
    """One offline step's outputs and targets: labeled rows + mu x B pool rows with their table decisions."""
    if pool is None:
        out = _float(engine(labeled["image"].to(device)))
        return out, *(labeled[k].to(device) for k in ("code", "target", "weight", "soft"))
    out = _float(engine(torch.cat([labeled["image"], pool["image"]]).to(device)))
    C = labeled["soft"].shape[1]
    code, target, weight = (torch.cat([labeled[k], pool[k]]).to(device) for k in ("code", "target", "weight"))
    return out, code, target, weight, torch.cat([labeled["soft"].to(device), soft_targets(pool, C, device)])


def online_batch(engine, method, acfg, labeled: dict, pool: dict, device):
    """One online step's outputs and targets: teacher on the weak view, student rows = labeled + strong view."""
    if pool is None:
        return offline_batch(engine, labeled, None, device)
    b, n = len(labeled["image"]), len(pool["image"])
    images = torch.cat([labeled["image"], pool["image_weak"], pool["image"]]).to(device)
    out = _float(engine(images))
    teacher = method.logits(_rows(out, slice(b, b + n)), "pseudo_label", acfg).detach()
    probs = torch.softmax(teacher / acfg.temperature, dim=-1)
    d = pseudo_label_decision(probs, acfg.c_hard, acfg.c_ood, acfg.soft_weight)
    ok = pool["ok"].to(device).bool()
    student = torch.cat([torch.arange(b, device=device), torch.arange(b + n, b + 2 * n, device=device)])
    code = torch.cat([labeled["code"].to(device), torch.where(ok, d["code"], torch.full_like(d["code"], IGNORED))])
    target = torch.cat([labeled["target"].to(device), d["pred"]])
    weight = torch.cat([labeled["weight"].to(device), d["weight"]])
    soft = torch.cat([labeled["soft"].to(device), probs])
    return _rows(out, student), code, target, weight, soft


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors inside a nested state dict (an optimizer's: torch's, or a ZeRO wrapper's), by their path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {path: t for key, value in items
            for path, t in flat_tensors(value, f"{prefix}/{key}" if prefix else str(key)).items()}


def tensor_digests(tensors: dict) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes, by name: what "restored bitwise" is checked against."""
    out = {}
    for name, t in sorted(tensors.items(), key=lambda kv: str(kv[0])):
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[str(name)] = h.hexdigest()
    return out


def restore(checkpoint, engine, optimizer, params) -> tuple[int, dict, dict]:
    """Load a reported checkpoint into the engine; returns (next epoch, the round's loss curves so far, a record).

    The record (epoch, optimizer lr, digests of every trainable tensor and optimizer-state tensor as they are
    after the load) goes into the next checkpoint's train_state.json, so a resume can be checked against the
    checkpoint it came from, tensor by tensor, not only by the epoch numbers that follow it.
    """
    import deepspeed

    with checkpoint.as_directory() as d:
        engine.load_checkpoint(str(Path(d) / DS_DIR), load_module_strict=False)
        saved = json.loads((Path(d) / STATE_FILE).read_text())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        record = {"epoch": saved["epoch"], "lr": [g["lr"] for g in optimizer.param_groups],
                  "params": tensor_digests(trainable),
                  "optimizer_state": tensor_digests(flat_tensors(optimizer.state_dict()))}
    return saved["epoch"] + 1, saved.get("loss_by_epoch", {}), record


def _train_epoch(engine, method, labeled, pool, cfg, prior) -> dict[str, float]:
    """One epoch's labeled batches, each step beside mu x B pool rows when there is a pool; the sums of every loss
    part and count over its steps."""
    a, device = cfg.algorithm, engine.device
    sums: dict[str, float] = {}
    t_ready = time.perf_counter()
    for batch in labeled:
        t_start = time.perf_counter()
        pool_batch = next(pool) if pool is not None else None
        if a.mode == "online":
            out, code, target, weight, soft = online_batch(engine, method, a, batch, pool_batch, device)
        else:
            out, code, target, weight, soft = offline_batch(engine, batch, pool_batch, device)
        loss, parts = method.loss(out, code, target, weight, soft, prior, a)
        engine.backward(loss)
        engine.step()
        method.after_step(engine.module, out, code, target, soft, a)
        t_done = time.perf_counter()  # step time vs data wait: what the benchmarks compare with a plain loop
        counts = {"steps": 1.0, "compute_s": t_done - t_start, "data_wait_s": t_start - t_ready,
                  "ignored_rows": float((code == IGNORED).sum()), "pool_rows": float((code != LABELED).sum()),
                  "hard_rows": float((code == HARD).sum()), "soft_rows": float((code == SOFT).sum())}
        for k, v in {**parts, **counts}.items():
            sums[k] = sums.get(k, 0.0) + v
        t_ready = time.perf_counter()
    return sums


def _group_metrics(sums: dict[str, float], loss_by_epoch: dict, has_pool: bool, device) -> dict:
    """An epoch's metrics over the whole group, not rank 0 alone (every rank has the same keys: same method, same
    loop); appends its losses to loss_by_epoch. The sums travel on the engine's device: NCCL reduces no CPU tensor."""
    import torch.distributed as dist

    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    t = dict(zip(keys, totals.tolist()))
    steps = max(t.get("steps", 0.0), 1.0)
    losses = {k: v / steps for k, v in t.items() if k.startswith("loss")}
    for k, v in losses.items():  # every loss part's curve over the round's epochs: what "it learns" is read from
        loss_by_epoch.setdefault(k, []).append(v)
    metrics = {**losses, "loss_by_epoch": loss_by_epoch, "steps_all_ranks": int(t.get("steps", 0)),
               "ignored_rows": int(t.get("ignored_rows", 0)), "step_time_s": t.get("compute_s", 0.0) / steps,
               "data_wait_s": t.get("data_wait_s", 0.0) / steps}
    if has_pool:  # what the decisions admitted, over every pool row the student saw this epoch
        pool_rows = max(t.get("pool_rows", 0.0), 1.0)
        metrics.update({"pool_rows_seen": int(t.get("pool_rows", 0)), "hard_share": t.get("hard_rows", 0.0) / pool_rows,
                        "soft_share": t.get("soft_rows", 0.0) / pool_rows})
    return metrics


def _report(engine, method, model, params, metrics: dict, state: dict) -> None:
    """ray.train.report of an epoch with its checkpoint: every rank writes its DeepSpeed shard (optimizer state for
    exact resume), rank 0 the plain weights and train_state.json."""
    import deepspeed
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(str(Path(tmp) / DS_DIR), tag="state", exclude_frozen_parameters=True)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if ray.train.get_context().get_world_rank() == 0:
                method.save(model, tmp, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _join_group(cfg) -> tuple[int, list]:
    """Join the process group; this worker's rank and the Ray node of every rank (kept in the metrics and
    train_state.json, so where training ran is checkable)."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    torch.manual_seed(cfg.run.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    worker_nodes = [None] * dist.get_world_size()
    dist.all_gather_object(worker_nodes, ray.get_runtime_context().get_node_id())
    return rank, worker_nodes


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    a = cfg.algorithm
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    rank, worker_nodes = _join_group(cfg)

    # --- model, optimizer, engine
    method = method_of(a)
    model = load_model(cfg, config["class_names"], config["init_checkpoint"]).train()
    method.start_round(model, config.get("pool_stats"), a)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    engine, optimizer = build_engine(model, optimizer, params, cfg.train)
    device = engine.device
    # bf16/fp16: the engine's forward runs under torch.autocast on fp32 weights; the loss is computed in fp32.
    prior = torch.tensor(config["prior"], dtype=torch.float32, device=device)

    # --- resume inside the round (Ray Train restarts failed workers from the last reported checkpoint)
    start_epoch, loss_by_epoch, restored = 0, {}, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        start_epoch, loss_by_epoch, restored = restore(checkpoint, engine, optimizer, params)
        if rank == 0:
            print(f"round {config['round_idx']}: resumed after epoch {restored['epoch']} from the last reported "
                  f"checkpoint (adapter, head, optimizer state)", flush=True)

    t = cfg.train
    micro, accum = t.batch_plan()
    shard = ray.train.get_dataset_shard("train")
    pool = _cycle(ray.train.get_dataset_shard("pool"), a.mu * micro, t) if config.get("has_pool") else None
    # train.max_steps: epochs of steps_per_epoch optimizer steps from a labeled stream that cycles across them;
    # else an epoch is one pass over the labeled shard.
    labeled = _cycle(shard, micro, t) if t.max_steps else None
    epochs, offset, total = t.epochs_per_round_for(cfg.rounds.num_rounds), config["epoch_offset"], config["total_epochs"]
    tracker = None
    if rank == 0 and config.get("tracking_dir"):
        from loft_dist.tracking import Tracker

        tracker = Tracker(config["tracking_dir"])
    for epoch in range(start_epoch, epochs):
        lr = cosine_lr(cfg.train.lr, offset + epoch, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = itertools.islice(labeled, t.steps_per_epoch * accum) if labeled else _batches(shard, micro, t)
        sums = _train_epoch(engine, method, batches, pool, cfg, prior)
        metrics = {"epoch": epoch, "round_epoch": offset + epoch, "lr": lr,
                   **_group_metrics(sums, loss_by_epoch, pool is not None, engine.device), "worker_nodes": worker_nodes}
        if (epoch + 1) % t.checkpoint_every == 0 or epoch == epochs - 1:
            state = {"epoch": epoch, "class_names": config["class_names"], **metrics}
            _report(engine, method, model, params, metrics, {**state, "restored": restored} if restored else state)
            restored = None  # only the first checkpoint after a resume carries the record
        if tracker is not None:
            tracker.log_epoch(config["round_idx"], offset + epoch, metrics)
    if tracker is not None:
        tracker.close()
