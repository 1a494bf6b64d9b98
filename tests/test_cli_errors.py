"""What a user can fix reaches them as one line and exit 2 (loft_dist.errors); the line names what, where and how to
fix it, and comes before Ray starts. Run as a user runs it: the `loft-dist` command in a subprocess, so a traceback
would show on stderr. The cases include the ten of issue #19 (bad model name … non-image file in an image folder)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loft_dist.data.quarantine import error_kinds
from loft_dist.data.transforms import decode_all

LOFT_DIST = str(Path(sys.executable).with_name("loft-dist"))
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


DATA = ["data.rows_per_shard=64"]  # the tiny dataset the module prepares once
EMPTY_POOL = ["data.m1=0", "data.ood_ratio=0"]  # a protocol that leaves the pool without a single image
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")  # cli._setup_logging's format


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """What the cases read, made once without Ray: a prepared tiny dataset and one with an empty pool, checkpoints
    (LoRA as training saves them; one corrupt; one with a 3-class head and no class names), a run dir whose
    completed round-0 table lost its _SUCCESS, image folders with a stray notes.txt, a manifest without `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from loft_dist.algorithms import load_model, method_of
    from loft_dist.config import load_config, to_yaml
    from loft_dist.data.prepare import prepare_dataset

    t = tmp_path_factory.mktemp("cli_errors")
    prepare_dataset(load_config(TINY, DATA + [f"data.root={t / 'data'}"]))
    prepare_dataset(load_config(TINY, DATA + EMPTY_POOL + [f"data.root={t / 'empty_pool'}"]))
    cfg = load_config(TINY, DATA)
    for name, classes in (("ckpt", [f"c{i}" for i in range(10)]), ("ckpt3", ["a", "b", "c"])):
        method_of(cfg.algorithm).save(load_model(cfg, classes, None), t / name, {"epoch": 0, "class_names": classes})
    (t / "ckpt3" / "train_state.json").write_text(json.dumps({"epoch": 0}))  # as old checkpoints: no class names
    classes = [f"c{i}" for i in range(10)]
    ulfine = load_config(TINY, DATA + ["algorithm.name=ulfine"])
    method_of(ulfine.algorithm).save(load_model(ulfine, classes, None), t / "ulfine", {"epoch": 0, "class_names": classes})
    shutil.copytree(t / "ckpt", t / "corrupt")
    (t / "corrupt" / "head.safetensors").write_bytes(b"\x13garbage" * 64)

    run = load_config(TINY, DATA + [f"run.storage_path={t / 'runs'}", "run.name=copied", f"data.root={t / 'data'}"])
    table = Path(run.run_dir) / "rounds" / "r0" / "pseudo_labels"
    table.mkdir(parents=True)
    (table.parents[2] / "config.yaml").write_text(to_yaml(run))
    (table.parents[2] / "state.json").write_text(json.dumps({"completed": ["prepare", "r0.score"]}))
    pq.write_table(pa.table({"id": [1, 2], "zs_msp": [0.5, 0.6]}), table / "part-00000.parquet")  # no _SUCCESS

    for folder in ("pool/x", "notes/x", "tree/cat", "tree/dog"):
        (t / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(t / folder / "a.png")
    (t / "notes" / "x" / "notes.txt").write_text("not an image")
    (t / "tree" / "cat" / "notes.txt").write_text("not an image")
    (t / "empty").mkdir()
    (t / "manifest.csv").write_text(f"file,label\n{t / 'pool' / 'x' / 'a.png'},0\n")
    return t


def _cases(t: Path, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case → (the command's arguments, phrases its one line must hold: what, where, how to fix)."""
    score = ["score", TINY, f"data.root={t / 'data'}", f"scoring.output={tmp / 'out'}"]
    pool = f"scoring.input={t / 'pool'}"
    runs = [f"run.storage_path={tmp / 'runs'}"]
    return {
        # the ten (#19)
        "bad model name": (["run", TINY, *runs, "model.name=ViT-B-61"],
                           ["model.name='ViT-B-61' is neither an open_clip model", "did you mean ViT-B-16",
                            "Set model.name to one of open_clip.list_models()"]),
        "unknown method": (["run", TINY, *runs, "algorithm.name=loftt"],
                           ["algorithm.name='loftt' is not allowed; choose one of: ", "loft_ow"]),
        "corrupt checkpoint": ([*score, pool, f"scoring.checkpoint={t / 'corrupt'}"],
                               [f"{t / 'corrupt' / 'head.safetensors'} is not a readable safetensors file",
                                "copy it again"]),
        "checkpoint of another method (ulfine scores a loft one)": (
            [*score, pool, f"scoring.checkpoint={t / 'ckpt'}", "algorithm.name=ulfine"],
            ["was not trained with algorithm.name=ulfine", "use it with the algorithm.name it was trained with"]),
        "checkpoint of another method (loft scores a ulfine one)": (
            [*score, pool, f"scoring.checkpoint={t / 'ulfine'}"],
            ["was trained with algorithm.name=ulfine", "but algorithm.name=loft", "use it with algorithm.name=ulfine"]),
        "checkpoint of another method (lp scores a loft one)": (
            [*score, pool, f"scoring.checkpoint={t / 'ckpt'}", "algorithm.name=lp"],
            ["holds a 'lora' adapter but peft.method='none'", "use it with the algorithm.name and peft.method"]),
        "table without _SUCCESS (run resumes a copied run dir)": (
            ["run", TINY, *DATA, f"run.storage_path={t / 'runs'}", "run.name=copied", f"data.root={t / 'data'}"],
            [f"{t / 'runs' / 'copied' / 'rounds' / 'r0' / 'pseudo_labels'} has no _SUCCESS",
             "records phase r0.score complete", "Restore it from the original run dir"]),
        "missing column in a manifest": (
            ["prepare", TINY, f"data.root={tmp / 'd'}", "data.source=manifest",
             f"data.source_path={t / 'manifest.csv'}"],
            [f"data.source_path={t / 'manifest.csv'}", "needs columns 'path,label' or 'image,label'",
             "rename the columns"]),
        "unwritable output": ([*score[:-1], pool, "scoring.output=/proc/loft-dist-test/out"],
                              ["scoring.output=/proc/loft-dist-test/out: cannot create or write",
                               "set scoring.output to a writable directory"]),
        "empty pool (score: an empty folder)": ([*score, f"scoring.input={t / 'empty'}"],
                                                ["holds no Parquet shards and no images",
                                                 "point it at a shard dir or an image folder"]),
        "empty pool (run: a protocol that leaves none)": (
            ["run", TINY, *DATA, *EMPTY_POOL, *runs, f"data.root={t / 'empty_pool'}"],
            [f"the pool (unlabeled split) of data.root={t / 'empty_pool'} is empty", "give it images"]),
        "class names not matching the checkpoint": (
            [*score, pool, f"scoring.checkpoint={t / 'ckpt3'}"],
            ["its head has 3 classes, but dataset.json of data.root=", "has 10",
             "Set data.root to the dataset it was trained on"]),
        "non-image file in an image folder (prepare)": (
            ["prepare", TINY, f"data.root={tmp / 'd'}", "data.source=imagefolder", f"data.source_path={t / 'tree'}"],
            [f"{t / 'tree' / 'cat' / 'notes.txt'} is not an image file", "move it out of the folder"]),
        "non-image file in an image folder (score)": (
            [*score, f"scoring.input={t / 'notes'}"],
            [f"{t / 'notes' / 'x' / 'notes.txt'} is not an image file", "move it out of the folder"]),
        # and earlier ones
        "checkpoint that is not one": ([*score, pool, f"scoring.checkpoint={t / 'pool'}"],
                                       ["not a loft_dist checkpoint"]),
        "missing scoring input": ([*score, f"scoring.input={tmp / 'nowhere'}"], ["does not exist"]),
        "export of a dir that is no run": (["export", str(tmp), "--out", str(tmp / "e")], ["not a loft_dist run dir"]),
        "report of a dir that is no run": (["report", str(tmp)], ["is it a loft_dist run dir"]),
        "predict with a dir that is no export": (["predict", str(tmp), "x.png"], ["not a loft_dist export"]),
    }


CASES = list(_cases(Path("t"), Path("tmp")))


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_and_exit_2(made, tmp_path, case):
    """Exit 2, and stderr is log records plus exactly one line, `loft-dist: error: …` with what, where and how to fix;
    no traceback, and (each of these can be checked without Ray) no Ray started."""
    args, phrases = _cases(made, tmp_path)[case]
    done = subprocess.run([LOFT_DIST, *args], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={"PATH": str(Path(sys.executable).parent), "RAY_AUTH_MODE": "disabled",
                               "HOME": str(tmp_path)})
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and not LOG_RECORD.match(ln)]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("loft-dist: error: "), done.stderr[-3000:]
    assert [p for p in phrases if p not in lines[0]] == [], lines[0]
    assert "Started a local Ray instance" not in done.stderr, "Ray was started before the check"


def test_decode_errors_carry_no_memory_address_and_group_by_kind():
    _, errors = decode_all([b"not an image", b"also not an image", b"", None])
    assert errors[0] == errors[1] and "0x" not in errors[0], errors
    assert errors[0].startswith("UnidentifiedImageError: cannot identify image file")
    assert error_kinds(np.array(errors + [""], dtype=object)) == {"UnidentifiedImageError": 2, "ValueError": 2}


def test_run_summary_counts_quarantined_rows_by_kind(tmp_path, capsys, monkeypatch):
    """The `run` summary line, from the quarantine files the run wrote (quarantining itself: tests/test_bad_inputs)."""
    from loft_dist import cli, rounds

    run_dir = tmp_path / "tiny"
    (run_dir / "quarantine").mkdir(parents=True)
    reasons = {"unlabeled": ["UnidentifiedImageError: a", "OSError: truncated"], "test": ["UnidentifiedImageError: b"]}
    for split, rs in reasons.items():
        (run_dir / "quarantine" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"id": i, "split": split, "reason": r}) + "\n" for i, r in enumerate(rs)))
    monkeypatch.setattr(rounds, "run", lambda cfg: {"final": {"test": {"accuracy": 0.5}}})
    assert cli.main(["run", TINY, f"run.storage_path={tmp_path}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "final test accuracy 50.0% — 3 could not be read (UnidentifiedImageError: 2, OSError: 1) and are " \
           f"quarantined in {run_dir}/quarantine/" in line, line


def test_score_summary_counts_unreadable_rows_by_kind(tmp_path, capsys, monkeypatch):
    """The `score` summary line, from the table the job wrote (the job itself is tested in tests/scoring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from loft_dist import cli

    out = tmp_path / "scored"
    out.mkdir()
    pq.write_table(pa.table({"id": [1, 2, 3], "error": ["", "UnidentifiedImageError: x", "ValueError: empty"]}),
                   out / "part-0.parquet")
    (out / "_SUCCESS").write_text(json.dumps({"rows": 3}))
    import loft_dist.scoring.job as job

    monkeypatch.setattr(job, "run_score_job", lambda cfg: 3)
    assert cli.main(["score", TINY, f"scoring.input={tmp_path}", f"scoring.output={out}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"done: 3 rows in {out}; 2 could not be read") and \
        "(UnidentifiedImageError: 1, ValueError: 1)" in line, line
