"""Pseudo-labels that are proven: the actor-pool scoring table holds, row by row, what the method's model computes
in-process on the same images, and the next round's training stream carries exactly the table's pool rows.

The reference is written out here, independently of `Scorer.__call__` and `pseudo_label_decision`: the model from
`load_model`, `inference_logits`, the scoring view from `loft_dist.data.transforms`, a softmax with the
temperature, and the SPEC decision bands. Thresholds are cut from the observed MSP distribution (in gaps between
the values, so that thread-count rounding cannot move a row across one) such that every decision kind — hard,
soft, rejected and ood — occurs; the tests assert each does, so none can pass on an empty band.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from loft_dist.algorithms import inference_logits, load_model, method_of
from loft_dist.algorithms.loft import HARD, LABELED, REJECTED, SOFT
from loft_dist.config import load_config
from loft_dist.data.prepare import prepare_dataset
from loft_dist.data.pseudo_labels import round_datasets
from loft_dist.train.loop import soft_targets
from loft_dist.data.store import read_dataset_info, shard_paths
from loft_dist.data.transforms import decode_batch, normalize
from loft_dist.scoring.job import score_tables, split_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROB_TOL = 1e-5  # actor (1 torch thread) vs this process: float32 rounding only (seen: < 1e-6)
MARGIN = 5e-5  # no reference MSP / top-k boundary lies this close to a threshold / its neighbour
TOPK = 3  # the teacher table keeps the renormalised top-3 of the 10 digit classes
DECISION_KINDS = {"hard", "soft", "rejected", "ood"}


# ---------------------------------------------------------------------------------------------------------------
# The in-process reference


def _overrides(root: Path, *extra: str) -> list[str]:
    # OOD images at 32 px (not the digits' native 8 px): the pool whose MSP gaps the seeds below were chosen for
    return [f"data.root={root / 'data'}", "data.ood_test=0", "data.ood_image_size=32", f"run.storage_path={root / 'runs'}",
            "scoring.batch_size=64", "scoring.rows_per_chunk=250",  # several batches and two chunks per job, one ending inside a shard
            "train.labeled_view=clean", "train.unlabeled_view=clean",  # deterministic images in the stream
            *extra]


def _read_split(root: str, split: str, columns: list[str]) -> dict[str, np.ndarray]:
    t = pq.read_table(shard_paths(root, split), columns=columns)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _softmax(logits: torch.Tensor, temperature: float) -> np.ndarray:
    return torch.softmax(logits.double() / temperature, dim=-1).numpy()


def _logits(cfg, model, x: torch.Tensor, purpose: str) -> torch.Tensor:
    with torch.inference_mode():
        return inference_logits(cfg.algorithm, model, x, purpose).float()


def _spec_decision(probs: np.ndarray, zs_msp: np.ndarray, a) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SPEC A.2 step 4 + LoFT-OW stage 1, as stated: (pred, msp, decision, weight)."""
    q, pred = probs.max(axis=1), probs.argmax(axis=1)
    decision = np.where(q >= a.c_hard, "hard", np.where(q > a.c_ood, "soft", "rejected")).astype(object)
    if a.zs_filter:
        ood = zs_msp < a.zs_threshold if a.zs_keep == "above" else zs_msp >= a.zs_threshold
        decision[ood] = "ood"
    weight = np.zeros(len(q))
    weight[decision == "hard"] = 1.0
    soft = decision == "soft"
    weight[soft] = q[soft] if a.soft_weight == "msp" else 1.0
    return pred, q, decision.astype(str), weight


