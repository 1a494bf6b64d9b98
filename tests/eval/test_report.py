"""`loft-dist report` and `loft-dist compare` on small fake run dirs laid out like a real run (no Ray, no model)."""

import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loft_dist.cli import main
from loft_dist.config import load_config, to_yaml
from loft_dist.storage import SUCCESS
from loft_dist.eval.metrics import classification_metrics, ood_metrics, pseudo_label_metrics
from loft_dist.eval.compare import compare_runs
from loft_dist.eval.report import PLOTS, write_report

NAMES = ["apple", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "kiwi", "lynx"]
# every count <= 100: "many" is empty, as for CIFAR-100-LT with N1 = 50 (SPEC F)
LABELED = [60, 45, 34, 26, 20, 15, 11, 8, 6, 5, 4, 3]
NAN_WORD = re.compile(r"\bnan\b", re.IGNORECASE)


def write_table(table_dir, columns: dict) -> None:
    """A committed scored table, as the scorer and commit_table leave it (list<float> probs, _SUCCESS)."""
    table_dir.mkdir(parents=True)
    probs = columns.pop("probs")
    table = pa.table({**columns, "probs": pa.array([list(map(float, p)) for p in probs], pa.list_(pa.float32()))})
    half = len(table) // 2  # two shards: readers must concatenate
    pq.write_table(table.slice(0, half), table_dir / "part-00000.parquet")
    pq.write_table(table.slice(half), table_dir / "part-00001.parquet")
    (table_dir / SUCCESS).write_text(json.dumps({"rows": len(table)}))


def scored(rng, true_label, skill, num_classes):
    """Predictions whose accuracy grows with `skill`; OOD rows (-1) get low-confidence guesses."""
    n = len(true_label)
    right = (rng.random(n) < skill) & (true_label >= 0)
    pred = np.where(right, true_label, rng.integers(0, num_classes, n))
    msp = np.where(right, rng.uniform(0.4, 0.99, n), rng.uniform(0.1, 0.5, n)).astype(np.float32)
    probs = np.full((n, num_classes), 0.0, np.float32)
    probs[np.arange(n), pred] = msp
    probs += (1 - msp[:, None]) / num_classes
    return pred.astype(np.int32), msp, probs


def decisions(msp, c_hard=0.6, c_ood=0.3):
    return np.where(msp >= c_hard, "hard", np.where(msp > c_ood, "soft", "rejected"))


def make_run(root, *, rounds=3, pool_ood=True, predictions=True, dataset=True, seed=0, overrides=()):
    """A run dir with config.yaml (the defaults and `overrides`), data/dataset.json and rounds/r*/{metrics.json,
    pseudo_labels, predictions/test}; `seed` draws its fake metrics and names its test split."""
    rng = np.random.default_rng(seed)
    C = len(NAMES)
    run = root
    run.mkdir(parents=True)
    cfg = load_config(None, [f"run.name={run.name}", *overrides])
    (run / "config.yaml").write_text(to_yaml(cfg))
    pool_truth = np.repeat(np.arange(C), [2 * n for n in LABELED]).astype(np.int32)
    if pool_ood:
        pool_truth = np.concatenate([pool_truth, np.full(40, -1, np.int32)])
    test_truth = np.repeat(np.arange(C), 10).astype(np.int32)
    if dataset:
        (run / "data").mkdir()
        (run / "data" / "dataset.json").write_text(json.dumps({
            "schema_version": 1, "class_names": NAMES,
            "counts": {"labeled": LABELED, "unlabeled": [2 * n for n in LABELED], "test": [10] * C},
            "ood_counts": {"unlabeled": int((pool_truth < 0).sum()), "ood_test": 30},
            "rows": {"labeled": sum(LABELED), "unlabeled": len(pool_truth), "test": len(test_truth), "ood_test": 30},
            "protocol": {"source": "fake", "n1": 60, "gamma_l": 20.0, "seed": seed},
            "checksums": {"test/part-00000.parquet": f"sha-{seed}"}}))
    zs_msp = rng.uniform(0.05, 0.6, len(pool_truth)).astype(np.float32)
    for r in range(rounds):
        rdir = run / "rounds" / f"r{r}"
        skill = 0.2 + 0.25 * r
        pred, msp, probs = scored(rng, pool_truth, skill, C)
        if r == 0:
            msp = zs_msp
        dec = decisions(msp)
        write_table(rdir / "pseudo_labels", {
            "id": np.arange(len(pool_truth), dtype=np.int64), "pred": pred, "msp": msp, "zs_msp": zs_msp,
            "decision": dec, "weight": np.where(dec == "rejected", 0.0, 1.0).astype(np.float32),
            "true_label": pool_truth, "error": np.full(len(pool_truth), ""), "probs": probs})
        t_pred, t_msp, t_probs = scored(rng, test_truth, skill, C)
        if predictions:
            write_table(rdir / "predictions" / "test", {
                "id": np.arange(len(test_truth), dtype=np.int64), "pred": t_pred, "msp": t_msp,
                "zs_msp": np.full(len(test_truth), np.nan, np.float32), "decision": decisions(t_msp),
                "weight": np.zeros(len(test_truth), np.float32), "true_label": test_truth,
                "error": np.full(len(test_truth), ""), "probs": t_probs})
        metrics = {"round": r, "model": "zero-shot CLIP" if r == 0 else f"checkpoint of round {r}",
                   "test": classification_metrics(test_truth, t_pred, t_msp, LABELED),
                   "ood_test": ood_metrics(t_msp, rng.uniform(0.1, 0.5, 30)),
                   "pseudo_labels": pseudo_label_metrics(dec, pred, pool_truth, C)}
        if pool_ood:
            ood = pool_truth < 0
            metrics["pool_ood"] = {"msp": ood_metrics(msp[~ood], msp[ood]),
                                   "zs_msp": ood_metrics(zs_msp[~ood], zs_msp[ood])}
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "metrics.json").write_text(json.dumps(metrics, allow_nan=False))
    return run


