"""`prepare_dataset` on real-format sources: per-class counts against the protocol formulas, id layout,
open-world mixing, determinism, dataset.json, bad records and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from source_files import save_png, write_py2_pickle
from loft_dist.data import protocol
from loft_dist.data.prepare import OOD_ID_OFFSET, TEST_ID_OFFSET, prepare_dataset
from loft_dist.data.sources import SourceError, read_cifar

REAL_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar-10-subset"
SMALL_CLASSES = ["apple", "bear", "cloud", "dolphin", "maple"]  # the small_cifar100 fixture
SMALL_TRAIN_PER_CLASS, SMALL_TEST_PER_CLASS = 30, 6
C = len(SMALL_CLASSES)


def read(root, split, columns=("id", "label", "true_label", "source")) -> dict[str, np.ndarray]:
    files = sorted((Path(root) / split).glob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=list(columns))
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def per_class(labels: np.ndarray) -> list[int]:
    return np.bincount(labels[labels >= 0], minlength=C).tolist()


def lt(n1=12, gamma_l=4, m1=16, gamma_u=4, **kw) -> dict:
    return {"source": "cifar100", "n1": n1, "gamma_l": gamma_l, "m1": m1, "gamma_u": gamma_u, "ood_ratio": 0,
            "ood_test": 0, "rows_per_shard": 32, **kw}


# ---------------------------------------------------------------------------------------
# Protocols


@pytest.mark.parametrize("dist", ["consistent", "uniform", "reversed"])
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "labeled_in_unlabeled"])
def test_lt_protocol_counts_ids_and_labels(small_cifar100, make_config, dist, overlap):
    cfg = make_config(**lt(source_path=small_cifar100, unlabeled_dist=dist,
                           labeled_in_unlabeled=str(overlap).lower()))
    info = prepare_dataset(cfg)
    n = protocol.long_tail_counts(12, 4, C)
    m = {"consistent": protocol.long_tail_counts(16, 4, C), "uniform": [16] * C,
         "reversed": protocol.long_tail_counts(16, 4, C)[::-1]}[dist]
    pool = [a + b for a, b in zip(n, m)] if overlap else m
    assert n == [12, 8, 6, 4, 3]
    assert info["counts"] == {"labeled": n, "unlabeled": pool, "test": [SMALL_TEST_PER_CLASS] * C}

    lab, unl, test = (read(cfg.data_root, s) for s in ("labeled", "unlabeled", "test"))
    assert per_class(lab["true_label"]) == n and per_class(unl["true_label"]) == pool
    assert per_class(test["true_label"]) == [SMALL_TEST_PER_CLASS] * C  # the official test batch, whole
    assert (lab["label"] == lab["true_label"]).all()
    assert (unl["label"] == -1).all() and (test["label"] == -1).all()
    for split in (lab, unl, test):
        assert len(np.unique(split["id"])) == len(split["id"])
    if overlap:  # the DARP/ACR/LoFT convention: every labeled image is in the pool too, under the same id
        assert set(lab["id"]) <= set(unl["id"])
    else:
        assert not set(lab["id"]) & set(unl["id"])
    assert (test["id"] >= TEST_ID_OFFSET).all()
    assert (lab["id"] < TEST_ID_OFFSET).all() and (unl["id"] < TEST_ID_OFFSET).all()
    # An id is the image's index in its source: the stored label and origin match the source's.
    train = read_cifar(small_cifar100, "train", "cifar100")
    assert (train.labels[lab["id"]] == lab["true_label"]).all()
    assert all(unl["source"][k] == train.origin(int(unl["id"][k])) for k in range(len(unl["id"])))
    assert info["rows"] == {"labeled": sum(n), "unlabeled": sum(pool), "test": C * SMALL_TEST_PER_CLASS}
    assert info["ood_counts"] == {"unlabeled": 0, "ood_test": 0} and not (Path(cfg.data_root) / "ood_test").exists()


def test_percent_protocol_on_an_image_folder_with_its_own_test_set(image_tree, make_config):
    cfg = make_config(source="imagefolder", source_path=image_tree["train"], test_path=image_tree["test"],
                      protocol="percent", labeled_percent=10, ood_ratio=0, ood_test=0)
    info = prepare_dataset(cfg)
    # Classes sorted by name: ant 40, bee 25, cat 10, dog 3, eel 1 → 10 % rounded half up, at least 1.
    assert info["class_names"] == ["ant", "bee", "cat", "dog", "eel"]
    assert info["counts"]["labeled"] == [4, 3, 1, 1, 1]
    assert info["counts"]["unlabeled"] == [36, 22, 9, 2, 0]
    # test/ lists its directories in another order; they are matched to the training classes by name.
    test = read(cfg.data_root, "test")
    assert per_class(test["true_label"]) == [2] * 5
    assert all(Path(s).parent.name == info["class_names"][t] for s, t in zip(test["source"], test["true_label"]))
    lab = read(cfg.data_root, "labeled")
    assert all(Path(s).parent.name == info["class_names"][t] for s, t in zip(lab["source"], lab["true_label"]))
    # labeled_in_unlabeled: the pool is the whole class (the released LoFT code on ImageNet-127).
    info = prepare_dataset(make_config("all", source="imagefolder", source_path=image_tree["train"],
                                       test_path=image_tree["test"], protocol="percent", labeled_percent=10,
                                       labeled_in_unlabeled="true", ood_ratio=0, ood_test=0))
    assert info["counts"]["unlabeled"] == [40, 25, 10, 3, 1]

    save_png(image_tree["test"] / "fox" / "f.png", np.random.default_rng(0))
    with pytest.raises(SourceError, match=r"data.test_path=.*class 'fox' is not a class of the training set"):
        prepare_dataset(make_config("fox", source="imagefolder", source_path=image_tree["train"],
                                    test_path=image_tree["test"], protocol="percent"))
    for f in (image_tree["test"] / "dog").iterdir():
        f.unlink()
    (image_tree["test"] / "fox" / "f.png").unlink()
    (image_tree["test"] / "fox").rmdir()
    (image_tree["test"] / "dog").rmdir()
    with pytest.raises(SourceError, match=r"data.test_path=.*class 3 \('dog'\) has no test images"):
        prepare_dataset(make_config("dog", source="imagefolder", source_path=image_tree["train"],
                                    test_path=image_tree["test"], protocol="percent"))


def test_carved_test_split_comes_from_the_training_source(small_cifar100, make_config):
    cfg = make_config(**lt(source_path=small_cifar100, n1=8, test_source="carve", test_per_class=5,
                           labeled_in_unlabeled="true"))
    info = prepare_dataset(cfg)
    assert info["counts"]["test"] == [5] * C
    assert info["sources"]["test"].startswith("carved") and info["id_offsets"]["test"] == 0
    lab, unl, test = (set(read(cfg.data_root, s)["id"]) for s in ("labeled", "unlabeled", "test"))
    assert max(test) < SMALL_TRAIN_PER_CLASS * C and not test & (lab | unl)


def test_same_seed_same_bytes_other_seed_other_split(small_cifar100, make_config):
    kw = lt(source_path=small_cifar100, ood_ratio=0.5, ood_test=4, ood_image_size=16)
    a, b = prepare_dataset(make_config("a", **kw)), prepare_dataset(make_config("b", **kw))
    assert a["checksums"] == b["checksums"] and len(a["checksums"]) == sum(a["shards"].values())
    for split in ("labeled", "unlabeled", "test", "ood_test"):
        for f in sorted((Path(make_config("a").data_root) / split).glob("*.parquet")):
            assert f.read_bytes() == (Path(make_config("b").data_root) / split / f.name).read_bytes()
    c = prepare_dataset(make_config("c", run__seed=1, **kw))
    assert c["counts"] == a["counts"]
    ids = {k: set(read(make_config(k).data_root, "labeled")["id"]) for k in ("a", "c")}
    assert ids["a"] != ids["c"]


def test_dataset_json_fields_and_skip_when_complete(small_cifar100, make_config):
    cfg = make_config(**lt(source_path=small_cifar100))
    info = prepare_dataset(cfg)
    on_disk = json.loads((Path(cfg.data_root) / "dataset.json").read_text())
    assert on_disk == info
    assert set(info) >= {"schema_version", "class_names", "counts", "ood_counts", "rows", "shards", "bytes",
                         "protocol", "sources", "id_offsets", "checksums"}
    p = info["protocol"]
    assert (p["protocol"], p["n1"], p["gamma_l"], p["m1"], p["gamma_u"], p["unlabeled_dist"], p["seed"]) == \
           ("lt", 12, 4.0, 16, 4.0, "consistent", 0)
    assert info["class_names"] == SMALL_CLASSES and info["sources"]["test"] == f"official: {small_cifar100}"
    shard = next((Path(cfg.data_root) / "unlabeled").glob("*.parquet"))
    assert pq.ParquetFile(shard).metadata.row_group(0).column(1).compression == "ZSTD"
    assert info["shards"]["unlabeled"] == -(-info["rows"]["unlabeled"] // 32)  # rows_per_shard caps each shard

    before = shard.stat().st_mtime_ns
    assert prepare_dataset(cfg) == info and shard.stat().st_mtime_ns == before  # same protocol: nothing rewritten
    again = prepare_dataset(make_config(**lt(source_path=small_cifar100, n1=10)))
    assert again["counts"]["labeled"][0] == 10 and again["protocol"]["n1"] == 10
    assert not list(Path(cfg.data_root).glob(".*tmp*"))


# ---------------------------------------------------------------------------------------
# Open world


def _ood_manifest(image_tree) -> Path:
    manifest = image_tree["ood"].parent / "ood.csv"
    pd.DataFrame({"path": [f"ood/coco_{i:06d}.png" for i in range(12)]}).to_csv(manifest, index=False)
    return manifest


@pytest.mark.parametrize("ood_source", ["generated", "cifar10", "imagefolder", "manifest"])
def test_ood_images_join_the_pool_with_their_own_ids(small_cifar100, small_cifar10, image_tree, make_config,
                                                     ood_source):
    path = {"generated": None, "cifar10": small_cifar10, "imagefolder": image_tree["ood"],
            "manifest": _ood_manifest(image_tree)}[ood_source]
    cfg = make_config(**lt(source_path=small_cifar100, ood_source=ood_source, ood_count=7, ood_test=3,
                           ood_image_size=16, **({"ood_path": path} if path else {})))
    info = prepare_dataset(cfg)
    assert info["ood_counts"] == {"unlabeled": 7, "ood_test": 3}
    unl, ood_test = read(cfg.data_root, "unlabeled"), read(cfg.data_root, "ood_test")
    is_ood = unl["id"] >= OOD_ID_OFFSET
    assert is_ood.sum() == 7 and (unl["true_label"][is_ood] == -1).all() and (unl["label"] == -1).all()
    assert (unl["true_label"][~is_ood] >= 0).all()
    assert len(ood_test["id"]) == 3 and (ood_test["true_label"] == -1).all() and (ood_test["id"] >= OOD_ID_OFFSET).all()
    assert not set(ood_test["id"]) & set(unl["id"][is_ood])  # never the same OOD image in pool and ood_test
    assert info["rows"]["unlabeled"] == sum(info["counts"]["unlabeled"]) + 7
    origin = {"generated": "ood_photos_textures:", "cifar10": "cifar10:data_batch_",
              "imagefolder": str(image_tree["ood"] / "coco_"), "manifest": str(image_tree["ood"] / "coco_")}
    assert all(s.startswith(origin[ood_source]) for s in np.concatenate([unl["source"][is_ood], ood_test["source"]]))


def test_generated_ood_images_have_the_id_images_native_size(small_cifar100, make_config):
    # data.image_size is 224, the CIFAR images 32 px: were the OOD images 224 px, their size alone would separate them
    cfg = make_config(**lt(source_path=small_cifar100, ood_count=6, ood_test=2, image_size=224))
    prepare_dataset(cfg)
    import io

    from PIL import Image

    for split in ("unlabeled", "ood_test"):
        images = read(cfg.data_root, split, columns=("image", "true_label"))
        sizes = {(int(t) < 0, Image.open(io.BytesIO(b)).size) for b, t in zip(images["image"], images["true_label"])}
        assert sizes <= {(False, (32, 32)), (True, (32, 32))} and (True, (32, 32)) in sizes, (split, sizes)


def test_ood_ratio_and_all_of_an_ood_source(small_cifar100, image_tree, make_config):
    info = prepare_dataset(make_config("r", **lt(source_path=small_cifar100, ood_ratio=0.25, ood_test=0)))
    pool_id = sum(info["counts"]["unlabeled"])
    assert info["ood_counts"]["unlabeled"] == round(0.25 * pool_id)
    info = prepare_dataset(make_config("all", **lt(source_path=small_cifar100, ood_source="imagefolder",
                                                   ood_path=image_tree["ood"], ood_count=-1, ood_test=2)))
    assert info["ood_counts"] == {"unlabeled": 10, "ood_test": 2}
    with pytest.raises(SourceError, match=r"data.ood_path=.*holds 12 images, the build needs 11 .* \+ 2 for ood_test"):
        prepare_dataset(make_config("big", **lt(source_path=small_cifar100, ood_source="imagefolder",
                                                ood_path=image_tree["ood"], ood_count=11, ood_test=2)))


def test_rebuild_without_ood_test_removes_the_old_split(small_cifar100, make_config):
    prepare_dataset(make_config(**lt(source_path=small_cifar100, ood_test=5, ood_image_size=16)))
    assert (Path(make_config().data_root) / "ood_test").is_dir()
    info = prepare_dataset(make_config(**lt(source_path=small_cifar100, ood_test=0)))
    assert "ood_test" not in info["rows"] and not (Path(make_config().data_root) / "ood_test").exists()


# ---------------------------------------------------------------------------------------
# Bad records: one error naming the config key, the file and the record


def _manifest(root: Path, rows: list[tuple[str, str]], name="m.csv") -> Path:
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / name, index=False)
    return root / name


@pytest.fixture
def manifest_images(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(6):
        save_png(tmp_path / "imgs" / f"{i}.png", rng)
    return tmp_path


def test_bad_records_name_key_file_and_record(small_cifar100, manifest_images, make_config):
    root = manifest_images
    good = [(f"imgs/{i}.png", "cat" if i % 2 else "dog") for i in range(6)]
    m = _manifest(root, good)
    test = _manifest(root, [("imgs/0.png", "cat"), ("imgs/1.png", "cow")], "test.csv")
    with pytest.raises(SourceError) as e:
        prepare_dataset(make_config(source="manifest", source_path=m, test_path=test, ood_ratio=0, ood_test=0))
    msg = str(e.value)
    assert msg.startswith(f"data.test_path={test}:") and "record 1 (line 3)" in msg and "'cow'" in msg

    missing = _manifest(root, good[:5] + [("imgs/gone.png", "cat")], "missing.csv")
    with pytest.raises(SourceError, match=rf"data.source_path={missing}: .*record 5 .*gone.png not found"):
        prepare_dataset(make_config(source="manifest", source_path=missing))

    (root / "cols.csv").write_text("file,class\nimgs/0.png,cat\n")
    with pytest.raises(SourceError, match=r"data.source_path=.*cols.csv.*needs columns 'path,label'"):
        prepare_dataset(make_config(source="manifest", source_path=root / "cols.csv"))

    gap = _manifest(root, [(p, str(2 * (i % 2))) for i, (p, _) in enumerate(good)], "gap.csv")  # labels 0 and 2
    with pytest.raises(SourceError, match=r"data.source_path=.*gap.csv: class 1 \('1'\) has no training images"):
        prepare_dataset(make_config(source="manifest", source_path=gap))

    base = small_cifar100 / "cifar-100-python"
    bad = np.zeros((2, 3072), np.uint8)
    write_py2_pickle(base / "test", {b"fine_labels": [0, 7], b"data": bad})
    with pytest.raises(SourceError) as e:
        prepare_dataset(make_config(**lt(source_path=small_cifar100)))
    msg = str(e.value)
    assert msg.startswith(f"data.source_path={small_cifar100} (its official test batch") and \
           f"{base / 'test'}: record 1 has label 7, outside the range 0..4" in msg


def test_a_class_too_small_for_the_protocol_is_named(small_cifar100, make_config):
    with pytest.raises(SourceError, match=r"class 0 has 30 images but the protocol needs 31 .* \(class 0 is 'apple'\)"):
        prepare_dataset(make_config(**lt(source_path=small_cifar100, n1=15, m1=16)))


def test_undecodable_images_are_stored_as_they_are(manifest_images, make_config):
    root = manifest_images
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    m = _manifest(root, [(f"imgs/{i}.png", "a" if i < 3 else "b") for i in range(6)] + [("imgs/broken.png", "b")])
    cfg = make_config(source="manifest", source_path=m, protocol="percent", labeled_percent=50, test_source="carve",
                      test_per_class=1, ood_ratio=0, ood_test=0)
    prepare_dataset(cfg)
    rows = {}
    for split in ("labeled", "unlabeled", "test"):
        t = read(cfg.data_root, split, ("source", "image"))
        rows.update(zip(t["source"], t["image"]))
    assert rows[str(root / "imgs" / "broken.png")] == b"\x89PNG\r\n\x1a\n truncated"
    assert len(rows) == 7


def test_cli_prepare_prints_one_line_per_error(small_cifar100, tmp_path, capsys):
    from loft_dist.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("data:\n  source: cifar100\n  n1: 12\n  gamma_l: 4\n  m1: 16\n  gamma_u: 4\n  ood_test: 4\n"
                      "  ood_image_size: 16\n")
    root = tmp_path / "cli_ds"
    assert main(["prepare", str(config), f"data.source_path={small_cifar100}", f"data.root={root}"]) == 0
    info = json.loads((root / "dataset.json").read_text())
    assert info["rows"]["test"] == C * SMALL_TEST_PER_CLASS and info["ood_counts"]["ood_test"] == 4
    capsys.readouterr()

    assert main(["prepare", str(config), f"data.source_path={tmp_path / 'nowhere'}", f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"loft-dist: error: data.source_path={tmp_path / 'nowhere'}: CIFAR files not found")


# ---------------------------------------------------------------------------------------
# The real CIFAR-10 subset


def test_real_cifar10_subset_long_tailed_with_official_test(make_config):
    if not (REAL_CIFAR10 / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_CIFAR10} (shared data not mounted)")
    # 484-540 images per class: N1=300 + M1=150 (consistent, gamma 10) fits the smallest class.
    cfg = make_config(source="cifar10", source_path=REAL_CIFAR10, n1=300, gamma_l=10, m1=150, gamma_u=10,
                      ood_ratio=0, ood_test=0, rows_per_shard=1024)
    info = prepare_dataset(cfg)
    n, m = protocol.long_tail_counts(300, 10, 10), protocol.long_tail_counts(150, 10, 10)
    assert info["counts"]["labeled"] == n == [300, 232, 179, 139, 107, 83, 64, 50, 38, 30]
    assert info["counts"]["unlabeled"] == m
    test = read(cfg.data_root, "test")
    official = read_cifar(REAL_CIFAR10, "test")
    assert len(test["id"]) == 1017 and info["counts"]["test"] == np.bincount(official.labels, minlength=10).tolist()
    assert info["class_names"][:2] == ["airplane", "automobile"]
    assert info["shards"] == {s: -(-info["rows"][s] // 1024) for s in ("labeled", "unlabeled", "test")}


def test_a_protocol_leaving_a_class_without_labeled_images_is_a_config_error(small_cifar100, make_config):
    from loft_dist.errors import ConfigError

    # N1 = 3 < gamma_l = 4: int(3 / 4) = 0 labeled images for the last class
    assert protocol.long_tail_counts(3, 4, C)[-1] == 0
    with pytest.raises(ConfigError, match=r"data.n1=3, data.gamma_l=4 leave 1 of 5 classes with no labeled image "
                                          r"\(classes 4 'maple'\): raise data.n1 .*data.allow_empty_classes=true"):
        prepare_dataset(make_config("e", **lt(source_path=small_cifar100, n1=3)))
    info = prepare_dataset(make_config("ok", **lt(source_path=small_cifar100, n1=3, allow_empty_classes="true")))
    assert info["counts"]["labeled"] == protocol.long_tail_counts(3, 4, C)


def test_drop_classes_by_name(small_cifar100, make_config):
    from loft_dist.errors import ConfigError

    cfg = make_config("d", **lt(source_path=small_cifar100, drop_classes="[bear,dolphin]"))
    info = prepare_dataset(cfg)
    kept = ["apple", "cloud", "maple"]
    assert info["class_names"] == kept
    assert info["counts"]["labeled"] == protocol.long_tail_counts(12, 4, 3)
    assert info["counts"]["test"] == [SMALL_TEST_PER_CLASS] * 3  # the official test batch, less the same classes
    # every image keeps its own class: the source's label of the row it came from, by name
    src = read_cifar(small_cifar100, split="train", variant="cifar100")
    for split in ("labeled", "unlabeled"):
        rows = read(cfg.data_root, split)
        index = [int(s.rsplit(":", 1)[1]) for s in rows["source"]]
        assert [src.class_names[src.labels[i]] for i in index] == [kept[t] for t in rows["true_label"]]
    with pytest.raises(ConfigError, match=r"data.drop_classes names 'tiger', which is not a class of data.source_path="):
        prepare_dataset(make_config("u", **lt(source_path=small_cifar100, drop_classes="[tiger]")))
