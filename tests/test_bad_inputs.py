"""Bad inputs, one table per door they come through, each with the exact error or quarantine outcome.

- images (data/transforms.py `Decoder`, the one decoder of training and scoring): undecodable bytes are
  quarantined with their reason, odd-but-valid modes decode to RGB;
- sources (CIFAR pickles, ImageFolder trees, manifests) and prepared shards: a SourceError / DuplicateIdError
  that names the file and the record;
- the config and the run's surroundings (storage path, weights file): a ConfigError / MissingWeightsError
  that names the key and the value, before Ray starts;
- end to end: a scored shard with corrupt images lists exactly those ids in quarantine/<split>.jsonl and scores
  every other row.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loft_dist.config import ConfigError, load_config
from loft_dist.data.quarantine import DuplicateIdError, check_unique_ids, quarantine
from loft_dist.data.sources import SourceError, read_image_folder, read_manifest
from loft_dist.data.store import IMAGE_SCHEMA
from loft_dist.data.transforms import Decoder, decode_image

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
LOFT_DIST = str(Path(sys.executable).with_name("loft-dist"))
SIZE = 32


# ---------------------------------------------------------------------------------------------------------------
# Images

def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rgb(seed: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


_JPEG, _PNG = _encode(_rgb(), "JPEG"), _encode(_rgb(), "PNG")
_ADDR = r"<_io\.BytesIO object>"  # no memory address: equal failures must group

# name → (encoded bytes, the exact quarantine reason as a regex)
UNDECODABLE = {
    "corrupt JPEG": (_JPEG[:200] + b"\x00garbage" * 50, r"OSError: cannot load this image"),
    "zero-byte file": (b"", r"ValueError: empty image bytes"),
    "truncated PNG": (_PNG[: len(_PNG) // 2], r"OSError: image file is truncated"),
    "truncated JPEG": (_JPEG[: len(_JPEG) // 2],  # Pillow's wording depends on where its reader stops
                       r"OSError: (Truncated File Read|image file is truncated \(\d+ bytes not processed\))"),
    "not an image": (b"hello, this is text", rf"UnidentifiedImageError: cannot identify image file {_ADDR}"),
}

# name → (encoded bytes, the PIL mode the file holds); all must come out RGB at the model's size
ODD_BUT_VALID = {
    "grayscale": (_encode(_rgb().convert("L"), "PNG"), "L"),
    "CMYK JPEG": (_encode(_rgb().convert("CMYK"), "JPEG"), "CMYK"),
    "16-bit grayscale PNG": (_encode(Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 60)
                                                     .astype(np.uint16)), "PNG"), "I;16"),
    "RGBA": (_encode(_rgb().convert("RGBA"), "PNG"), "RGBA"),
    "palette": (_encode(_rgb().convert("P"), "PNG"), "P"),
    "1-bit": (_encode(_rgb().convert("1"), "PNG"), "1"),
    "grayscale+alpha, 48 px": (_encode(_rgb(size=48).convert("LA"), "PNG"), "LA"),
}


@pytest.mark.parametrize("name", list(UNDECODABLE))
def test_undecodable_image_is_quarantined_with_its_reason(name):
    data, reason = UNDECODABLE[name]
    good = _encode(_rgb(1), "PNG")
    batch = Decoder("clean", SIZE)({"id": np.array([1, 2]), "image": np.array([good, data], dtype=object)})
    assert batch["error"][0] == ""
    assert re.fullmatch(reason, batch["error"][1]), batch["error"][1]
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert not batch["image"][1].any(), "an undecodable row's image is zeros, never garbage"
    assert list(batch["id"]) == [1, 2], "the row is kept (and reported), not dropped"


@pytest.mark.parametrize("name", list(ODD_BUT_VALID))
def test_odd_but_valid_image_decodes_to_rgb(name):
    data, mode = ODD_BUT_VALID[name]
    assert Image.open(io.BytesIO(data)).mode == mode  # the test image really is of that kind
    img = decode_image(data)
    assert img.mode == "RGB"
    batch = Decoder("clean", SIZE)({"image": np.array([data], dtype=object)})
    assert batch["error"][0] == ""
    assert batch["image"].shape == (1, 3, SIZE, SIZE) and np.isfinite(batch["image"]).all()


def test_16_bit_image_keeps_its_range():
    """A 16-bit gradient is scaled to 0..255, not clipped to white (what a plain convert("RGB") would give)."""
    arr = np.asarray(decode_image(ODD_BUT_VALID["16-bit grayscale PNG"][0]))
    assert arr.shape == (SIZE, SIZE, 3) and (arr[..., 0] == arr[..., 1]).all()
    assert arr.min() == 0 and arr.max() == 255 and len(np.unique(arr)) > 100


# ---------------------------------------------------------------------------------------------------------------
# Sources and prepared shards: errors name the file and the record

def _png_files(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"img{i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        p.write_bytes(_encode(_rgb(i), "PNG"))
    return paths


def _manifest(tmp_path: Path, header: str, labels: list) -> Path:
    paths = _png_files(tmp_path / "images", len(labels))
    csv = tmp_path / "manifest.csv"
    csv.write_text(header + "\n" + "".join(f"{p},{lab}\n" for p, lab in zip(paths, labels)))
    return csv


def test_manifest_label_below_zero(tmp_path):
    csv = _manifest(tmp_path, "path,label", [0, -5, 1])
    with pytest.raises(SourceError) as e:
        read_manifest(csv)
    assert str(e.value) == (f"{csv} record 1 (line 3): label -5 is outside the range 0..1 of the 2 classes; "
                            f"fix the label or the class_names list (1 rows affected).")


def test_manifest_label_equal_to_the_class_count(tmp_path):
    csv = _manifest(tmp_path, "path,label", [0, 1, 2])
    with pytest.raises(SourceError) as e:
        read_manifest(csv, class_names=["cat", "dog"])
    assert str(e.value) == (f"{csv} record 2 (line 4): label 2 is outside the range 0..1 of the 2 classes; "
                            f"fix the label or the class_names list (1 rows affected).")


def test_manifest_without_image_column(tmp_path):
    csv = _manifest(tmp_path, "file,label", [0, 1])
    with pytest.raises(SourceError) as e:
        read_manifest(csv)
    assert str(e.value) == (f"manifest {csv}: needs columns 'path,label' or 'image,label', found columns "
                            f"['file', 'label']; rename the columns accordingly.")


def test_image_folder_with_an_empty_class(tmp_path):
    _png_files(tmp_path / "tree" / "cat", 2)
    (tmp_path / "tree" / "dog").mkdir()
    with pytest.raises(SourceError) as e:
        read_image_folder(tmp_path / "tree")
    assert str(e.value).startswith(f"class directory {tmp_path / 'tree' / 'dog'} holds no images (extensions: .png")
    assert str(e.value).endswith("add images or remove the directory.")


class _Exploit:
    """What a tampered CIFAR batch carries: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_in_cifar_format_is_refused(tmp_path):
    from loft_dist.data.prepare import prepare_dataset

    base = tmp_path / "cifar" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    (base / "data_batch_1").write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": [0]}, protocol=2))
    cfg = load_config(TINY, ["data.source=cifar10", f"data.source_path={tmp_path / 'cifar'}",
                             f"data.root={tmp_path / 'data'}"])
    with pytest.raises(SourceError) as e:
        prepare_dataset(cfg)
    assert str(e.value).startswith(f"data.source_path={tmp_path / 'cifar'}: {base / 'data_batch_1'}: refused to "
                                   f"unpickle global 'posix.system'")
    assert not marker.exists(), "the pickle's payload ran"


