"""Our train config → a DeepSpeed config dict (ZeRO stage, precision, accumulation, clipping) and the engine."""

from __future__ import annotations


def grad_accum_steps(t) -> int:
    """train.grad_accum, or the steps that keep train.global_batch_size fixed whatever the worker count."""
    return t.global_batch_size // (t.num_workers * t.micro_batch_size) if t.global_batch_size else t.grad_accum


def deepspeed_config(t) -> dict:
    accum = grad_accum_steps(t)
    cfg = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * t.num_workers,
        "zero_optimization": {"stage": t.zero_stage},
        # A torch optimizer is passed in (no JIT-compiled fused op); ZeRO accepts it with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Always written: left out, DeepSpeed clips at its default global norm 1.0, and grad_clip 0 means off.
        "gradient_clipping": float(t.grad_clip),
    }
    if t.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def build_engine(model, optimizer, params, t):
    """The DeepSpeed engine of one rank (the process group exists already: Ray Train's, or the caller's).

    With one rank at ZeRO stage 0 the engine's backward all-reduce has nothing to reduce, yet it flattens and
    copies every gradient through the communication backend each step (~0.7 ms on the tiny model on CPU,
    measured by bench/train_step.py), so it is turned off there. ZeRO 1-3 keep it: their optimizers move the
    gradients into their partitions on that path, even with one rank.
    """
    import deepspeed
    import torch.distributed as dist

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                   config=deepspeed_config(t))
    if dist.get_world_size() == 1 and t.zero_stage == 0:
        engine.enable_backward_allreduce = False
    return engine, optimizer
