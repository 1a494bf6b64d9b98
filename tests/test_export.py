"""`loft-dist export` + `loft-dist predict`: an exported round predicts exactly what the in-memory model does,
with the run dir gone and without Ray."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loft_dist.cli import main
from loft_dist.config import load_config, to_yaml
from loft_dist.data.transforms import build_view, decode_image
from loft_dist.eval.metrics import classification_metrics
from loft_dist.export import completed_rounds
from loft_dist.models.checkpoint import save_weights
from loft_dist.models.clip import build_classifier

NAMES = ["ant", "bat", "cow", "doe", "elk"]
LABELED = [20, 12, 7, 4, 2]


def trained_like(cfg, seed):
    """A classifier whose adapter and head differ from their init, so that a load that silently does nothing
    would be caught (LoRA's B starts at zero: an untrained adapter is a no-op)."""
    model = build_classifier(cfg.model, cfg.peft, NAMES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_run(run, cfg, models: dict, completed: list[str] | None = None, save=save_weights):
    """A minimal run dir: config.yaml, data/dataset.json, rounds/r<k>/{checkpoint, metrics.json} per model."""
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "data" / "dataset.json").write_text(json.dumps({
        "schema_version": 1, "class_names": NAMES,
        "counts": {"labeled": LABELED, "unlabeled": [2 * n for n in LABELED], "test": [4] * 5},
        "ood_counts": {"unlabeled": 3, "ood_test": 0}, "rows": {"labeled": 45, "unlabeled": 93, "test": 20},
        "protocol": {"source": "fake", "n1": 20, "gamma_l": 10.0, "seed": 0}}))
    y = np.repeat(np.arange(5), 4)
    for r, model in models.items():
        rdir = run / "rounds" / f"r{r}"
        save(model, rdir / "checkpoint", {"epoch": 3, "loss": 1.25})
        m = {"round": r, "model": f"checkpoint of round {r}",
             "test": classification_metrics(y, np.roll(y, r), np.full(20, 0.5), LABELED)}
        (rdir / "metrics.json").write_text(json.dumps(m, allow_nan=False))
    if completed is not None:
        (run / "state.json").write_text(json.dumps({"completed": completed}))


def write_images(d):
    """A few PNGs of different sizes and modes (RGB, grayscale, RGBA): predict must treat them as scoring does."""
    d.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate([((32, 32), "RGB"), ((48, 40), "RGB"), ((20, 20), "L"), ((36, 36), "RGBA")]):
        shape = (size[1], size[0]) + ((len(mode),) if mode != "L" else ())
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        paths.append(str(d / f"img{i}.png"))
        img.save(paths[-1])
    return paths


def expected(model, paths, size, logits=None):
    view = build_view("clean", size, hflip=False)
    x = torch.from_numpy(view.batch([decode_image(open(p, "rb").read()) for p in paths]))
    with torch.inference_mode():
        probs = torch.softmax(model(x) if logits is None else logits(model, x), dim=-1)
    conf, idx = probs.max(-1)
    return [(NAMES[i], c) for i, c in zip(idx.tolist(), conf.tolist())]


@pytest.fixture
def cfg():
    return load_config(None, ["run.name=exp"])


def test_export_then_predict_without_the_run(tmp_path, cfg, capsys):
    model = trained_like(cfg, seed=1)
    run = tmp_path / "runs" / "exp"
    make_run(run, cfg, {1: model})
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "_SUCCESS", "adapter", "export.json",
                                                     "head.safetensors", "train_state.json"]  # no DeepSpeed state
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "export.json").read_text())
    assert meta["class_names"] == NAMES and meta["round"] == 1 and meta["image_size"] == cfg.data.image_size
    assert meta["model"]["name"] == cfg.model.name and meta["peft"]["method"] == "lora"
    assert meta["algorithm"]["name"] == cfg.algorithm.name
    card = (out / "README.md").read_text()
    for needle in ("## Data", "## Method", "## Metrics (round 1", "| torch |", "| open_clip_torch |", "| peft |",
                   "| loft_dist |", "Exported 20", "| n1 | 20 |", "| many | – |"):
        assert needle in card, needle
    shutil.rmtree(tmp_path / "runs")  # the export must stand alone
    paths = write_images(tmp_path / "images")
    capsys.readouterr()

    assert main(["predict", str(out), *paths, "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = expected(model, paths, cfg.data.image_size)
    assert [g["path"] for g in got] == paths
    assert [g["class"] for g in got] == [w[0] for w in want]
    assert [g["index"] for g in got] == [NAMES.index(w[0]) for w in want]
    np.testing.assert_allclose([g["probability"] for g in got], [w[1] for w in want], rtol=0, atol=1e-6)
    # the check has teeth: the same backbone without the exported adapter/head predicts something else
    untrained = expected(build_classifier(cfg.model, cfg.peft, NAMES).eval(), paths, cfg.data.image_size)
    assert max(abs(u[1] - w[1]) for u, w in zip(untrained, want)) > 1e-3

    assert main(["predict", str(out), paths[0]]) == 0  # text form: path, class, probability
    path, name, prob = capsys.readouterr().out.strip().split("\t")
    assert (path, name) == (paths[0], want[0][0]) and abs(float(prob) - want[0][1]) < 1e-6


def test_export_from_an_s3_run_dir_then_predict_locally(tmp_path, cfg, capsys, s3_server):
    """A run dir in object storage (as a KubeRay run leaves it): export fetches only what it needs (no optimizer
    state, no other files), and the export predicts locally exactly as the in-memory model does."""
    from loft_dist import storage
    from loft_dist.models.checkpoint import DS_DIR

    model = trained_like(cfg, seed=3)
    run = tmp_path / "exp"
    make_run(run, cfg, {1: model, 2: trained_like(cfg, 4)},
             completed=["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval", "r2.score", "r2.train"])
    (run / "rounds" / "r1" / "checkpoint" / DS_DIR).mkdir()
    (run / "rounds" / "r1" / "checkpoint" / DS_DIR / "optim_states.pt").write_bytes(b"x" * 1000)
    bucket = s3_server.bucket()
    uri = f"s3://{bucket}/runs/exp"
    storage.upload_dir(run, uri)
    shutil.rmtree(run)
    out = tmp_path / "export"
    assert main(["export", uri, "--out", str(out)]) == 0
    meta = json.loads((out / "export.json").read_text())
    assert meta["round"] == 1 and meta["run"] == {"name": "exp", "dir": uri}  # r2 never finished its eval
    assert not (out / DS_DIR).exists()
    paths = write_images(tmp_path / "images")
    capsys.readouterr()
    assert main(["predict", str(out), *paths, "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = expected(model, paths, cfg.data.image_size)
    assert [g["class"] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g["probability"] for g in got], [w[1] for w in want], rtol=0, atol=1e-6)
    assert main(["export", f"s3://{bucket}/runs/nothing-here", "--out", str(tmp_path / "e2")]) == 2
    assert "not a loft_dist run dir" in capsys.readouterr().err


def test_predict_reports_unreadable_files_and_goes_on(tmp_path, cfg, capsys):
    run = tmp_path / "exp"
    make_run(run, cfg, {1: trained_like(cfg, seed=2)})
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    paths = write_images(tmp_path / "images")
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    capsys.readouterr()
    assert main(["predict", str(out), paths[0], str(bad), str(tmp_path / "missing.jpg"), paths[1], "--json"]) == 1
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("error" in g) for g in got] == [False, True, True, False]
    assert got[1]["path"] == str(bad) and got[3]["class"] in NAMES


def test_default_round_is_the_last_completed(tmp_path, cfg):
    run = tmp_path / "exp"
    # r2's checkpoint exists but its eval never finished: not a completed round
    make_run(run, cfg, {1: trained_like(cfg, 1), 2: trained_like(cfg, 2)},
             completed=["prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval", "r2.score", "r2.train"])
    assert completed_rounds(run) == [1]
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "export.json").read_text())["round"] == 1


