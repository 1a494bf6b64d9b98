"""Our train config → a DeepSpeed config dict (ZeRO stage, precision, accumulation, clipping) and the engine."""

from __future__ import annotations


def deepspeed_config(t) -> dict:
    micro, accum = t.batch_plan()
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * t.num_workers,
        "zero_optimization": {"stage": t.zero_stage},
        # A torch optimizer is passed in (no JIT-compiled fused op); ZeRO accepts it with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Always written: left out, DeepSpeed clips at its default global norm 1.0, and grad_clip 0 means off.
        "gradient_clipping": float(t.grad_clip),
    }
    if t.precision != "fp32":
        # torch.autocast on fp32 weights (DeepSpeed's torch_autocast; fp16 adds its GradScaler), not DeepSpeed's
        # "bf16"/"fp16" sections: at ZeRO 0 those cast the module and wrap the optimizer in FP16_UnfusedOptimizer,
        # a per-tensor Python loop with bf16 gradients, whose step was 1.22-1.34x a plain autocast loop on an H200
        # (BENCHMARKS.md "GPU kit"); and the weights a round saved were the bf16-rounded copies.
        cfg["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[t.precision]}
    return cfg


def build_engine(model, optimizer, params, t):
    """The DeepSpeed engine of one rank (the process group exists already: Ray Train's, or the caller's).

    At ZeRO stage 0 three of the engine's per-step paths cost more than the work they do, which on a small
    adapter is a visible share of the step (bench/train_step.py: engine 1.23x a plain loop at micro batch 8 on
    CPU, 1.03x with these changes):
    - with one rank its backward all-reduce has nothing to reduce, yet copies every gradient through the backend;
    - on fp32 weights (fp32, and bf16 under autocast) it clips with a per-parameter Python loop plus a collective for the norm: at stage 0 the gradients
      are already all-reduced (identical on every rank) when it clips, so torch's fused clip on the local
      gradients computes the same norm and the same scale;
    - there, its zero_grad walks every named parameter of the module, frozen backbone included.
    ZeRO 1-3 and fp16 keep DeepSpeed's own paths: their optimizers (fp16: the GradScaler) own the gradients there.
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                   config=deepspeed_config(t))
    if t.zero_stage == 0:
        if dist.get_world_size() == 1:
            engine.enable_backward_allreduce = False
        if t.precision != "fp16":  # fp16's GradScaler unscales inside DeepSpeed's own clip path
            engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            engine.zero_grad = lambda: optimizer.zero_grad(set_to_none=True)
    return engine, optimizer
