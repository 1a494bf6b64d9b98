"""The pseudo-label gallery: one static HTML page of the images behind a pool's pseudo-label table, per class.

Each class (its rows by pseudo-label `pred`) shows: the most confident accepted rows (hard, then soft, by MSP);
the rows whose MSP is nearest c_hard and nearest c_ood (the two boundaries of the MSP rule); the wrong
pseudo-labels (accepted, ground truth known and different: an admitted OOD image counts, as in the metrics); and
the rejected and stage-1 OOD rows (lowest score first, with their zero-shot MSP). Rows that failed to decode when
scored are counted on the page, not shown; an image the shards lack is a visible "not found" box, counted too.

Cheap for any pool: the table is streamed batch by batch keeping at most PER_CLASS rows per class and section
(memory O(classes x sections), never O(rows)); then only the picked rows' images are read (the id column of the
pool shards, then the row groups holding them). Thumbnails are PNG data URIs, so the page works from file://
with nothing beside it.

Size bound: at most MAX_IMAGES (300) thumbnails of at most THUMB x THUMB (64 x 64) RGB pixels (a PNG exceeds its
raw pixels by its headers at most), captions with class names cut to NAME_CHARS, at most one class block per
thumbnail: the page is at most MAX_PAGE_BYTES (6,288,784 bytes, about 6.3 MB) whatever the pool size.
tests/eval/test_gallery.py checks it on a 1,000,000-row table over 64 x 64 noise images (the largest thumbnails:
~5.1 MB); 300 thumbnails of small or smooth images take far less.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loft_dist import storage
from loft_dist.data.decisions import DECISIONS, HARD, OOD, REJECTED, SOFT
from loft_dist.data.pseudo_labels import read_columns, table_files
from loft_dist.data.store import read_dataset_info, read_rows_by_id, shard_paths
from loft_dist.data.transforms import decode_all
from loft_dist.errors import ConfigError, DataError, StorageError

PER_CLASS = 4  # thumbnails per class and section, at most
MAX_IMAGES = 300  # thumbnails on the page, at most
THUMB = 64  # px, longest side of a thumbnail; smaller images are not enlarged (the page scales them up)
NAME_CHARS = 40  # class names are cut to this many characters on the page
_PNG_MAX = 3 * THUMB * THUMB + THUMB + 1024  # RGB rows with a filter byte each, + PNG and zlib headers
_FIGURE_MAX = 4 * (_PNG_MAX // 3 + 1) + 1024  # its base64, + <figure> and the caption
_CLASS_MAX = 2048  # a class block: its link, heading, counts and section headings
MAX_PAGE_BYTES = 16384 + MAX_IMAGES * (_FIGURE_MAX + _CLASS_MAX)
SECTIONS = {  # key → heading
    "accepted": "Most confident accepted (hard, then soft)",
    "c_hard": "Nearest the c_hard boundary",
    "c_ood": "Nearest the c_ood boundary",
    "wrong": "Wrong pseudo-labels",
    "rejected": "Rejected / OOD",
}
UNKNOWN = -2  # `truth` of a row whose true_label is null (or the table has none)
_REQUIRED = ("id", "pred", "msp", "decision")
_OPTIONAL = ("zs_msp", "true_label", "error")
_STYLE = """body{font:13px system-ui,sans-serif;margin:16px;color:#222}h2{margin:20px 0 2px;border-bottom:1px solid #ccc}
h3{font-size:13px;margin:8px 0 4px;color:#444}h3 small{display:block;font-weight:normal;color:#666}.note{color:#a00}
.sections{display:flex;flex-wrap:wrap;gap:4px 28px}.sec{max-width:500px}.strip{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:116px}img,.missing{width:80px;height:80px;object-fit:contain;image-rendering:pixelated;
background:#eee;display:block}.missing{display:flex;align-items:center;justify-content:center;text-align:center;
color:#a00;font-size:11px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,#ddd 6px,#ddd 12px)}
figcaption{font-size:11px;line-height:1.3;border-left:3px solid #999;padding-left:4px;margin-top:2px;
overflow-wrap:anywhere}.hard{border-color:#2a2}.soft{border-color:#28c}.rejected{border-color:#e80}
.ood{border-color:#c22}.wrong{color:#c00;font-weight:bold}nav a{margin-right:8px}"""


# --------------------------------------------------------------------------------------------
# picking the rows: one streamed pass, a few rows per class and section kept
# --------------------------------------------------------------------------------------------
def _table_batches(table_dir: str):
    """(columns, unreadable) of each batch of a complete table; `file` indexes table_files, `code` DECISIONS."""
    for i, f in enumerate(table_files(table_dir)):
        pf = pq.ParquetFile(storage.open_input(f))
        have = pf.schema_arrow.names
        missing = [c for c in _REQUIRED if c not in have]
        if missing:
            raise DataError(f"{f} has no {missing[0]!r} column: not a pseudo-label table; give the table dir that "
                            f"`loft-dist score` wrote (scoring.output) or a run's rounds/r<k>/pseudo_labels")
        for b in pf.iter_batches(columns=[c for c in _REQUIRED + _OPTIONAL if c in have], batch_size=1 << 16):
            yield _columns(b, i, f)


def _columns(b: pa.RecordBatch, file: int, where: str) -> tuple[dict, np.ndarray]:
    def col(name, fill, dtype):
        if name not in b.schema.names:
            return np.full(b.num_rows, fill, dtype)
        return pc.fill_null(b.column(name), fill).to_numpy(zero_copy_only=False).astype(dtype)

    code = pc.index_in(b.column("decision"), value_set=pa.array(DECISIONS)).to_numpy(zero_copy_only=False)
    if np.isnan(code.astype(float)).any():
        raise DataError(f"{where}: a decision outside {DECISIONS}: not a loft_dist pseudo-label table")
    r = {"id": col("id", 0, np.int64), "pred": col("pred", -1, np.int64), "msp": col("msp", np.nan, np.float32),
         "zs_msp": col("zs_msp", np.nan, np.float32), "code": code.astype(np.int8),
         "truth": col("true_label", UNKNOWN, np.int64), "file": np.full(b.num_rows, file, np.int32)}
    return r, col("error", "", object) != ""


def _section_order(key: str, r: dict, c_hard: float, c_ood: float) -> tuple[np.ndarray, tuple]:
    """(the rows of r in a section, its sort keys: first key first, smallest first)."""
    code, msp = r["code"], r["msp"]
    accepted = (code == HARD) | (code == SOFT)
    if key == "accepted":
        return accepted, (code, -msp)  # HARD < SOFT: hard rows first
    if key in ("c_hard", "c_ood"):  # stage-1 OOD rows were never put to the MSP rule
        return code != OOD, (np.abs(msp - (c_hard if key == "c_hard" else c_ood)),)
    if key == "wrong":
        return accepted & (r["truth"] != UNKNOWN) & (r["truth"] != r["pred"]), (-msp,)
    ood = code == OOD  # each row ordered by the score that rejected it
    return (code == REJECTED) | ood, (ood, np.where(ood, r["zs_msp"], msp))


def _top(r: dict, keys: tuple, k: int) -> dict:
    """The first k rows of each class (pred) in the order of keys, ties by id; sorted by class, then that order."""
    order = np.lexsort((r["id"], *reversed(keys), r["pred"]))
    cls = r["pred"][order]
    keep = order[np.arange(len(order)) - np.searchsorted(cls, cls) < k]
    return {f: v[keep] for f, v in r.items()}


def _stream(table_dir: str, sections: list[str], c_hard: float, c_ood: float, names: list[str],
            per_class: int) -> tuple[dict, dict]:
    """One pass over the table: each section's best per_class rows of each class, and the counts the page states."""
    C = len(names)
    picked: dict[str, dict] = {}
    stats = {"rows": 0, "unreadable": 0, "id_truth": False, "counts": np.zeros((C, len(DECISIONS)), np.int64),
             "wrong": np.zeros((C, 2), np.int64)}  # per class: wrong with an ID true class, admitted true OOD
    for r, bad in _table_batches(table_dir):
        stats["rows"] += len(bad)
        stats["unreadable"] += int(bad.sum())
        r = {f: v[~bad] for f, v in r.items()}
        if r["pred"].size and (r["pred"].min() < 0 or r["pred"].max() >= C):
            raise DataError(f"{table_dir} has pseudo-label class {int(r['pred'].max())}, but {C} class names were "
                            f"given ({', '.join(names[:3])}, …): give the class list the table was scored with, in "
                            f"its order (loft-dist gallery --class-names FILE)")
        stats["counts"] += np.bincount(r["pred"] * len(DECISIONS) + r["code"],
                                       minlength=C * len(DECISIONS)).reshape(C, -1)
        stats["id_truth"] |= bool((r["truth"] >= 0).any())
        wrong = _section_order("wrong", r, c_hard, c_ood)[0]
        for j, truth_ood in enumerate((False, True)):
            stats["wrong"][:, j] += np.bincount(r["pred"][wrong & ((r["truth"] == -1) == truth_ood)], minlength=C)
        for s in sections:
            rows = {f: v[_section_order(s, r, c_hard, c_ood)[0]] for f, v in r.items()}
            if s in picked:
                rows = {f: np.concatenate([picked[s][f], v]) for f, v in rows.items()}
            picked[s] = _top(rows, _section_order(s, rows, c_hard, c_ood)[1], per_class)
    return picked, stats


def _fit(picked: dict, num_classes: int, per_class: int, max_images: int) -> tuple[dict, int]:
    """The sections cut to max_images in all: fewer rows per class and section first, down to one; then classes
    evenly spread over the class ids (head to tail, for a long-tailed dataset). Returns (picked, classes cut)."""
    n = np.stack([np.bincount(p["pred"], minlength=num_classes) for p in picked.values()], axis=1)
    k = per_class
    while k > 1 and np.minimum(n, k).sum() > max_images:
        k -= 1
    present = np.flatnonzero(n.sum(axis=1))
    classes = present
    if np.minimum(n, k).sum() > max_images:
        m = max_images // len(picked)  # this many classes fit at one row per section
        classes = present[np.unique(np.linspace(0, len(present) - 1, m).round().astype(int))]
    shown = np.isin(np.arange(num_classes), classes)
    out = {}
    for s, p in picked.items():
        rank = np.arange(len(p["pred"])) - np.searchsorted(p["pred"], p["pred"])
        keep = (rank < k) & shown[p["pred"]]
        out[s] = {f: v[keep] for f, v in p.items()}
    return out, len(present) - len(classes)


# --------------------------------------------------------------------------------------------
# the images of the picked rows
# --------------------------------------------------------------------------------------------
def image_shards(location: str) -> list[str]:
    """The Parquet image shards of a prepared dataset dir (its unlabeled split) or of a plain dir of shards."""
    if storage.is_file(storage.join(location, "dataset.json")):
        return shard_paths(location, "unlabeled")
    names = [n for n in storage.listdir(location) if n.endswith(".parquet")]
    if not names:
        raise StorageError(f"{location} is neither a prepared dataset (dataset.json + unlabeled/) nor a dir of "
                           f"Parquet image shards: give the one the table was scored from (for an image folder, the "
                           f"shards `loft-dist score` staged beside its output: .<output name>.input)")
    return [storage.join(location, n) for n in names]


def _thumbnails(table_dir: str, shards: list[str], picked: dict) -> dict[int, str | None]:
    """id → PNG data URI of each picked row's image (None: it does not decode); an id absent was found nowhere.
    The pool shards the table's _SUCCESS names for the picked rows' files are read first, so the others are
    seldom opened."""
    ids = np.concatenate([p["id"] for p in picked.values()])
    files = np.unique(np.concatenate([p["file"] for p in picked.values()]))
    of = storage.committed(table_dir).get("shards") or {}
    names = [storage.name(f) for f in table_files(table_dir)]
    first = {of.get(names[i]) for i in files}
    t = read_rows_by_id(sorted(shards, key=lambda p: storage.name(p) not in first), ids, ["id", "image"])
    decoded, _ = decode_all(t.column("image").to_pylist())
    uris: dict[int, str | None] = {}
    for row, rid in enumerate(t.column("id").to_pylist()):
        img = decoded.get(row)
        if img is None:
            uris[rid] = None
            continue
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
        uris[rid] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return uris


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
def _name(names: list[str], c: int) -> str:
    return html.escape(str(names[c])[:NAME_CHARS])


def _figure(p: dict, i: int, names: list[str], uris: dict, ood_truth: bool) -> tuple[str, str]:
    """One thumbnail with its caption (id, pseudo-label, MSP, decision, zero-shot MSP, true class when known), and
    what stands in for a missing image ("" when it is there)."""
    rid, pred, code, truth = int(p["id"][i]), int(p["pred"][i]), int(p["code"][i]), int(p["truth"][i])
    uri = uris.get(rid, "")
    lack = "" if uri else ("undecodable image" if rid in uris else "image not found")
    img = f'<img src="{uri}" alt="id {rid}">' if uri else f'<div class="missing">{lack}</div>'
    lines = [f"id {rid}", f"→ {_name(names, pred)}", f"msp {p['msp'][i]:.3f} · {DECISIONS[code]}"]
    if code in (REJECTED, OOD) and np.isfinite(p["zs_msp"][i]):
        lines.append(f"zs_msp {p['zs_msp'][i]:.3f}")
    if truth >= 0 or (truth == -1 and ood_truth):
        true = _name(names, truth) if truth >= 0 else "OOD"
        lines.append(f'<span class="wrong">true: {true}</span>' if truth != pred else f"true: {true}")
    return (f'<figure>{img}<figcaption class="{DECISIONS[code]}">{"<br>".join(lines)}</figcaption></figure>',
            lack)


def _class_block(c: int, picked: dict, headings: dict, names: list[str], uris: dict, stats: dict,
                 lacking: list[str]) -> str:
    counts = ", ".join(f"{d} {n}" for d, n in zip(DECISIONS, stats["counts"][c]))
    wrong = stats["wrong"][c]
    truth = (f"; wrong {wrong[0]} with another true class" + (f", {wrong[1]} true OOD" if stats["ood_truth"] else "")
             if stats["id_truth"] else "")
    parts = [f'<section id="class-{c}"><h2>{c} · {_name(names, c)}</h2><p>rows with this pseudo-label: {counts}'
             f'{truth}</p><div class="sections">']
    for s, p in picked.items():
        rows = np.flatnonzero(p["pred"] == c)
        if rows.size:
            figures = [_figure(p, i, names, uris, stats["ood_truth"]) for i in rows]
            lacking += [lack for _, lack in figures if lack]
            parts += [f'<div class="sec"><h3>{headings[s]}</h3><div class="strip">', *(f for f, _ in figures),
                      "</div></div>"]
    return "\n".join(parts + ["</div></section>"])


def _page(title: str, table_dir: str, picked: dict, headings: dict, names: list[str], uris: dict,
          stats: dict, notes: list[str], caps: tuple[int, int]) -> tuple[str, list[str]]:
    """The HTML, and what stands in for each missing image."""
    classes = sorted({int(c) for p in picked.values() for c in p["pred"]})
    lacking: list[str] = []
    blocks = [_class_block(c, picked, headings, names, uris, stats, lacking) for c in classes]
    totals = ", ".join(f"{d} {n}" for d, n in zip(DECISIONS, stats["counts"].sum(axis=0)))
    if lacking:  # placeholders, never a silent drop
        notes = notes + [f"{len(lacking)} of the {sum(len(p['id']) for p in picked.values())} thumbnails are "
                         f"missing ({', '.join(f'{k}: {lacking.count(k)}' for k in sorted(set(lacking)))}): "
                         f"are the images the pool this table was scored from?"]
    head = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
            f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
            f"<p>Table {html.escape(str(table_dir)[-200:])}: {stats['rows']} rows ({totals}). Per class, at most "
            f"{caps[0]} images per section and {caps[1]} in all; captions: id, pseudo-label, MSP, decision, true class where known.</p>",
            *(f'<p class="note">{n}</p>' for n in notes),
            "<nav>" + "".join(f'<a href="#class-{c}">{_name(names, c)}</a>' for c in classes) + "</nav>"]
    return "\n".join(head + blocks + ["</body></html>\n"]), lacking


def _headings(sections: list[str], c_hard: float, c_ood: float) -> dict[str, str]:
    detail = {"accepted": "by MSP, highest first",
              "c_hard": f"MSP nearest c_hard = {c_hard:g}: hard at or above it, soft or rejected below",
              "c_ood": f"MSP nearest c_ood = {c_ood:g}: rejected at or below it, soft above",
              "wrong": "accepted, and the true class differs; highest MSP first",
              "rejected": "rejected by MSP ≤ c_ood (lowest MSP first), then stage-1 OOD (lowest zero-shot MSP first)"}
    return {s: f"{SECTIONS[s]} <small>({html.escape(detail[s])})</small>" for s in sections}


def write_gallery(table_dir: str, images: str, class_names: list[str], c_hard: float, c_ood: float, out_html: str,
                  *, title: str = "Pseudo-label gallery", per_class: int = PER_CLASS,
                  max_images: int = MAX_IMAGES) -> dict:
    """The gallery of a complete pseudo-label table, written to out_html (a path or a URI). images: where the
    table's pool images are (image_shards); class_names: the scorer's classes, in its order; c_hard, c_ood: the
    thresholds the table was decided with. Returns what the page shows."""
    if not 0 <= c_ood <= c_hard <= 1:
        raise ConfigError(f"c_hard {c_hard}, c_ood {c_ood}: need 0 <= c_ood <= c_hard <= 1, the thresholds the table "
                          f"was scored with (algorithm.c_hard / c_ood of its config; loft-dist gallery --c-hard / "
                          f"--c-ood)")
    if per_class < 1 or max_images < len(SECTIONS):
        raise ConfigError(f"per_class {per_class}, max_images {max_images}: need at least 1 and {len(SECTIONS)}")
    table_dir = str(table_dir)
    sections = [s for s in SECTIONS if s != "c_ood" or 0 < c_ood < c_hard]
    notes = [] if "c_ood" in sections else [
        f"c_ood = {c_ood:g}: " + ("the MSP rule rejects no row, so there is no c_ood boundary." if c_ood <= 0 else
                                  "c_ood = c_hard (no soft band): the one boundary is c_hard's.")]
    picked, stats = _stream(table_dir, sections, c_hard, c_ood, list(class_names), per_class)
    # true_label -1 is a true OOD image in a prepared dataset's pool, but also what an image folder scored by
    # `loft-dist score` gets for "unknown": with no in-distribution truth at all, nothing is known.
    stats["ood_truth"] = stats["id_truth"]
    if not stats["id_truth"]:
        picked["wrong"] = {f: v[:0] for f, v in picked["wrong"].items()}
        notes.append("Ground truth of the pool is unknown: no wrong pseudo-labels can be shown.")
    picked, cut = _fit(picked, len(class_names), per_class, max_images)
    if cut:
        notes.append(f"{cut} classes with rows are not shown, to keep the page under {max_images} images.")
    if stats["unreadable"]:
        notes.append(f"{stats['unreadable']} rows failed to decode when scored (their `error` column): not shown.")
    shown = sum(len(p["id"]) for p in picked.values())
    uris = _thumbnails(table_dir, image_shards(str(images)), picked) if shown else {}
    page, lacking = _page(title, table_dir, picked, _headings(sections, c_hard, c_ood), list(class_names), uris,
                          stats, notes, (per_class, max_images))
    storage.write_text(str(out_html), page)
    return {"path": str(out_html), "bytes": len(page.encode()), "images": shown - len(lacking),
            "missing": len(lacking), "rows": stats["rows"], "classes_cut": cut,
            "sections": {s: {"id": p["id"].tolist(), "pred": p["pred"].tolist(), "msp": p["msp"].tolist(),
                             "decision": [DECISIONS[c] for c in p["code"]]} for s, p in picked.items()}}


def class_names_for(table_dir: str, images: str, names_file: str | None = None) -> list[str]:
    """The classes of a table scored outside a run: names_file (one per line, in the scorer's order), else the
    dataset's dataset.json, else "class k" for every class the table predicts."""
    if names_file:
        return storage.read_lines(names_file)
    if storage.is_file(storage.join(str(images), "dataset.json")):
        return read_dataset_info(str(images))["class_names"]
    pred = read_columns(table_dir, ["pred"])["pred"]
    return [f"class {c}" for c in range(int(pred.max()) + 1 if pred.size else 0)]
