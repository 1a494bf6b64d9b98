"""Tests of the source readers: CIFAR pickles, ImageFolder trees, CSV/Parquet manifests."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from source_files import random_images, to_cifar_rows, write_cifar10, write_cifar100, write_py2_pickle
from loft_dist.data.sources import (
    Source,
    SourceError,
    read_cifar,
    read_image_files,
    read_image_folder,
    read_manifest,
)

REAL_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar-10-subset"


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


@pytest.fixture
def cifar10_dir(tmp_path):
    """A CIFAR-10 tree with 5 train batches of 3 images and a test batch of 4."""
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for name, n in [(f"data_batch_{k}", 3) for k in range(1, 6)] + [("test_batch", 4)]:
        images[name] = random_images(rng, n)
        labels[name] = [int(x) for x in rng.integers(0, 10, size=n)]
    write_cifar10(tmp_path, {k: (images[k], labels[k]) for k in images})
    return tmp_path, images, labels


@pytest.fixture
def cifar100_dir(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = {}, {}
    for name, n in [("train", 6), ("test", 2)]:
        images[name] = random_images(rng, n)
        labels[name] = [int(x) for x in rng.integers(0, 100, size=n)]
    write_cifar100(tmp_path, {k: (images[k], labels[k]) for k in images}, [f"class_{k:03d}" for k in range(100)])
    return tmp_path, images, labels


# ---------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_train_and_test_round_trip(cifar10_dir):
    root, images, labels = cifar10_dir
    train = read_cifar(root, split="train", variant="cifar10")
    assert isinstance(train, Source)
    assert len(train) == 15
    assert train.labels.dtype == np.int64 and train.labels.shape == (15,)
    assert train.class_names[:3] == ["airplane", "automobile", "bird"] and len(train.class_names) == 10
    expected = np.concatenate([images[f"data_batch_{k}"] for k in range(1, 6)])
    assert train.labels.tolist() == sum((labels[f"data_batch_{k}"] for k in range(1, 6)), [])
    for i in range(len(train)):
        png = train.encoded(i)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(_decode(png), expected[i])
    assert train.origin(0) == "cifar10:data_batch_1:0"
    assert train.origin(7) == "cifar10:data_batch_3:1"

    test = read_cifar(root, split="test")
    assert len(test) == 4 and test.labels.tolist() == labels["test_batch"]
    np.testing.assert_array_equal(_decode(test.encoded(3)), images["test_batch"][3])
    assert test.origin(3) == "cifar10:test_batch:3"


def test_cifar_root_may_be_the_batches_dir_itself(cifar10_dir):
    root, _, labels = cifar10_dir
    src = read_cifar(root / "cifar-10-batches-py", split="test")
    assert src.labels.tolist() == labels["test_batch"]


def test_cifar100_fine_labels_round_trip(cifar100_dir):
    root, images, labels = cifar100_dir
    for split in ("train", "test"):
        src = read_cifar(root, split=split, variant="cifar100")
        assert len(src.class_names) == 100 and src.class_names[7] == "class_007"
        assert src.labels.tolist() == labels[split]
        for i in range(len(src)):
            np.testing.assert_array_equal(_decode(src.encoded(i)), images[split][i])
        assert src.origin(1) == f"cifar100:{split}:1"
    # root pointing at the cifar-100-python dir itself
    assert len(read_cifar(root / "cifar-100-python", "test", "cifar100")) == 2


def test_cifar_reads_str_keys_from_python3_pickles(tmp_path):
    # A pickle re-saved by Python 3 (protocol 4) has str keys and native bytes opcodes.
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    img = random_images(np.random.default_rng(2), 2)
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=4))
    batch = {"labels": [1, 0], "data": to_cifar_rows(img)}
    (base / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    src = read_cifar(base, "test")
    assert src.class_names == ["a", "b"] and src.labels.tolist() == [1, 0]
    np.testing.assert_array_equal(_decode(src.encoded(1)), img[1])


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_malicious_pickle(cifar10_dir):
    root, _, _ = cifar10_dir
    marker = root / "pwned"
    bad = root / "cifar-10-batches-py" / "data_batch_2"
    write_py2_pickle(bad, {b"labels": [], b"data": _Exploit(marker)})
    with pytest.raises(pickle.UnpicklingError) as err:
        read_cifar(root, "train")
    msg = str(err.value)
    assert "system" in msg and str(bad) in msg
    assert not marker.exists()


def test_cifar_missing_dir_names_expected_path(tmp_path):
    with pytest.raises(SourceError) as err:
        read_cifar(tmp_path, "train", "cifar100")
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python" / "meta") in msg and "download" in msg


def test_cifar_missing_batch_file_is_named(cifar10_dir):
    root, _, _ = cifar10_dir
    missing = root / "cifar-10-batches-py" / "data_batch_4"
    missing.unlink()
    with pytest.raises(SourceError, match="data_batch_4"):
        read_cifar(root, "train")
    assert isinstance(SourceError("x"), ValueError)


def test_cifar_bad_shape_and_labels_are_named(cifar10_dir):
    root, _, _ = cifar10_dir
    base = root / "cifar-10-batches-py"
    write_py2_pickle(base / "test_batch", {b"labels": [0, 1], b"data": np.zeros((2, 1024), np.uint8)})
    with pytest.raises(SourceError, match=r"test_batch.*\(N, 3072\)"):
        read_cifar(root, "test")
    write_py2_pickle(base / "test_batch", {b"labels": [0, 10], b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(SourceError, match=r"test_batch: record 1 has label 10, outside the range 0\.\.9"):
        read_cifar(root, "test")
    (base / "test_batch").write_bytes(b"\x80\x02}q\x00(U")  # truncated download
    with pytest.raises(SourceError, match="test_batch.*truncated or corrupt"):
        read_cifar(root, "test")


def test_cifar_bad_arguments(cifar10_dir):
    root, _, _ = cifar10_dir
    with pytest.raises(SourceError, match="split"):
        read_cifar(root, "val")
    with pytest.raises(SourceError, match="variant"):
        read_cifar(root, "train", "cifar1000")
    src = read_cifar(root, "test")
    with pytest.raises(IndexError):
        src.encoded(4)
    with pytest.raises(IndexError):
        src.encoded(-1)


def test_sources_pickle_for_worker_processes(cifar10_dir):
    root, _, _ = cifar10_dir
    src = read_cifar(root, "test")
    copy = pickle.loads(pickle.dumps(src))
    assert copy.encoded(2) == src.encoded(2) and copy.origin(2) == src.origin(2)


def test_real_cifar10_subset():
    if not (REAL_CIFAR10 / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_CIFAR10} (shared data not mounted)")
    train = read_cifar(REAL_CIFAR10, "train")
    test = read_cifar(REAL_CIFAR10 / "cifar-10-batches-py", "test")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(train) == 5170 and len(test) == 1017
    assert train.class_names == names and test.class_names == names
    counts = np.bincount(train.labels, minlength=10)
    assert counts.sum() == 5170 and counts.min() >= 484 and counts.max() <= 540
    assert train.origin(1102) == "cifar10:data_batch_2:0"
    img = _decode(test.encoded(0))
    assert img.shape == (32, 32, 3) and img.std() > 0


# ---------------------------------------------------------------------------------------
# ImageFolder


def _save(path: Path, arr: np.ndarray, fmt: str) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path.read_bytes()


def test_image_folder_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(3)
    img = lambda: rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)  # noqa: E731
    written = {
        tmp_path / "dog" / "b.png": _save(tmp_path / "dog" / "b.png", img(), "PNG"),
        tmp_path / "dog" / "a.JPG": _save(tmp_path / "dog" / "a.JPG", img(), "JPEG"),
        tmp_path / "cat" / "x.jpeg": _save(tmp_path / "cat" / "x.jpeg", img(), "JPEG"),
        tmp_path / "cat" / "sub" / "y.png": _save(tmp_path / "cat" / "sub" / "y.png", img(), "PNG"),
    }
    (tmp_path / "cat" / ".DS_Store").write_text("hidden files are skipped")
    (tmp_path / "readme.md").write_text("root files are not classes")

    src = read_image_folder(tmp_path)
    assert src.class_names == ["cat", "dog"]
    assert src.labels.tolist() == [0, 0, 1, 1]
    # Same order as torchvision's ImageFolder: a directory's files before its sub-directories.
    origins = [src.origin(i) for i in range(len(src))]
    assert origins == [str(p) for p in [
        tmp_path / "cat" / "x.jpeg",
        tmp_path / "cat" / "sub" / "y.png",
        tmp_path / "dog" / "a.JPG",
        tmp_path / "dog" / "b.png",
    ]]
    for i in range(len(src)):
        assert src.encoded(i) == written[Path(src.origin(i))]  # original bytes, not re-encoded
    assert pickle.loads(pickle.dumps(src)).encoded(3) == src.encoded(3)


def test_image_folder_errors_name_the_dir(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_image_folder(tmp_path / "nope")
    with pytest.raises(SourceError, match=f"{tmp_path}.*no class sub-directories"):
        read_image_folder(tmp_path)
    _save(tmp_path / "cat" / "a.png", np.zeros((4, 4, 3), np.uint8), "PNG")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("x")
    with pytest.raises(SourceError) as err:
        read_image_folder(tmp_path)
    assert str(tmp_path / "dog") in str(err.value) and "no images" in str(err.value)


def test_image_folder_refuses_a_file_that_is_not_an_image(tmp_path):
    """A file of a class (or OOD) directory that is neither read nor quarantined would vanish: it is an error naming
    it. (A .jpg that is really text IS read, and quarantined when it fails to decode.)"""
    for c in ("cat", "dog"):
        _save(tmp_path / c / "a.png", np.zeros((4, 4, 3), np.uint8), "PNG")
    (tmp_path / "dog" / "sub").mkdir()
    (tmp_path / "dog" / "sub" / "notes.txt").write_text("x")
    (tmp_path / "dog" / "labels.csv").write_text("x")
    for read in (read_image_folder, read_image_files):
        with pytest.raises(SourceError) as err:
            read(tmp_path)
        assert str(err.value).startswith(f"{tmp_path / 'dog' / 'labels.csv'} is not an image file (and 1 more such "
                                         f"files): only .png, .jpg"), str(err.value)
        assert "move it out of the folder" in str(err.value)


# ---------------------------------------------------------------------------------------
# Manifests


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(4)
    files = {}
    for name, fmt in [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.png", "PNG")]:
        files[name] = _save(tmp_path / "imgs" / name, rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), fmt)
    return tmp_path, files


def test_csv_manifest_int_labels_relative_and_absolute_paths(image_files):
    root, files = image_files
    manifest = root / "m.csv"
    paths = ["imgs/a.png", str(root / "imgs" / "b.jpg"), "imgs/c.png"]
    pd.DataFrame({"path": paths, "label": [2, 0, 1]}).to_csv(manifest, index=False)
    src = read_manifest(manifest, class_names=["x", "y", "z"])
    assert src.class_names == ["x", "y", "z"] and src.labels.tolist() == [2, 0, 1]
    assert src.origin(0) == str(root / "imgs" / "a.png")
    assert [src.encoded(i) for i in range(3)] == [files["a.png"], files["b.jpg"], files["c.png"]]
    # Without names, int labels give "0".."max" as names.
    assert read_manifest(manifest).class_names == ["0", "1", "2"]


def test_csv_manifest_class_name_labels(image_files):
    root, files = image_files
    manifest = root / "m.csv"
    paths = ["imgs/a.png", "imgs/b.jpg", "imgs/c.png"]
    pd.DataFrame({"image": paths, "label": ["zebra", "ant", "zebra"]}).to_csv(manifest, index=False)
    src = read_manifest(manifest)
    assert src.class_names == ["ant", "zebra"] and src.labels.tolist() == [1, 0, 1]
    assert src.encoded(1) == files["b.jpg"]
    given = read_manifest(manifest, class_names=["zebra", "ant", "bee"])
    assert given.class_names == ["zebra", "ant", "bee"] and given.labels.tolist() == [0, 1, 0]


def test_parquet_manifest_with_image_bytes_streams_row_groups(image_files):
    root, files = image_files
    manifest = root / "m.parquet"
    blobs = [files["a.png"], files["b.jpg"], files["c.png"], files["a.png"], files["b.jpg"]]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": ["cat", "dog", "cat", "dog", "cat"]})
    pq.write_table(table, manifest, row_group_size=2)
    src = read_manifest(manifest)
    assert src.class_names == ["cat", "dog"] and src.labels.tolist() == [0, 1, 0, 1, 0]
    assert [src.encoded(i) for i in range(5)] == blobs
    assert src.encoded(0) == blobs[0]  # back to an earlier row group
    assert src.origin(4) == f"{manifest}:row 4"
    copy = pickle.loads(pickle.dumps(src))
    assert copy.encoded(3) == blobs[3]
    with pytest.raises(IndexError):
        src.encoded(5)


def test_parquet_manifest_with_paths_and_int_labels(image_files):
    root, files = image_files
    manifest = root / "sub" / "m.parquet"
    manifest.parent.mkdir()
    labels = pa.array([1, 0], pa.int32())
    pq.write_table(pa.table({"path": ["../imgs/c.png", "../imgs/a.png"], "label": labels}), manifest)
    src = read_manifest(manifest, class_names=["p", "q"])
    assert src.labels.tolist() == [1, 0] and src.encoded(0) == files["c.png"]


def test_manifest_missing_column_lists_found_columns(image_files):
    root, _ = image_files
    manifest = root / "m.csv"
    pd.DataFrame({"file": ["imgs/a.png"], "class": [0]}).to_csv(manifest, index=False)
    with pytest.raises(SourceError) as err:
        read_manifest(manifest)
    msg = str(err.value)
    assert str(manifest) in msg and "'file'" in msg and "'class'" in msg and "path,label" in msg


def test_manifest_label_out_of_range_names_record_and_range(image_files):
    root, _ = image_files
    manifest = root / "m.csv"
    pd.DataFrame({"path": ["imgs/a.png", "imgs/b.jpg"], "label": [0, 3]}).to_csv(manifest, index=False)
    with pytest.raises(SourceError) as err:
        read_manifest(manifest, class_names=["x", "y", "z"])
    msg = str(err.value)
    assert f"{manifest} record 1 (line 3)" in msg and "label 3" in msg and "0..2" in msg
    pd.DataFrame({"path": ["imgs/a.png"], "label": [-1]}).to_csv(manifest, index=False)
    with pytest.raises(SourceError, match="record 0.*label -1"):
        read_manifest(manifest, class_names=["x"])


def test_manifest_unknown_class_name_lists_known(image_files):
    root, _ = image_files
    manifest = root / "m.parquet"
    pq.write_table(pa.table({"path": ["imgs/a.png", "imgs/b.jpg"], "label": ["cat", "cow"]}), manifest)
    with pytest.raises(SourceError) as err:
        read_manifest(manifest, class_names=["cat", "dog"])
    msg = str(err.value)
    assert f"{manifest} record 1" in msg and "'cow'" in msg and "'cat', 'dog'" in msg


def test_manifest_missing_image_file_names_record_and_file(image_files):
    root, _ = image_files
    manifest = root / "m.csv"
    pd.DataFrame({"path": ["imgs/a.png", "imgs/gone.png"], "label": ["a", "b"]}).to_csv(manifest, index=False)
    with pytest.raises(SourceError) as err:
        read_manifest(manifest)
    msg = str(err.value)
    assert f"{manifest} record 1 (line 3)" in msg and str(root / "imgs" / "gone.png") in msg


def test_manifest_other_errors(image_files):
    root, _ = image_files
    with pytest.raises(SourceError, match="does not exist"):
        read_manifest(root / "none.csv")
    (root / "m.json").write_text("{}")
    with pytest.raises(SourceError, match=r"m\.json.*\.csv or \.parquet"):
        read_manifest(root / "m.json")
    manifest = root / "m.csv"
    manifest.write_text("path,label\nimgs/a.png,\n")
    with pytest.raises(SourceError, match="record 0.*empty label"):
        read_manifest(manifest)
    images = pa.array([b"x", None], pa.binary())
    pq.write_table(pa.table({"image": images, "label": [0, 0]}), root / "n.parquet")
    src = read_manifest(root / "n.parquet")
    with pytest.raises(SourceError, match=r"n\.parquet: record 1 has an empty 'image'"):
        src.encoded(1)


# ---------------------------------------------------------------------------------------
# Unlabeled (out-of-distribution) sources


def test_image_files_and_unlabeled_manifests(image_files):
    root, files = image_files
    (root / "imgs" / "deeper").mkdir()
    (root / "imgs" / "deeper" / "d.png").write_bytes(files["a.png"])
    src = read_image_files(root / "imgs")
    assert src.class_names == [] and src.labels.tolist() == [-1] * 4
    assert [Path(src.origin(i)).name for i in range(4)] == ["a.png", "b.jpg", "c.png", "d.png"]
    assert src.encoded(1) == files["b.jpg"]
    with pytest.raises(SourceError, match="holds no images"):
        read_image_files(_empty(root))

    manifest = root / "ood.csv"
    pd.DataFrame({"path": ["imgs/a.png", "imgs/c.png"]}).to_csv(manifest, index=False)
    src = read_manifest(manifest, labeled=False)
    assert src.labels.tolist() == [-1, -1] and src.encoded(1) == files["c.png"]
    with pytest.raises(SourceError, match="needs columns 'path,label' or 'image,label'"):
        read_manifest(manifest)
    blobs = pa.array([files["a.png"], files["b.jpg"]], pa.binary())
    pq.write_table(pa.table({"image": blobs}), root / "ood.parquet")
    src = read_manifest(root / "ood.parquet", labeled=False)
    assert len(src) == 2 and src.encoded(1) == files["b.jpg"]


def _empty(root: Path) -> Path:
    (root / "empty" / "sub").mkdir(parents=True)
    (root / "empty" / "sub" / "notes.txt").write_text("x")
    return root / "empty"
