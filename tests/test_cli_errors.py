"""What a user can fix reaches them as one line and exit 2 (loft_dist.errors); the line names what and where.
Run as a user runs it: the `loft-dist` command in a subprocess, so a traceback would show on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loft_dist.data.quarantine import error_kinds
from loft_dist.data.transforms import decode_all

LOFT_DIST = str(Path(sys.executable).with_name("loft-dist"))
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    not_a_checkpoint = tmp / "ckpt"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "weights.bin").write_bytes(b"\0" * 16)
    pool, empty = tmp / "pool", tmp / "empty"
    pool.mkdir()
    empty.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(pool / "a.png")
    return {
        "unknown method": (["run", TINY, "algorithm.name=loftt"], "algorithm.name"),
        "checkpoint that is not one": (["score", TINY, f"scoring.input={pool}", f"scoring.output={tmp / 'out'}",
                                        f"scoring.checkpoint={not_a_checkpoint}"], "not a loft_dist checkpoint"),
        "empty pool": (["score", TINY, f"scoring.input={empty}", f"scoring.output={tmp / 'o'}"],
                       "holds no Parquet shards and no images"),
        "missing scoring input": (["score", TINY, f"scoring.input={tmp / 'nowhere'}", f"scoring.output={tmp / 'o'}"],
                                  "does not exist"),
        "export of a dir that is no run": (["export", str(tmp), "--out", str(tmp / "e")], "not a loft_dist run dir"),
        "report of a dir that is no run": (["report", str(tmp)], "is it a loft_dist run dir"),
        "predict with a dir that is no export": (["predict", str(tmp), "x.png"], "not a loft_dist export"),
    }


@pytest.mark.parametrize("case", [
    "unknown method", "checkpoint that is not one", "empty pool", "missing scoring input", "export of a dir that is no run",
    "report of a dir that is no run", "predict with a dir that is no export"])
def test_user_errors_are_one_line_and_exit_2(tmp_path, case):
    args, names = _cases(tmp_path)[case]
    done = subprocess.run([LOFT_DIST, *args], capture_output=True, text=True, timeout=240,
                          env={"PATH": str(Path(sys.executable).parent), "RAY_AUTH_MODE": "disabled",
                               "HOME": str(tmp_path)})
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("loft-dist: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("loft-dist: error: ") and names in lines[0], done.stderr[-3000:]


def test_decode_errors_carry_no_memory_address_and_group_by_kind():
    _, errors = decode_all([b"not an image", b"also not an image", b"", None])
    assert errors[0] == errors[1] and "0x" not in errors[0], errors
    assert errors[0].startswith("UnidentifiedImageError: cannot identify image file")
    assert error_kinds(np.array(errors + [""], dtype=object)) == {"UnidentifiedImageError": 2, "ValueError": 2}


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
