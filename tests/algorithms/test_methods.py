"""One switch per method: algorithm.name implies its config values, which YAML and overrides can still change."""

import pytest

from loft_dist.algorithms import METHODS
from loft_dist.config import ConfigError, load_config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_valid_on_the_tiny_config(name):
    cfg = load_config("configs/tiny.yaml", [f"algorithm.name={name}"])
    for section, values in METHODS[name].defaults.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


def test_implied_values():
    a = load_config(None, []).algorithm
    assert (a.name, a.c_hard, a.c_ood, a.zs_filter) == ("loft", 0.6, 0.0, False)  # closed world: nothing rejected
    ow = load_config(None, ["algorithm.name=loft_ow"]).algorithm
    assert (ow.c_ood, ow.zs_filter, ow.zs_threshold) == (0.3, True, 0.6)
    assert load_config(None, ["algorithm.name=lp"]).peft.method == "none"
    assert load_config(None, ["algorithm.name=fft"]).peft.method == "full"
    assert load_config(None, ["algorithm.name=lft"]).peft.method == "lora"  # the config's adapter


def test_yaml_and_overrides_win_over_implied_values(tmp_path):
    f = tmp_path / "fm.yaml"
    f.write_text("algorithm:\n  name: fixmatch\n  c_hard: 0.9\n")
    a = load_config(str(f), ["algorithm.c_ood=0.5"]).algorithm
    assert (a.c_hard, a.c_ood, a.lambda_uc) == (0.9, 0.5, 0.0)
    # the last name given decides the implied values; explicit ones stay
    a = load_config(str(f), ["algorithm.name=loft"]).algorithm
    assert (a.c_hard, a.c_ood, a.lambda_uc) == (0.9, 0.0, 1.0)


@pytest.mark.parametrize("overrides, must_contain", [
    (["algorithm.name=lp", "peft.method=lora"], ["peft.method='lora'", "none"]),
    (["algorithm.name=fft", "peft.method=none"], ["peft.method='none'", "full"]),
    (["algorithm.name=lft", "peft.method=full"], ["peft.method='full'", "adaptformer"]),
    (["algorithm.name=lp", "algorithm.mode=online"], ["algorithm.mode='online'", "offline"]),
    (["algorithm.mode=batch"], ["algorithm.mode='batch'", "online"]),
    (["algorithm.mu=0"], ["algorithm.mu=0"]),
    (["algorithm.paf.stat=median"], ["algorithm.paf.stat='median'", "pl_count"]),
    (["algorithm.dlf.rule=max"], ["algorithm.dlf.rule='max'", "prob"]),
    (["algorithm.dlf.use_for=[eval]"], ["algorithm.dlf.use_for", "pseudo_label"]),
    (["algorithm.dlf.weight=2"], ["algorithm.dlf.weight=2"]),
    (["algorithm.paf.gamma=1"], ["algorithm.paf.gamma", "momentum"]),
    (["train.zero_stage=3", "peft.method=lora"], ["train.zero_stage=3", "ds_numel", "peft.method=adaptformer"]),
])
def test_bad_method_settings_name_key_value_and_allowed(overrides, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for s in must_contain:
        assert s in str(e.value), (s, str(e.value))


def test_ulfine_config_file_is_the_tiny_run_with_the_switch():
    from dataclasses import asdict

    spelled = asdict(load_config("configs/ulfine_tiny.yaml"))
    switched = asdict(load_config("configs/tiny.yaml", ["algorithm.name=ulfine", "run.name=ulfine_tiny"]))
    assert spelled == switched