def _shard(path: Path, ids: list[int]) -> str:
    rows = [{"id": i, "image": _PNG, "label": -1, "true_label": 0, "source": "test"} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return str(path)


def test_duplicate_ids_in_one_shard(tmp_path):
    shard = _shard(tmp_path / "part-00000.parquet", [1, 2, 7, 3, 7])
    with pytest.raises(DuplicateIdError) as e:
        check_unique_ids([shard], "unlabeled")
    assert str(e.value).startswith(f"unlabeled: id 7 appears twice: {shard} record 2 and {shard} record 4 "
                                   f"(1 ids repeated in all)")


def test_duplicate_ids_across_shards_of_a_split(tmp_path):
    a, b = _shard(tmp_path / "part-00000.parquet", [1, 2, 3]), _shard(tmp_path / "part-00001.parquet", [4, 2, 3])
    with pytest.raises(DuplicateIdError, match=re.escape(f"id 2 appears twice: {a} record 1 and {b} record 1 "
                                                         f"(2 ids repeated in all)")):
        check_unique_ids([a, b])
    assert check_unique_ids([a, _shard(tmp_path / "part-00002.parquet", [4, 5])]) == 5


def test_scoring_job_refuses_a_split_with_duplicate_ids(tmp_path):
    """The check runs where the contract is relied on: before the scoring job starts any Ray work."""
    from loft_dist.scoring.job import score_shards

    shards = tmp_path / "unlabeled"
    shards.mkdir()
    a, b = _shard(shards / "part-00000.parquet", [1, 2]), _shard(shards / "part-00001.parquet", [3, 1])
    cfg = load_config(TINY, [f"run.storage_path={tmp_path}"])
    out = tmp_path / "run" / "pseudo_labels"
    with pytest.raises(DuplicateIdError) as e:
        score_shards(cfg, [a, b], str(out), class_names=["c0", "c1"], mode="zero_shot", label="unlabeled")
    assert str(e.value).startswith(f"unlabeled: id 1 appears twice: {a} record 0 and {b} record 1")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Config: the key, the bad value, what is allowed — before Ray starts

CONFIG_ERRORS = {
    "unknown key": (["train.epochs=3"], "unknown config key 'train.epochs'; valid keys under train: "),
    "unknown section": (["trian.lr=1"], "unknown config key 'trian'; valid keys: algorithm, data, eval, model, peft, "
                                        "rounds, run, scoring, train"),
    "wrong type": (["train.num_workers=two"], "config key 'train.num_workers' got 'two': Value 'two' of type 'str' "
                                              "could not be converted to Integer"),
    "threshold > 1": (["algorithm.c_hard=1.5"], "algorithm.c_hard=1.5 is not allowed: a probability in [0, 1]"),
    "threshold < 0": (["algorithm.c_ood=-0.1"], "algorithm.c_ood=-0.1 is not allowed: a probability in [0, 1]"),
    "value for a section": (["rounds=3"], "config key 'rounds' is a section (num_rounds); got the value 3"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_bad_config_is_rejected_with_key_and_value(name):
    overrides, message = CONFIG_ERRORS[name]
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_missing_weights_file_names_the_path():
    from loft_dist.models.clip import MissingWeightsError, create_clip
    from loft_dist.runtime import preflight

    with pytest.raises(MissingWeightsError, match=re.escape("model.pretrained='/nonexistent.pt': no such file.")):
        create_clip("loft-tiny-vit", "/nonexistent.pt")
    cfg = load_config(TINY, ["model.pretrained=/nonexistent.pt"])
    with pytest.raises(MissingWeightsError, match=re.escape("model.pretrained='/nonexistent.pt': no such file.")):
        preflight(cfg)


def test_unusable_storage_path_is_a_config_error(tmp_path):
    from loft_dist.runtime import preflight

    (tmp_path / "a_file").write_text("")
    for path, reason in ((tmp_path / "a_file" / "runs", "Not a directory"),
                         ("/proc/loft-dist-test/runs", "No such file or directory")):
        with pytest.raises(ConfigError) as e:
            preflight(load_config(TINY, [f"run.storage_path={path}"]))
        assert str(e.value) == (f"run.storage_path={path}: cannot create or write a directory there ({reason}); set "
                                f"run.storage_path to a writable directory (on a cluster: the shared volume every "
                                f"node mounts)")


@pytest.mark.parametrize("case", ["storage path", "weights file"])
def test_cli_fails_before_ray_starts(case, tmp_path):
    """`loft-dist run` with an unusable run.storage_path or weights file: one line naming key and value, exit 2,
    no Ray started, nothing prepared."""
    overrides, message = {
        "storage path": (["run.storage_path=/proc/loft-dist-test/runs"],
                         "run.storage_path=/proc/loft-dist-test/runs: cannot create or write a directory there"),
        "weights file": ([f"run.storage_path={tmp_path / 'runs'}", "model.pretrained=/nonexistent.pt"],
                         "model.pretrained='/nonexistent.pt': no such file."),
    }[case]
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run([LOFT_DIST, "run", TINY, *overrides], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"loft-dist: error: {message}"), done.stderr
    assert "Ray" not in done.stdout + done.stderr, "Ray was started before the check"
    assert not list(tmp_path.rglob("dataset.json")), "data was prepared before the check"


def test_asks_that_cannot_fit_in_ray_are_refused_not_waited_for(ray_session, caplog):
    """The 2-core hang trap: workers or actors that take every CPU leave none for Ray Data's decode tasks, and
    Ray waits forever. A local Ray (strict) refuses with the numbers and keys; a joined cluster only warns."""
    from loft_dist.runtime import check_fits
    from loft_dist.scoring.job import scoring_ask
    from loft_dist.train.trainer import training_ask

    def asks(cfg, train: bool):  # what the round driver asks for
        return [scoring_ask(cfg)] + ([training_ask(cfg)] if train else [])

    check_fits(asks(load_config(TINY, []), True), strict=True)  # the defaults fit the session's 4 CPUs
    cfg = load_config(TINY, ["train.num_workers=4", "train.cpus_per_worker=1"])
    check_fits(asks(cfg, False), strict=True)  # scoring alone fits: training is not asked for
    with pytest.raises(ConfigError) as e:
        check_fits(asks(cfg, True), strict=True)
    assert str(e.value).startswith("training asks for 4.5 CPU = 4 x 1 (train.num_workers x train.cpus_per_worker) "
                                   "+ 0.5 (train.cpus_per_data_task), but the cluster has 4: Ray would wait for it "
                                   "forever. Fix: lower scoring.min_actors, train.num_workers"), str(e.value)
    pinned = load_config(TINY, ["scoring.custom_resources={scorer: 0.5}"])
    with pytest.raises(ConfigError, match=r"scoring asks for 0.5 scorer = 1 x 0.5, but the cluster has 0; "
                                          r"no node can hold one scoring actor"):
        check_fits(asks(pinned, False), strict=True)
    check_fits(asks(pinned, False), strict=False)
    assert "unless the cluster's autoscaler adds nodes for it" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# End to end: a shard with bad images through the scoring job (Ray Data + the actor pool) and the quarantine

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scored_shard_quarantines_exactly_the_bad_images(tmp_path, ray_session):
    from loft_dist.scoring.job import score_shards

    images = [_encode(_rgb(i), "PNG") for i in range(12)] + [data for data, _ in ODD_BUT_VALID.values()]
    bad = {100 + k: name for k, name in enumerate(UNDECODABLE)}
    rows = [{"id": i, "image": img, "label": -1, "true_label": i % 10, "source": "test"}
            for i, img in enumerate(images)]
    rows += [{"id": i, "image": UNDECODABLE[name][0], "label": -1, "true_label": 0, "source": "test"}
             for i, name in bad.items()]
    rng = np.random.default_rng(0)
    rows = [rows[k] for k in rng.permutation(len(rows))]
    shards = tmp_path / "unlabeled"
    shards.mkdir()
    paths = [_shard_rows(shards / f"part-{k:05d}.parquet", rows[k::3]) for k in range(3)]
    cfg = load_config(TINY, [f"run.storage_path={tmp_path}", "run.name=bad", "scoring.batch_size=8"])
    run_dir = Path(cfg.run_dir)
    table = run_dir / "rounds" / "r0" / "pseudo_labels"

    n = score_shards(cfg, paths, str(table), class_names=[f"c{i}" for i in range(10)], mode="zero_shot")
    assert quarantine(table, run_dir, "unlabeled") == len(bad)

    assert n == len(rows)
    lines = [json.loads(line) for line in (run_dir / "quarantine" / "unlabeled.jsonl").read_text().splitlines()]
    assert {q["id"] for q in lines} == set(bad) and len(lines) == len(bad)
    for q in lines:
        assert q["split"] == "unlabeled" and re.fullmatch(UNDECODABLE[bad[q["id"]]][1], q["reason"]), q
    t = pq.read_table(sorted(str(p) for p in table.glob("*.parquet"))).to_pydict()
    assert sorted(t["id"]) == sorted(r["id"] for r in rows), "every row scored exactly once"
    for i, err, decision, weight in zip(t["id"], t["error"], t["decision"], t["weight"]):
        if i in bad:
            assert err and decision == "rejected" and weight == 0.0
        else:
            assert err == "" and decision in ("hard", "soft", "rejected", "ood")


def _shard_rows(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), path)
    return str(path)
