import logging
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from loft_dist.config import ConfigError, from_dict, load_config, resumable_keys, to_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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
    (["scoring.precision=fp16"], ["scoring.precision='fp16'", "gpus_per_actor"]),
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


# ---------------------------------------------------------------------------------------------------------------
# constraints beside their fields: one generic check, nested sections included

@pytest.mark.parametrize("override, message", [
    ("peft.dropout=1.0", "peft.dropout=1.0 is not allowed: a probability in [0, 1)"),  # an upper bound (lt)
    ("train.num_workers=0", "train.num_workers=0 is not allowed: an integer >= 1"),  # a lower bound, no hint
    ("algorithm.paf.momentum=1.5", "algorithm.paf.momentum=1.5 is not allowed: in [0, 1]"),  # nested section
    ("algorithm.temperature=0", "algorithm.temperature=0.0 is not allowed: > 0"),
    ("data.ood_count=-2", "data.ood_count=-2 is not allowed: null (use data.ood_ratio), -1"),  # Optional, bounded
    ("data.protocol=random", "data.protocol='random' is not allowed; choose one of: lt, percent"),
    ("algorithm.dlf.rule=max", "algorithm.dlf.rule='max' is not allowed; choose one of: sum, weighted, prob"),
    ("algorithm.dlf.use_for=[test,eval]", "algorithm.dlf.use_for=['test', 'eval'] is not allowed: a list of "
                                          "pseudo_label, train, test"),
])
def test_field_constraints_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message), str(e.value)


def test_bounds_are_inclusive_where_they_say_so_and_null_passes_where_optional():
    cfg = load_config(None, ["algorithm.paf.momentum=1", "algorithm.c_hard=1", "algorithm.c_ood=0", "peft.dropout=0",
                             "data.ood_count=null", "peft.layers=null", "algorithm.dlf.use_for=[]"])
    assert cfg.algorithm.paf.momentum == 1 and cfg.data.ood_count is None and cfg.algorithm.dlf.use_for == []


def test_every_algorithm_name_is_a_method_and_no_other():
    from loft_dist.config import METHODS

    for name in METHODS:
        load_config(None, [f"algorithm.name={name}"])
    with pytest.raises(ConfigError, match="choose one of: " + ", ".join(METHODS)):
        load_config(None, ["algorithm.name=mixmatch"])


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_is_valid(path):
    # the paths of the data are the user's, given on the command line as each file's header says
    data = (OmegaConf.to_container(OmegaConf.load(CONFIGS / path)) or {}).get("data", {})
    paths = {"source_path": data.get("source", "embedded") != "embedded",
             "test_path": data.get("source") in ("imagefolder", "manifest") and data.get("test_source") != "carve",
             "ood_path": data.get("ood_source", "generated") != "generated"}
    load_config(str(CONFIGS / path), [f"data.{key}=/data/{key}" for key, needed in paths.items() if needed])


def test_resumable_keys_are_the_where_it_runs_keys():
    assert sorted(resumable_keys()) == [
        "run.lease_timeout_s", "run.num_cpus", "run.object_store_mb", "run.ray_address", "run.s3_endpoint",
        "scoring.batch_size", "scoring.cpus_per_actor",
        "scoring.cpus_per_data_task", "scoring.gpus_per_actor", "scoring.max_actors", "scoring.min_actors",
        "scoring.torch_threads", "train.checkpoint_every", "train.max_failures"]


def test_config_imports_no_algorithms():
    code = ("import sys, loft_dist.config; "
            "print([m for m in sys.modules if m.startswith('loft_dist') and m not in ('loft_dist', 'loft_dist.config', "
            "'loft_dist.errors')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_method_table_is_shared_with_the_algorithms_package():
    import loft_dist.algorithms as algorithms
    import loft_dist.config as config

    assert algorithms.METHODS is config.METHODS and algorithms.get_method is config.get_method
    assert algorithms.Method is config.Method and algorithms.ADAPTERS is config.ADAPTERS


def test_a_run_dir_written_with_a_retired_key_still_resumes_exports_and_loads(tmp_path, caplog):
    from loft_dist.rounds import _check_same_run
    from loft_dist.storage import RunLayout

    cfg = load_config(None, [f"run.storage_path={tmp_path}"])
    old = to_dict(cfg)
    old["eval"]["batch_size"] = 256  # what every run dir written before the key was dropped holds
    old["scoring"]["shards_per_chunk"] = 64  # likewise, before scoring.rows_per_chunk, which it did not have
    del old["scoring"]["rows_per_chunk"]
    saved = tmp_path / "tiny" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    _check_same_run(cfg, RunLayout(str(saved.parent)))  # the resume guard: same run
    assert from_dict(OmegaConf.to_container(OmegaConf.load(saved))) == cfg  # export reads it with from_dict
    with caplog.at_level(logging.WARNING, logger="loft_dist.config"):
        assert load_config(str(saved)) == cfg  # `loft-dist run|score runs/<name>/config.yaml`
    assert "eval.batch_size is no longer used" in caplog.text and "scoring.shards_per_chunk is no longer used" in caplog.text
    # the guard still refuses a real change
    with pytest.raises(ConfigError, match=r"train.lr: 0.02 → 0.5"):
        _check_same_run(load_config(None, [f"run.storage_path={tmp_path}", "train.lr=0.5"]),
                        RunLayout(str(saved.parent)))