def _cut(values: np.ndarray, quantile: float) -> float:
    """A threshold near `quantile` of `values`, in the middle of the widest gap around it (at least 2 MARGIN)."""
    v = np.unique(values)
    i = int(quantile * (len(v) - 1))
    lo, hi = max(1, i - len(v) // 8), min(len(v) - 1, i + len(v) // 8)
    gaps = v[lo:hi + 1] - v[lo - 1:hi]
    j = lo + int(np.argmax(gaps))
    assert gaps.max() > 2 * MARGIN, f"no gap of {2 * MARGIN} in the MSPs near quantile {quantile}"
    return float((v[j - 1] + v[j]) / 2)


def _assert_well_separated(probs: np.ndarray, k: int) -> None:
    """argmax and the top-k set cannot flip under float rounding: the reference's own ties are far apart."""
    s = -np.sort(-probs, axis=1)
    assert (s[:, 0] - s[:, 1]).min() > MARGIN, "a near-tie for the top class: pick another perturbation seed"
    if k and k < probs.shape[1]:
        assert (s[:, k - 1] - s[:, k]).min() > MARGIN, "a near-tie at the top-k boundary"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared tiny data, the pool decoded with the scoring view, and a trained-looking teacher checkpoint."""
    root = tmp_path_factory.mktemp("pl_values")
    cfg = load_config(None, _overrides(root))
    prepare_dataset(cfg)
    classes = read_dataset_info(cfg.data_root)["class_names"]

    pool = _read_split(cfg.data_root, "unlabeled", ["id", "image", "true_label"])
    order = np.argsort(pool["id"])
    pool = {k: v[order] for k, v in pool.items()}
    # The scoring job's decode: the scoring view as uint8 pixels, normalised by the consumer.
    decoded = decode_batch(dict(pool), view=cfg.scoring.view, image_size=cfg.data.image_size, normalized=False)
    assert (decoded["error"] == "").all(), "the embedded pool should decode entirely"
    x = normalize(decoded["image"])

    # A teacher that is not the text-prototype init: adapter + head moved by a fixed-seed perturbation.
    model = load_model(cfg, classes, None)
    g = torch.Generator().manual_seed(3)  # a seed whose top-1 / top-3 boundaries are >= 1.8e-4 apart
    with torch.no_grad():
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert any("lora" in n for n, _ in trainable) and any(n.startswith("head") for n, _ in trainable)
        for _, p in trainable:
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
            p.add_(0.5 * scale * torch.randn(p.shape, generator=g))
    ckpt = root / "teacher_ckpt"
    method_of(cfg.algorithm).save(model, ckpt, {"epoch": 0, "class_names": classes})
    teacher = load_model(cfg, classes, str(ckpt))  # what an actor loads
    xt = torch.from_numpy(x)
    perturbed = _logits(cfg, model.eval(), xt, "pseudo_label")
    loaded = _logits(cfg, teacher, xt, "pseudo_label")
    torch.testing.assert_close(loaded, perturbed)  # the checkpoint round-trips the perturbed weights
    preds = loaded.argmax(-1)
    assert len(preds.unique()) >= 4, "the teacher should not be trivial"
    return {"root": root, "classes": classes, "pool": pool, "x": xt, "ckpt": str(ckpt), "teacher": teacher,
            "init": load_model(cfg, classes, None)}


def _read_table(table: Path) -> dict[str, np.ndarray]:
    assert (table / "_SUCCESS").is_file()
    t = pq.read_table(sorted(glob.glob(os.path.join(table, "*.parquet"))))
    out = {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    for c in ("probs", "probs_idx"):
        if c in out:
            out[c] = np.stack(out[c])
    order = np.argsort(out["id"])
    return {k: v[order] for k, v in out.items()}


def _assert_table_is_reference(tab: dict, pool: dict, ref_probs: np.ndarray, zs_msp: np.ndarray, a, topk: int):
    """Row by row, joined on id: the scored table equals the in-process reference."""
    np.testing.assert_array_equal(tab["id"], pool["id"])  # exactly one row per pool image, same ids
    pred, msp, decision, weight = _spec_decision(ref_probs, zs_msp, a)
    np.testing.assert_array_equal(tab["error"], "")
    np.testing.assert_array_equal(tab["true_label"], pool["true_label"])
    np.testing.assert_array_equal(tab["pred"], pred, err_msg="pred differs from the teacher's argmax")
    np.testing.assert_allclose(tab["msp"], msp, atol=PROB_TOL, rtol=0, err_msg="msp")
    np.testing.assert_allclose(tab["zs_msp"], zs_msp, atol=PROB_TOL, rtol=0, err_msg="zs_msp")
    np.testing.assert_array_equal(tab["decision"], decision, err_msg="decision differs from the SPEC bands")
    np.testing.assert_allclose(tab["weight"], weight, atol=PROB_TOL, rtol=0, err_msg="weight")
    C = ref_probs.shape[1]
    if topk and topk < C:
        ref_idx = np.argsort(-ref_probs, axis=1)[:, :topk]
        top = np.take_along_axis(ref_probs, ref_idx, axis=1)
        assert tab["probs"].shape == tab["probs_idx"].shape == (len(pool["id"]), topk)
        np.testing.assert_array_equal(np.sort(tab["probs_idx"], axis=1), np.sort(ref_idx, axis=1))
        np.testing.assert_allclose(_scatter(tab["probs"], tab["probs_idx"], C),
                                   _scatter(top / top.sum(axis=1, keepdims=True), ref_idx, C), atol=PROB_TOL, rtol=0,
                                   err_msg="renormalised top-k probs")
    else:
        assert "probs_idx" not in tab
        np.testing.assert_allclose(tab["probs"], ref_probs, atol=PROB_TOL, rtol=0, err_msg="probs")
    got = set(tab["decision"].tolist())
    assert got == DECISION_KINDS, f"every decision kind must occur (else a band is untested): {got}"


def _scatter(p: np.ndarray, idx: np.ndarray, C: int) -> np.ndarray:
    full = np.zeros((len(p), C), np.float64)
    np.put_along_axis(full, idx.astype(np.int64), p, axis=1)
    return full


# ---------------------------------------------------------------------------------------------------------------
# The tables the actor-pool jobs write


@pytest.fixture(scope="module")
def zero_shot_table(world, ray_session):
    """Round 0: zero-shot scores of the initial model, LoFT-OW thresholds cut from the zero-shot MSPs."""
    root, pool = world["root"], world["pool"]
    cfg0 = load_config(None, _overrides(root))
    ref = _softmax(_logits(cfg0, world["init"], world["x"], "zero_shot"), 1.0)
    _assert_well_separated(ref, 0)
    q = ref.max(axis=1)
    # zs_msp = msp here: ood (q < zs_threshold) < rejected (<= c_ood) < soft < hard (>= c_hard).
    zs_thr, c_ood, c_hard = _cut(q, 0.2), _cut(q, 0.45), _cut(q, 0.75)
    cfg = load_config(None, _overrides(root, "algorithm.name=loft_ow", f"algorithm.zs_threshold={zs_thr}",
                                       f"algorithm.c_ood={c_ood}", f"algorithm.c_hard={c_hard}",
                                       "scoring.probs_topk=0"))
    table, r1 = root / "r0_table", root / "r1_init_table"
    # As the round driver's round 0 does: the zero-shot model is round 1's teacher, so one job reads the pool once
    # and scores it into both tables
    paths = shard_paths(cfg.data_root, "unlabeled")
    rows = score_tables(cfg, {"pool r0": (paths, str(table), "zero_shot"), "pool r1": (paths, str(r1), "teacher")},
                        class_names=world["classes"])
    assert rows == {"pool r0": len(pool["id"]), "pool r1": len(pool["id"])}
    return {"cfg": cfg, "table": table, "ref": ref, "zs_msp": q, "r1_table": r1}


@pytest.fixture(scope="module")
def teacher_table(world, zero_shot_table):
    """Round r: the perturbed checkpoint as teacher (T = 0.7, soft weight = MSP, top-3 probs), stage 1 from round 0."""
    root, pool = world["root"], world["pool"]
    T = 0.7
    ref = _softmax(_logits(zero_shot_table["cfg"], world["teacher"], world["x"], "pseudo_label"), T)
    _assert_well_separated(ref, TOPK)
    zs = zero_shot_table["zs_msp"]
    zs_thr = _cut(zs, 0.3)
    q = ref.max(axis=1)[zs >= zs_thr]  # bands cut among the rows stage 1 keeps
    c_ood, c_hard = _cut(q, 0.3), _cut(q, 0.7)
    cfg = load_config(None, _overrides(root, "algorithm.name=loft_ow", f"algorithm.zs_threshold={zs_thr}",
                                       f"algorithm.c_ood={c_ood}", f"algorithm.c_hard={c_hard}",
                                       f"algorithm.temperature={T}", "algorithm.soft_weight=msp",
                                       f"scoring.probs_topk={TOPK}", "scoring.min_actors=2", "scoring.max_actors=2"))
    table, test = root / "r1_table", root / "r1_test"
    # As the round driver's evaluation does: one job scores the test split (eval) beside the next round's pool
    # (teacher) with the same model, rows of both tables meeting in the actors' batches
    inputs = {"unlabeled": (shard_paths(cfg.data_root, "unlabeled"), str(table), "teacher"),
              **split_inputs(cfg.data_root, {"test": str(test)}, "eval")}
    rows = score_tables(cfg, inputs, class_names=world["classes"], checkpoint=world["ckpt"],
                        zs_table=str(zero_shot_table["table"]))
    assert rows == {"unlabeled": len(pool["id"]), "test": read_dataset_info(cfg.data_root)["rows"]["test"]}
    return {"cfg": cfg, "table": table, "ref": ref, "zs_msp": zs, "test_table": test}


# ---------------------------------------------------------------------------------------------------------------
# 1. The table is the model's output


def test_zero_shot_table_equals_in_process_zero_shot_scores(world, zero_shot_table):
    z = zero_shot_table
    tab = _read_table(z["table"])
    _assert_table_is_reference(tab, world["pool"], z["ref"], z["zs_msp"], z["cfg"].algorithm, topk=0)
    np.testing.assert_allclose(tab["zs_msp"], tab["msp"], atol=0, rtol=0)  # round 0: the zero-shot MSP is the MSP


def test_round_ones_table_scored_beside_round_0s_is_the_initial_models_teacher_scores(world, zero_shot_table):
    """Round 1's teacher is the initial model: its pool table, scored in round 0's job from the same decoded rows,
    holds that model's teacher scores, with round 0's zero-shot MSP as each row's stage-1 score, bit for bit."""
    z = zero_shot_table
    a = z["cfg"].algorithm
    ref = _softmax(_logits(z["cfg"], world["init"], world["x"], "pseudo_label"), a.temperature)
    _assert_well_separated(ref, 0)
    tab, r0 = _read_table(z["r1_table"]), _read_table(z["table"])
    np.testing.assert_array_equal(tab["zs_msp"], r0["zs_msp"])  # the same forward's value, not a recomputation
    pred, msp, decision, weight = _spec_decision(ref, z["zs_msp"], a)
    np.testing.assert_array_equal(tab["id"], world["pool"]["id"])
    np.testing.assert_array_equal(tab["pred"], pred, err_msg="pred differs from the initial model's teacher argmax")
    np.testing.assert_allclose(tab["msp"], msp, atol=PROB_TOL, rtol=0)
    np.testing.assert_allclose(tab["probs"], ref, atol=PROB_TOL, rtol=0)
    np.testing.assert_array_equal(tab["decision"], decision)
    np.testing.assert_allclose(tab["weight"], weight, atol=PROB_TOL, rtol=0)
    assert "ood" in set(tab["decision"].tolist()) and not np.array_equal(tab["msp"], tab["zs_msp"])


def test_teacher_table_equals_in_process_teacher_scores(world, teacher_table):
    t = teacher_table
    tab = _read_table(t["table"])
    _assert_table_is_reference(tab, world["pool"], t["ref"], t["zs_msp"], t["cfg"].algorithm, topk=TOPK)
    soft = tab["decision"] == "soft"
    assert (tab["weight"][soft] < 1).all()  # soft_weight=msp really weighs the soft band by q, not 1


def test_test_rows_scored_beside_teacher_rows_are_the_models_test_predictions(world, teacher_table):
    """The evaluation's rows of the teacher's job: the model's test logits, and no zero-shot MSP (not pool rows)."""
    cfg = teacher_table["cfg"]
    test = _read_split(cfg.data_root, "test", ["id", "image", "true_label"])
    order = np.argsort(test["id"])
    test = {k: v[order] for k, v in test.items()}
    x = normalize(decode_batch(dict(test), view=cfg.scoring.view, image_size=cfg.data.image_size,
                               normalized=False)["image"])
    ref = _softmax(_logits(cfg, world["teacher"], torch.from_numpy(x), "test"), cfg.algorithm.temperature)
    tab = _read_table(teacher_table["test_table"])
    np.testing.assert_array_equal(tab["id"], test["id"])
    np.testing.assert_array_equal(tab["true_label"], test["true_label"])
    np.testing.assert_array_equal(tab["pred"], ref.argmax(axis=1))
    np.testing.assert_allclose(tab["msp"], ref.max(axis=1), atol=PROB_TOL, rtol=0)
    assert np.isnan(tab["zs_msp"]).all()


def test_a_batch_holding_two_tables_rows_scores_each_row_in_its_own_mode(world, zero_shot_table, teacher_table):
    """Ray Data may bundle rows of two tables into one batch: each row comes out as its table's mode scores it."""
    from loft_dist.config import to_dict
    from loft_dist.scoring.scorer import Scorer

    cfg = teacher_table["cfg"]
    scorer = Scorer(to_dict(cfg), world["classes"], checkpoint=world["ckpt"], zs_table=str(zero_shot_table["table"]))
    n = 24
    parts = {"teacher": {k: v[:n] for k, v in world["pool"].items()},
             "eval": _read_split(cfg.data_root, "test", ["id", "image", "true_label"])}
    parts["eval"] = {k: v[:n] for k, v in parts["eval"].items()}
    decoded = {m: decode_batch(dict(p), view=cfg.scoring.view, image_size=cfg.data.image_size, normalized=False)
               for m, p in parts.items()}
    target = {m: json.dumps([[c, m]]) for c, m in enumerate(decoded)}
    for m, d in decoded.items():  # what read_unit adds to each row
        d.update(targets=np.full(n, target[m], dtype=object), path=np.full(n, f"{m}.parquet", dtype=object))
    alone = {m: scorer(d).to_pydict() for m, d in decoded.items()}
    order = np.random.default_rng(0).permutation(2 * n)  # the two tables' rows interleaved
    mixed = {k: np.concatenate([decoded["teacher"][k], decoded["eval"][k]])[order] for k in decoded["eval"]}
    got = scorer(mixed).to_pydict()
    by_id = {i: g for g, i in enumerate(got["id"])}  # id → its row in the mixed batch's output
    assert sorted(by_id) == sorted(alone["teacher"]["id"] + alone["eval"]["id"])
    for m, want in alone.items():
        for j, i in enumerate(want["id"]):
            g = by_id[i]
            assert (got["pred"][g], got["decision"][g], got["chunk"][g]) == \
                (want["pred"][j], want["decision"][j], want["chunk"][j]), (m, i)
            np.testing.assert_allclose([got["msp"][g], got["zs_msp"][g]], [want["msp"][j], want["zs_msp"][j]],
                                       atol=PROB_TOL, rtol=0)
    assert np.isnan(alone["eval"]["zs_msp"]).all() and not np.isnan(alone["teacher"]["zs_msp"]).any()


# ---------------------------------------------------------------------------------------------------------------
# 2. The next round trains on exactly the table's pool rows


def _collect(ds) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("which", ["zero_shot_table", "teacher_table"], ids=["full_probs", f"top{TOPK}_probs"])
def test_training_stream_carries_exactly_the_tables_pool_rows(which, world, request):
    scored = request.getfixturevalue(which)
    cfg, classes = scored["cfg"], world["classes"]
    C = len(classes)
    tab = _read_table(scored["table"])
    topk = "probs_idx" in tab
    assert topk == (which == "teacher_table")
    ds, what = round_datasets(cfg.data_root, cfg, C, str(scored["table"]), str(scored["table"]))
    got, p = _collect(ds["train"]), _collect(ds["pool"])

    in_pool = np.isin(tab["decision"], ["hard", "soft", "rejected"])  # stage-1 `ood` rows never enter it
    assert {"hard", "soft", "rejected"} <= set(tab["decision"][in_pool].tolist()) and (~in_pool).any()
    n = {d: int((tab["decision"] == d).sum()) for d in ("hard", "soft", "rejected")}
    assert f"hard {n['hard']}, soft {n['soft']}, rejected {n['rejected']} (weight 0)" in what

    # Labeled rows: their own label, code LABELED, weight 1, no soft target.
    lab = _read_split(cfg.data_root, "labeled", ["id", "label", "image"])
    assert (got["code"] == LABELED).all()
    lid = got["id"]
    assert len(lid) == len(set(lid.tolist())) == len(lab["id"]) and set(lid.tolist()) == set(lab["id"].tolist())
    want_label = dict(zip(lab["id"].tolist(), lab["label"].tolist()))
    np.testing.assert_array_equal(got["target"], [want_label[i] for i in lid.tolist()])
    np.testing.assert_array_equal(got["weight"], 1.0)
    np.testing.assert_array_equal(got["soft"], 0.0)

    # Pool rows: every hard / soft / rejected id exactly once, no ood id, and the table row's own values.
    pid = p["id"]
    assert len(pid) == len(set(pid.tolist())), "a pool id appears twice in the stream"
    assert set(pid.tolist()) == set(tab["id"][in_pool].tolist()), "the stream's pool ids != the table's non-ood ids"
    order = np.argsort(pid)
    p = {k: v[order] for k, v in p.items()}
    row = np.searchsorted(tab["id"], p["id"])
    np.testing.assert_array_equal(tab["id"][row], p["id"])
    np.testing.assert_array_equal(p["target"], tab["pred"][row], err_msg="stream target != the table's pred")
    np.testing.assert_allclose(p["weight"], tab["weight"][row], atol=0, rtol=0, err_msg="stream weight")
    assert (p["weight"][tab["decision"][row] == "rejected"] == 0).all()
    want_code = np.select([tab["decision"][row] == "hard", tab["decision"][row] == "soft"], [HARD, SOFT], REJECTED)
    np.testing.assert_array_equal(p["code"], want_code, err_msg="stream code != the table's decision")
    # Top-k tables stay top-k in the stream (never C floats per row); the loop scatters them on the device.
    assert p["soft"].shape == (len(pid), TOPK if topk else C) and ("soft_idx" in p) == topk
    soft = soft_targets({k: torch.from_numpy(v) for k, v in p.items() if k in ("soft", "soft_idx")}, C, "cpu").numpy()
    want_soft = (_scatter(tab["probs"][row], tab["probs_idx"][row], C) if topk else tab["probs"][row])
    np.testing.assert_allclose(soft, want_soft, atol=1e-7, rtol=0, err_msg="stream soft target")
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    # The image travels with its id: the (clean) view of that id's own bytes.
    pool = world["pool"]
    at = np.searchsorted(pool["id"], p["id"])
    np.testing.assert_allclose(p["image"], world["x"].numpy()[at], atol=1e-6, rtol=0, err_msg="pool image vs id")
    lab_x = normalize(decode_batch({"image": lab["image"]}, view="clean", image_size=cfg.data.image_size,
                                   normalized=False)["image"])
    at = np.searchsorted(lab["id"], lid, sorter=np.argsort(lab["id"]))
    np.testing.assert_allclose(got["image"], lab_x[np.argsort(lab["id"])[at]], atol=1e-6, rtol=0,
                               err_msg="labeled image vs id")
