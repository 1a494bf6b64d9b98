"""The recipe of one Ray Train worker: build the model, wrap it in a DeepSpeed engine, stream its data shard,
train with the LoFT losses, and report metrics + a checkpoint every epoch (every rank, same cadence)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from loft_dist.algorithms.loft import loft_loss
from loft_dist.config import from_dict
from loft_dist.models.checkpoint import STATE_FILE, load_classifier, save_weights
from loft_dist.train.deepspeed_config import deepspeed_config

DS_DIR = "deepspeed"


def cosine_lr(base_lr: float, epoch: int, total_epochs: int) -> float:
    """CosineAnnealingLR(T_max = total epochs), stepped per epoch, no warmup (SPEC A.0.3)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / max(total_epochs, 1)))


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    if not cfg.train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")
    torch.manual_seed(cfg.run.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    # --- model, optimizer, engine
    model = load_classifier(cfg.model, cfg.peft, config["class_names"], config["init_checkpoint"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                   config=deepspeed_config(cfg.train))
    device = engine.device
    # DeepSpeed casts the module to bf16/fp16 when enabled; inputs follow, the loss is computed in fp32.
    in_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    prior = torch.tensor(config["prior"], dtype=torch.float32, device=device)

    # --- resume inside the round (Ray Train restarts failed workers from the last reported checkpoint)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / DS_DIR), load_module_strict=False)
            start_epoch = json.loads((Path(d) / STATE_FILE).read_text())["epoch"] + 1

    shard = ray.train.get_dataset_shard("train")
    epochs, offset, total = cfg.train.epochs_per_round, config["epoch_offset"], config["total_epochs"]
    for epoch in range(start_epoch, epochs):
        lr = cosine_lr(cfg.train.lr, offset + epoch, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(6, dtype=torch.float64)  # loss, loss_s, loss_hard, loss_soft, steps, ignored rows
        for batch in shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=False,
                                              local_shuffle_buffer_size=cfg.train.shuffle_buffer or None):
            code = batch["code"].to(device)
            logits = engine(batch["image"].to(device, dtype=in_dtype)).float()
            loss, parts = loft_loss(logits, code, batch["target"].to(device), batch["weight"].to(device),
                                    batch["soft"].to(device), prior, cfg.algorithm)
            engine.backward(loss)
            engine.step()
            sums += torch.tensor([parts["loss"], parts["loss_s"], parts["loss_hard"], parts["loss_soft"], 1.0,
                                  float((code == -2).sum())], dtype=torch.float64)
        dist.all_reduce(sums)  # metrics of the whole group, not of rank 0 alone
        steps = max(sums[4].item(), 1.0)
        metrics = {"epoch": epoch, "round_epoch": offset + epoch, "lr": lr, "loss": sums[0].item() / steps,
                   "loss_s": sums[1].item() / steps, "loss_hard": sums[2].item() / steps,
                   "loss_soft": sums[3].item() / steps, "steps_all_ranks": int(sums[4].item()),
                   "ignored_rows": int(sums[5].item())}

        with tempfile.TemporaryDirectory() as tmp:
            # Every rank writes its DeepSpeed shard (optimizer state for exact resume); rank 0 the plain weights.
            engine.save_checkpoint(str(Path(tmp) / DS_DIR), tag="state", exclude_frozen_parameters=True)
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    save_weights(model, tmp, {"epoch": epoch, "class_names": config["class_names"], **metrics})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
