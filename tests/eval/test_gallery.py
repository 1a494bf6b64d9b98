"""The pseudo-label gallery (eval/gallery.py): which rows each section holds, the caps, missing images, the size
bound on a 1,000,000-row table, and its place in `loft-dist report` and `loft-dist gallery`."""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
import tracemalloc

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gallery_pool import C_HARD, C_OOD, synthetic_pool, write_images, write_table  # noqa: E402

from loft_dist.cli import main  # noqa: E402
from loft_dist.config import load_config, to_yaml  # noqa: E402
from loft_dist.data import store  # noqa: E402
from loft_dist.data.decisions import DECISIONS  # noqa: E402
from loft_dist.errors import DataError, StorageError  # noqa: E402
from loft_dist.eval.gallery import MAX_IMAGES, MAX_PAGE_BYTES, SECTIONS, write_gallery  # noqa: E402

NAMES = ["ant", "bee", "cat"]
IMG = re.compile(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="id (\d+)">')


def pool(tmp_path, n=240, num_classes=3, **kw):
    """(table dir, images root, columns) of a small pool whose every id has an image."""
    cols = synthetic_pool(n, num_classes, **kw)
    write_table(tmp_path / "table", cols)
    write_images(tmp_path / "data", np.unique(cols["id"]), dataset_json={"class_names": NAMES[:num_classes]})
    return tmp_path / "table", tmp_path / "data", cols


def expected(cols, num_classes, k):
    """Each section's ids per class, in page order, by a plain Python reading of the rules."""
    rows = [{"id": int(i), "pred": int(p), "msp": float(m), "zs": float(z), "dec": DECISIONS[c], "truth": int(t)}
            for i, p, m, z, c, t, e in zip(cols["id"], cols["pred"], cols["msp"], cols["zs_msp"], cols["code"],
                                           cols["true_label"], cols["error"]) if not e]
    accepted = [r for r in rows if r["dec"] in ("hard", "soft")]
    msp_rule = [r for r in rows if r["dec"] != "ood"]
    sections = {
        "accepted": (accepted, lambda r: (r["dec"] != "hard", -r["msp"], r["id"])),
        "c_hard": (msp_rule, lambda r: (abs(r["msp"] - C_HARD), r["id"])),
        "c_ood": (msp_rule, lambda r: (abs(r["msp"] - C_OOD), r["id"])),
        "wrong": ([r for r in accepted if r["truth"] != r["pred"]], lambda r: (-r["msp"], r["id"])),
        "rejected": ([r for r in rows if r["dec"] in ("rejected", "ood")],
                     lambda r: (r["dec"] == "ood", r["zs"] if r["dec"] == "ood" else r["msp"], r["id"])),
    }
    return {s: [r["id"] for c in range(num_classes) for r in sorted((r for r in rs if r["pred"] == c), key=key)[:k]]
            for s, (rs, key) in sections.items()}


def test_sections_hold_the_right_rows(tmp_path):
    table, data, cols = pool(tmp_path, errors=6)
    g = write_gallery(table, data, NAMES, C_HARD, C_OOD, tmp_path / "g.html", per_class=4)
    want = expected(cols, 3, 4)
    got = {s: v["id"] for s, v in g["sections"].items()}
    assert list(got) == list(SECTIONS) and got == want
    acc = g["sections"]["accepted"]
    for c in range(3):  # hard first, then soft, each by MSP from the highest
        rows = [(d, m) for p, d, m in zip(acc["pred"], acc["decision"], acc["msp"]) if p == c]
        assert rows == sorted(rows, key=lambda r: (r[0] != "hard", -r[1])) and rows[0][0] == "hard"
    # the boundary rows are the nearest ones: no row left out of a class is nearer its threshold
    for s, c_ in (("c_hard", C_HARD), ("c_ood", C_OOD)):
        sec = g["sections"][s]
        for c in range(3):
            shown = max(abs(m - c_) for p, m in zip(sec["pred"], sec["msp"]) if p == c)
            others = [abs(m - c_) for i, p, m, d, e in zip(cols["id"], cols["pred"], cols["msp"], cols["code"],
                                                           cols["error"])
                      if p == c and d != 2 and not e and i not in sec["id"]]
            assert shown <= min(others)
    bad = set(cols["id"][cols["error"] == 1].tolist())
    assert not bad & {i for v in got.values() for i in v}  # undecodable rows are counted, never shown
    html = (tmp_path / "g.html").read_text()
    assert "6 rows failed to decode when scored" in html
    assert len(IMG.findall(html)) == g["images"] == sum(map(len, want.values()))


def test_wrong_pseudo_labels_are_exactly_the_accepted_rows_with_another_true_class(tmp_path):
    table, data, cols = pool(tmp_path, n=150)
    g = write_gallery(table, data, NAMES, C_HARD, C_OOD, tmp_path / "g.html", per_class=1000, max_images=10**4)
    accepted = cols["code"] < 2
    assert sorted(g["sections"]["wrong"]["id"]) == sorted(cols["id"][accepted & (cols["true_label"] != cols["pred"])])
    assert sorted(g["sections"]["rejected"]["id"]) == sorted(cols["id"][cols["code"] >= 2])
    assert sorted(g["sections"]["accepted"]["id"]) == sorted(cols["id"][accepted])
    html = (tmp_path / "g.html").read_text()
    r = int(np.flatnonzero(accepted & (cols["true_label"] >= 0) & (cols["true_label"] != cols["pred"]))[0])
    caption = re.search(rf'alt="id {cols["id"][r]}"><figcaption class="(\w+)">(.*?)</figcaption>', html)
    assert caption.group(1) == DECISIONS[cols["code"][r]]
    assert caption.group(2) == (f"id {cols['id'][r]}<br>→ {NAMES[cols['pred'][r]]}<br>msp {cols['msp'][r]:.3f} · "
                                f"{DECISIONS[cols['code'][r]]}<br><span class=\"wrong\">true: "
                                f"{NAMES[cols['true_label'][r]]}</span>")
    assert "true: OOD" in html  # an admitted OOD image is a wrong pseudo-label too


def test_without_ground_truth_nothing_is_called_wrong(tmp_path):
    """An image folder scored by `loft-dist score` has true_label -1 everywhere: unknown, not OOD."""
    table, data, _ = pool(tmp_path, truth=False)
    g = write_gallery(table, data, NAMES, C_HARD, C_OOD, tmp_path / "g.html")
    html = (tmp_path / "g.html").read_text()
    assert g["sections"]["wrong"]["id"] == [] and "Ground truth of the pool is unknown" in html
    assert "true:" not in html


def test_caps_hold(tmp_path):
    table, data, cols = pool(tmp_path, n=400)
    g = write_gallery(table, data, NAMES, C_HARD, C_OOD, tmp_path / "a.html", per_class=4, max_images=30)
    assert g["images"] == 30 and g["classes_cut"] == 0  # 60 rows at 4 per section: 2 per section fit
    for s in g["sections"].values():
        assert all(s["pred"].count(c) <= 2 for c in range(3))
    assert g["sections"]["accepted"]["id"] == expected(cols, 3, 2)["accepted"]

    names = [f"class {c}" for c in range(20)]
    table, data, _ = pool(tmp_path / "many", n=2000, num_classes=20)
    g = write_gallery(table, data, names, C_HARD, C_OOD, tmp_path / "b.html", per_class=3, max_images=40)
    html = (tmp_path / "b.html").read_text()
    assert g["images"] <= 40 and g["classes_cut"] == 12  # 8 classes fit at one image per section
    assert len(IMG.findall(html)) == g["images"] and "12 classes with rows are not shown" in html
    shown = sorted({c for s in g["sections"].values() for c in s["pred"]})
    assert shown[0] == 0 and shown[-1] == 19  # spread from head to tail


def test_missing_images_are_placeholders_with_a_count(tmp_path):
    cols = synthetic_pool(120, 3)
    write_table(tmp_path / "table", cols)
    g0 = write_gallery(tmp_path / "table", _images(tmp_path / "all", cols["id"]), NAMES, C_HARD, C_OOD,
                       tmp_path / "all.html")
    shown = sorted({i for s in g0["sections"].values() for i in s["id"]})
    gone, broken = shown[:3], shown[3:5]
    kept = [i for i in cols["id"] if i not in gone]
    g = write_gallery(tmp_path / "table", _images(tmp_path / "some", kept, bad=tuple(broken)), NAMES, C_HARD,
                      C_OOD, tmp_path / "g.html")
    html = (tmp_path / "g.html").read_text()
    n_gone = sum(s["id"].count(i) for s in g["sections"].values() for i in gone)
    n_broken = sum(s["id"].count(i) for s in g["sections"].values() for i in broken)
    assert html.count(">image not found<") == n_gone and html.count(">undecodable image<") == n_broken
    assert g["missing"] == n_gone + n_broken and g["images"] == g0["images"] - g["missing"]
    assert (f"{g['missing']} of the {g0['images']} thumbnails are missing (image not found: {n_gone}, undecodable "
            f"image: {n_broken})") in html
    with pytest.raises(StorageError, match="neither a prepared dataset"):
        write_gallery(tmp_path / "table", tmp_path, NAMES, C_HARD, C_OOD, tmp_path / "x.html")
    with pytest.raises(DataError, match="pseudo-label class 2, but 2 class names"):
        write_gallery(tmp_path / "table", tmp_path / "all", NAMES[:2], C_HARD, C_OOD, tmp_path / "x.html")


def _images(root, ids, bad=()):
    write_images(root, np.unique(ids), bad=bad)
    return root / "unlabeled"  # a plain dir of shards, as `loft-dist score` takes


def test_a_million_row_table_gives_a_bounded_page(tmp_path):
    """1,000,000 rows over 100 classes, their ids cycling over 600 images of incompressible noise (the largest
    thumbnails there are): the page stays under MAX_PAGE_BYTES, in bounded memory and time."""
    n, num_ids = 1_000_000, 600
    cols = synthetic_pool(n, 100, num_ids=num_ids, seed=1, errors=100)
    write_table(tmp_path / "table", cols, files=4)
    names = [f"class {c}" for c in range(100)]
    write_images(tmp_path / "data", range(num_ids), size=64, noise=True, rows_per_shard=200,
                 dataset_json={"class_names": names})
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t0 = time.perf_counter()
    g = write_gallery(tmp_path / "table", tmp_path / "data", names, C_HARD, C_OOD, tmp_path / "g.html")
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # MB (Linux: ru_maxrss in kB)
    size = (tmp_path / "g.html").stat().st_size
    print(f"1M rows: {size:,} bytes (bound {MAX_PAGE_BYTES:,}), {g['images']} images, {seconds:.1f} s, "
          f"traced peak {peak / 2**20:.0f} MB, max RSS grew {grown:.0f} MB")
    assert g["rows"] == n and g["images"] == MAX_IMAGES and g["missing"] == 0
    assert size == g["bytes"] and size <= MAX_PAGE_BYTES
    assert peak < 64 * 2**20 and grown < 400 and seconds < 60


def test_read_rows_by_id_reads_only_the_row_groups_holding_them(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROW_GROUP_MB", 0.001)  # one ~1 kB image per row group
    write_images(tmp_path, range(40), noise=True, rows_per_shard=20)  # 1.7 kB of noise: one image per row group
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw))
    t = store.read_rows_by_id(store.shard_paths(str(tmp_path), "unlabeled"), [33, 5, 999, 5], ["id", "image"])
    assert sorted(t.column("id").to_pylist()) == [5, 33] and read == [[5], [13]]