def test_re_exporting_into_an_earlier_export_replaces_it(tmp_path, cfg):
    run = tmp_path / "exp"
    make_run(run, cfg, {1: trained_like(cfg, 1), 2: trained_like(cfg, 2)})
    out = tmp_path / "e"
    assert main(["export", str(run), "--round", "1", "--out", str(out)]) == 0
    (out / "stale.bin").write_bytes(b"left by the earlier export")
    assert main(["export", str(run), "--round", "2", "--out", str(out)]) == 0
    ckpt = run / "rounds" / "r2" / "checkpoint"
    copied = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == \
        sorted(copied + [Path("README.md"), Path("_SUCCESS"), Path("export.json")])  # nothing earlier is left
    for rel in copied:  # the weights are round 2's, which differ from round 1's
        assert (out / rel).read_bytes() == (ckpt / rel).read_bytes(), rel
    r1_head = run / "rounds" / "r1" / "checkpoint" / "head.safetensors"
    assert (out / "head.safetensors").read_bytes() != r1_head.read_bytes()
    assert json.loads((out / "export.json").read_text())["round"] == 2
    assert "# loft_dist model — exp, round 2" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left beside it


def test_export_errors_name_the_problem(tmp_path, cfg, capsys):
    run = tmp_path / "exp"
    make_run(run, cfg, {1: trained_like(cfg, 1)})
    assert main(["export", str(run), "--round", "0", "--out", str(tmp_path / "e")]) == 2
    assert "--round=0 is not allowed" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "not a loft_dist export" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["predict", str(tmp_path / "busy"), "x.png"]) == 2
    assert "not a loft_dist export" in capsys.readouterr().err


def test_a_ulfine_export_predicts_with_the_fused_logits(tmp_path, capsys):
    """The method's own model and test logits (ULFine: linear head + dual logit fusion), as the evaluation scored."""
    from loft_dist.algorithms import inference_logits, method_of
    from loft_dist.models.ulfine import ULFineClassifier

    cfg = load_config(None, ["run.name=exp", "algorithm.name=ulfine"])
    model = ULFineClassifier(trained_like(cfg, seed=3))
    with torch.no_grad():
        model.linear.weight.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    model.eval()
    run = tmp_path / "exp"
    make_run(run, cfg, {1: model}, save=method_of(cfg.algorithm).save)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    shutil.rmtree(run)
    paths = write_images(tmp_path / "images")
    capsys.readouterr()
    assert main(["predict", str(out), *paths, "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = expected(model, paths, cfg.data.image_size, lambda m, x: inference_logits(cfg.algorithm, m, x, "test"))
    assert [g["class"] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g["probability"] for g in got], [w[1] for w in want], rtol=0, atol=1e-6)
    text_only = expected(model, paths, cfg.data.image_size, lambda m, x: m(x)["text"])
    assert max(abs(t[1] - w[1]) for t, w in zip(text_only, want)) > 1e-3  # the linear head made a difference
