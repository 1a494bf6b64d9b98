from loft_dist.config import load_config
from loft_dist.train.deepspeed_config import deepspeed_config, grad_accum_steps
from loft_dist.train.loop import cosine_lr


def test_global_batch_scales_with_workers_by_default_and_is_kept_fixed_on_request():
    t = load_config(None, ["train.num_workers=4", "train.micro_batch_size=8", "train.grad_accum=2"]).train
    assert deepspeed_config(t)["train_batch_size"] == 4 * 8 * 2
    fixed = load_config(None, ["train.num_workers=4", "train.micro_batch_size=8", "train.global_batch_size=128"]).train
    assert grad_accum_steps(fixed) == 4 and deepspeed_config(fixed)["train_batch_size"] == 128
    fewer = load_config(None, ["train.num_workers=2", "train.micro_batch_size=8", "train.global_batch_size=128"]).train
    assert grad_accum_steps(fewer) == 8  # half the workers → twice the accumulation, same global batch


def test_zero_stage_precision_and_clipping_reach_deepspeed():
    t = load_config(None, ["train.zero_stage=3", "train.grad_clip=1.0", "train.use_gpu=true",
                           "train.precision=bf16"]).train
    ds = deepspeed_config(t)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"]
    assert "optimizer" not in ds  # a torch optimizer is passed in: no JIT-compiled fused op


def test_clipping_is_off_in_deepspeed_when_grad_clip_is_zero():
    from deepspeed.runtime.config import DeepSpeedConfig  # DeepSpeed's own parser, as the engine reads the dict

    def parsed(*overrides):
        return DeepSpeedConfig(deepspeed_config(load_config(None, ["train.num_workers=1", *overrides]).train))

    assert parsed("train.grad_clip=0").gradient_clipping == 0.0  # DeepSpeed's default would be 1.0
    assert parsed("train.grad_clip=2.5").gradient_clipping == 2.5


def test_cosine_schedule_per_epoch_over_the_whole_run():
    assert cosine_lr(0.01, 0, 100) == 0.01
    assert abs(cosine_lr(0.01, 50, 100) - 0.005) < 1e-12
    assert cosine_lr(0.01, 100, 100) < 1e-12
