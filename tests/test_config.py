import pytest

from loft_dist.config import ConfigError, load_config


def test_defaults_are_valid_and_overrides_apply(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  num_workers: 3\nalgorithm:\n  c_hard: 0.7\n")
    cfg = load_config(str(f), ["algorithm.c_ood=0.2", "run.name=x"])
    assert cfg.train.num_workers == 3 and cfg.algorithm.c_hard == 0.7 and cfg.algorithm.c_ood == 0.2
    assert cfg.run.name == "x" and cfg.run_dir.endswith("runs/x")


@pytest.mark.parametrize("override, must_contain", [
    (["train.num_wrkers=2"], ["unknown config key 'train.num_wrkers'", "num_workers", "micro_batch_size"]),
    (["trian.num_workers=2"], ["unknown config key 'trian'", "train", "scoring"]),
    (["algorithm.c_hard=1.5"], ["algorithm.c_hard=1.5", "[0, 1]"]),
    (["algorithm.c_ood=0.9"], ["algorithm.c_ood=0.9", "c_hard"]),
    (["train.num_workers=two"], ["train.num_workers", "two"]),
    (["algorithm.name=lofty"], ["algorithm.name='lofty'", "loft"]),
    (["train.zero_stage=4"], ["train.zero_stage=4", "0, 1, 2, 3"]),
    (["train.precision=bf16"], ["train.precision='bf16'", "use_gpu"]),
    (["scoring.max_actors=0"], ["scoring.max_actors=0", "min_actors"]),
    (["train.prefetch_batches=-1"], ["train.prefetch_batches=-1", ">= 0"]),
    (["train"], ["not key=value"]),
    (["train=3"], ["'train' is a section"]),
])
def test_bad_config_names_key_value_and_allowed(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for text in must_contain:
        assert text in str(e.value), (text, str(e.value))


def test_unknown_key_in_yaml_file_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  nme: ViT-B-16\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nme'.*name.*pretrained"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
