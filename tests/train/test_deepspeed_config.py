import pytest

from loft_dist.config import load_config
from loft_dist.errors import ConfigError
from loft_dist.train.deepspeed_config import deepspeed_config
from loft_dist.train.loop import cosine_lr


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A 1-rank gloo group, as Ray Train's worker has before build_engine; one per module, since DeepSpeed's comm
    layer keeps the first group it saw."""
    import deepspeed
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)  # what a launcher sets
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'pg'}", rank=0,
                                world_size=1)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()


def test_global_batch_scales_with_workers_by_default_and_is_kept_fixed_on_request():
    t = load_config(None, ["train.num_workers=4", "train.micro_batch_size=8", "train.grad_accum=2"]).train
    assert deepspeed_config(t)["train_batch_size"] == 4 * 8 * 2
    fixed = load_config(None, ["train.num_workers=4", "train.micro_batch_size=8", "train.global_batch_size=128"]).train
    assert fixed.batch_plan() == (8, 4) and deepspeed_config(fixed)["train_batch_size"] == 128
    fewer = load_config(None, ["train.num_workers=2", "train.micro_batch_size=8", "train.global_batch_size=128"]).train
    assert fewer.batch_plan() == (8, 8)  # half the workers → twice the accumulation, same global batch
    # micro_batch_size is a cap: 4 workers of a global 16 take 4 rows each
    small = load_config(None, ["train.num_workers=4", "train.micro_batch_size=16", "train.global_batch_size=16"]).train
    assert small.batch_plan() == (4, 1) and deepspeed_config(small)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 is not allowed: 0 or a multiple of "
                                          r"train.num_workers \(3\)"):
        load_config(None, ["train.num_workers=3", "train.global_batch_size=16"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3 is not allowed: a divisor of the 8 rows"):
        load_config(None, ["train.num_workers=2", "train.micro_batch_size=3", "train.global_batch_size=16"])


PAPER_CONFIGS = {"configs/cifar100_lt_loft.yaml": [], "configs/cifar100_lt_ulfine.yaml": [],
                 "configs/cifar100_lt_ow.yaml": ["data.ood_path=/ood"],
                 "configs/imagenet127_1pct_ow.yaml": ["data.ood_path=/ood", "data.test_path=/val"]}


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("path", sorted(PAPER_CONFIGS))
def test_paper_configs_train_batch_16_for_10000_steps_on_any_worker_count(path, workers):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(str(root / path), [f"train.num_workers={workers}", "data.source_path=/src", *PAPER_CONFIGS[path]])
    ds = deepspeed_config(cfg.train)
    assert ds["train_batch_size"] == 16 and cfg.algorithm.mu == 7  # SPEC A.0.2: B = 16, mu B = 112 pool rows
    micro, accum = cfg.train.batch_plan()
    assert workers * micro * accum == 16
    # 10,000 optimizer steps across the rounds, the cosine schedule stepped every 100
    epochs = cfg.train.epochs_per_round_for(cfg.rounds.num_rounds)
    assert cfg.rounds.num_rounds * epochs * cfg.train.steps_per_epoch == 10_000 and cfg.train.steps_per_epoch == 100


def test_max_steps_must_split_into_whole_epochs_per_round():
    with pytest.raises(ConfigError, match=r"train.max_steps=1000 is not allowed: 0 or a multiple of rounds.num_rounds "
                                          r"x train.steps_per_epoch \(3 x 100\)"):
        load_config(None, ["train.max_steps=1000", "rounds.num_rounds=3"])
    t = load_config(None, ["train.max_steps=600", "rounds.num_rounds=3"]).train
    assert t.epochs_per_round_for(3) == 2


def test_zero_stage_precision_and_clipping_reach_deepspeed():
    t = load_config(None, ["train.zero_stage=3", "peft.method=adaptformer", "train.grad_clip=1.0", "train.use_gpu=true",
                           "train.precision=bf16"]).train
    ds = deepspeed_config(t)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 1.0
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds  # fp32 weights
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


def test_one_rank_engine_at_zero_0_takes_the_fast_paths_and_still_trains_like_plain_torch(one_rank_group):
    """build_engine turns the world-size-1 all-reduce off and clips / zeroes gradients with torch's fused calls;
    the weights must still follow plain torch exactly, with accumulation over 2 micro batches and clipping."""
    import torch

    from loft_dist.train.deepspeed_config import build_engine

    t = load_config(None, ["train.num_workers=1", "train.micro_batch_size=4", "train.grad_accum=2",
                           "train.grad_clip=0.05", "train.zero_stage=0"]).train
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))  # noqa: E731
    plain = make()
    ours = make()
    ours.load_state_dict(plain.state_dict())
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(8)]

    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    engine, _ = build_engine(ours, opt, list(ours.parameters()), t)
    assert engine.enable_backward_allreduce is False
    for x, y in data:
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()

    opt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    for i, (x, y) in enumerate(data):
        (torch.nn.functional.cross_entropy(plain(x), y) / 2).backward()
        if i % 2 == 1:
            clipped = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
    assert clipped > 0.05  # clipping really acted, so a clip in the wrong place would show
    for a, b in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_trains_fp32_weights_under_autocast_like_a_plain_autocast_loop(one_rank_group):
    """train.precision=bf16 is torch.autocast inside the engine on fp32 weights, the step of a plain autocast loop:
    the module is not cast, the optimizer is the torch one (not DeepSpeed's per-tensor FP16_UnfusedOptimizer), and
    the weights follow the plain loop."""
    import torch

    from loft_dist.train.deepspeed_config import build_engine

    t = load_config(None, ["train.num_workers=1", "train.micro_batch_size=4", "train.grad_clip=0",
                           "train.use_gpu=true", "train.precision=bf16"]).train
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))  # noqa: E731
    plain, ours = make(), make()
    ours.load_state_dict(plain.state_dict())
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(4)]

    opt = torch.optim.SGD(ours.parameters(), lr=0.5, momentum=0.9)
    engine, optimizer = build_engine(ours, opt, list(ours.parameters()), t)
    assert type(optimizer) is torch.optim.SGD, type(optimizer).__name__
    for x, y in data:
        out = engine(x)
        assert out.dtype == torch.bfloat16  # the forward ran under autocast
        engine.backward(torch.nn.functional.cross_entropy(out.float(), y))
        engine.step()
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())

    opt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = plain(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