def check_report(run):
    """What every report must satisfy: each PNG named and embedded, a real image, no NaN anywhere."""
    out = run / "report"
    md = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs, "no figure written"
    for name in pngs:
        assert f"]({name})" in md, f"{name} is not embedded in report.md"
        path = out / name
        assert path.stat().st_size > 5 * 1024, f"{name} is suspiciously small"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200, (name, im.size)
    summary_text = (out / "metrics.json").read_text()
    for text in (md, summary_text):
        assert not NAN_WORD.search(text)
    summary = json.loads(summary_text, parse_constant=lambda c: pytest.fail(f"{c} in report/metrics.json"))
    assert sorted(summary["plots"]) == pngs
    return md, summary, pngs


def test_full_report_writes_every_figure(tmp_path):
    run = make_run(tmp_path / "exp")
    summary = write_report(run)
    md, saved, pngs = check_report(run)
    assert set(pngs) == set(PLOTS)
    assert summary["final"]["round"] == 2 and saved["class_names"] == NAMES
    # the empty "many" group: "–" in the table and a note, never NaN
    rows = [line for line in md.splitlines() if line.startswith("| 2 | checkpoint of round 2")]
    assert rows and rows[0].split(" | ")[5] == "–"
    assert "Empty groups: many — no class has > 100 labels" in md
    assert saved["empty_groups"] == {"many": "> 100 labels"}
    # the worst classes come from predictions/test and name real classes
    assert saved["worst_classes"] and all(w["name"] in NAMES for w in saved["worst_classes"])
    acc = [w["accuracy"] for w in saved["worst_classes"]]
    assert acc == sorted(acc)
    # existing tables are kept
    assert "| round | model | acc | balanced |" in md and "## Pseudo-labels of the pool, per round" in md


def test_report_from_the_cli(tmp_path, capsys):
    run = make_run(tmp_path / "exp", rounds=2)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    check_report(run)


def test_report_without_ood_predictions_or_dataset(tmp_path):
    """A sparse run still gets a report; what cannot be drawn is said in words, and no stale figure survives."""
    run = make_run(tmp_path / "exp", rounds=2)
    write_report(run)
    assert (run / "report" / "worst_classes_confusion.png").is_file()
    sparse = make_run(tmp_path / "sparse", rounds=1, pool_ood=False, predictions=False, dataset=False)
    write_report(sparse)
    md, summary, pngs = check_report(sparse)
    assert "worst_classes_confusion.png" not in pngs and "per_class_accuracy.png" not in pngs
    assert "no confusion summary" in md and "dataset.json of the run was not found" in md
    # rewriting a report removes the figures that no longer apply
    import shutil

    shutil.rmtree(run / "rounds" / "r1" / "predictions")
    write_report(run)
    assert not (run / "report" / "worst_classes_confusion.png").exists()
    check_report(run)


def test_nan_in_an_old_metrics_file_does_not_reach_the_report(tmp_path):
    run = make_run(tmp_path / "exp", rounds=2)
    path = run / "rounds" / "r1" / "metrics.json"
    m = json.loads(path.read_text())
    m["test"]["ece"] = math.nan
    m["test"]["tertiles"]["tail"]["accuracy"] = math.nan
    path.write_text(json.dumps(m))  # json allows NaN by default: what older code could have written
    write_report(run)
    check_report(run)