# --------------------------------------------------------------------------------------------
# in the report and on the command line
# --------------------------------------------------------------------------------------------
def test_the_report_links_the_gallery_of_the_last_pool_table(tmp_path):
    from test_report import make_run

    from loft_dist.eval.report import write_report

    run = make_run(tmp_path / "exp", rounds=2)
    n = json.loads((run / "rounds" / "r1" / "pseudo_labels" / "_SUCCESS").read_text())["rows"]
    write_images(run / "data", range(n))
    summary = write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "Pseudo-label gallery: [gallery.html](gallery.html) — pool images of round 1's table" in md
    assert summary["gallery"]["round"] == 1 and summary["gallery"]["images"] > 0
    html = (run / "report" / "gallery.html").read_text()
    assert len(IMG.findall(html)) == summary["gallery"]["images"] and "round 1" in html

    (run / "config.yaml").write_text(to_yaml(load_config(None, ["run.name=exp", "algorithm.name=lp"])))
    summary = write_report(run)  # lp trains on labeled data only: no gallery, and the old one goes
    assert summary["gallery"] is None and not (run / "report" / "gallery.html").exists()
    assert "gallery" not in (run / "report" / "report.md").read_text()

    zs = make_run(tmp_path / "zs", rounds=1)  # round 0 (zero-shot) only
    write_images(zs / "data", range(n))
    assert write_report(zs)["gallery"] is None and not (zs / "report" / "gallery.html").exists()


def test_gallery_from_the_cli(tmp_path, capsys):
    table, data, _ = pool(tmp_path)
    names = tmp_path / "classes.txt"
    names.write_text("ant\n\nbee\ncat  \n")
    out = tmp_path / "g.html"
    assert main(["gallery", str(table), "--data", str(data / "unlabeled"), "--out", str(out), "--class-names",
                 str(names), "--c-hard", str(C_HARD), "--c-ood", str(C_OOD)]) == 0
    assert re.fullmatch(r"done: \d+ images of 240 rows — .*g\.html \(0\.\d MB\)\n", capsys.readouterr().out)
    assert "→ cat" in out.read_text() and "c_ood = 0.25" in out.read_text()
    names.write_text("ant\nbee\n")
    assert main(["gallery", str(table), "--data", str(data), "--out", str(out), "--class-names", str(names)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loft-dist: error: ") and "--class-names FILE" in err and len(err.splitlines()) == 1