def test_compare_two_runs(tmp_path, capsys):
    a = make_run(tmp_path / "a" / "exp", seed=0)
    b = make_run(tmp_path / "b" / "exp", rounds=2, seed=1)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "| a/exp |" in md and "| b/exp |" in md  # same run name: the parent disambiguates
    assert "| loft (offline) / lora / loft-tiny-vit (random init) |" in md  # method, mode, adapter, model, weights
    assert "](compare.png)" in md and not NAN_WORD.search(md)
    assert "different test sets" in md  # fake checksums differ by seed
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert (out / "compare.png").stat().st_size > 5 * 1024
    summary = json.loads((out / "compare.json").read_text())
    assert [r["round"] for r in summary["runs"]] == [2, 1]
    assert summary["runs"][0]["values"]["many"] is None


def test_compare_averages_the_seeds_of_each_setup(tmp_path):
    """Runs whose configs differ only in the run section and data.root are one setup: the compare shows its mean
    and sample standard deviation over the seeds, beside every run's own row."""
    lft = [make_run(tmp_path / f"lft-s{s}", seed=s, overrides=[f"run.seed={s}", "algorithm.name=lft"])
           for s in (0, 1, 2)]
    loft = [make_run(tmp_path / f"loft-s{s}", seed=s, overrides=[f"run.seed={s}", f"data.root=/data-s{s}",
                                                                 "model.pretrained=standin"]) for s in (0, 1)]
    other_lr = make_run(tmp_path / "loft-lr", seed=0, overrides=["train.lr=0.5"])
    summary = compare_runs([*lft, *loft, other_lr], tmp_path / "cmp")
    groups = summary["groups"]
    assert [g["seeds"] for g in groups] == [[0, 1, 2], [0, 1], [0]]  # another lr is another setup
    for g, runs in zip(groups, (lft, loft, [other_lr])):
        acc = [json.loads((r / "rounds" / "r2" / "metrics.json").read_text())["test"]["accuracy"] for r in runs]
        assert g["mean"]["acc"] == pytest.approx(np.mean(acc))
        assert g["std"]["acc"] == (pytest.approx(np.std(acc, ddof=1)) if len(acc) > 1 else None)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    head = "| lft (offline) / lora / loft-tiny-vit (random init) | 3: 0, 1, 2 |"
    lft_row = next(row for row in md.splitlines() if row.startswith(head))
    assert f"{100 * groups[0]['mean']['acc']:.1f} ± {100 * groups[0]['std']['acc']:.1f}" in lft_row
    assert "## Every run" in md and md.count("| lft-s") == 3
    for table in md.split("\n\n"):  # every markdown table: as many cells in each line as in its header
        if table.startswith("|"):
            assert len({line.count("|") for line in table.splitlines()}) == 1, table
    assert "Each seed was evaluated on its own test split" in md  # the fake split differs by seed only
    assert "| loft (offline) / lora / loft-tiny-vit (CLIP stand-in, not CLIP) | 2: 0, 1 |" in md


def test_compare_of_single_runs_has_no_seed_table(tmp_path):
    a, b = make_run(tmp_path / "a", seed=0), make_run(tmp_path / "b", seed=0, overrides=["algorithm.name=lft"])
    summary = compare_runs([a, b], tmp_path / "cmp")
    assert [g["std"]["acc"] for g in summary["groups"]] == [None, None]
    assert "over seeds" not in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_rejects_a_dir_without_rounds(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rounds"):
        compare_runs([tmp_path], tmp_path / "cmp")


def test_a_failing_figure_is_a_note_not_a_crash(tmp_path, monkeypatch):
    from loft_dist.eval import plots

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this node")

    monkeypatch.setattr(plots, "reliability", broken)
    run = make_run(tmp_path / "exp", rounds=2)
    write_report(run)
    md, summary, pngs = check_report(run)
    assert "reliability.png" not in pngs and "reliability.png could not be drawn" in md
    assert "## Calibration" in md and len(pngs) == len(PLOTS) - 1


def test_report_says_round_0_of_the_stand_in_is_not_clip(tmp_path):
    """model.pretrained=standin is a stand-in trained here: the report never calls its zero-shot round CLIP."""
    run = make_run(tmp_path / "exp")
    write_report(run)
    assert "Round 0 is zero-shot CLIP." in (run / "report" / "report.md").read_text()
    cfg = load_config(None, [f"run.name={run.name}", "model.pretrained=standin"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "Round 0 is zero-shot of the CLIP stand-in (not CLIP)." in md and "zero-shot CLIP." not in md
