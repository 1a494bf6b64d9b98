"""`loft-dist export` and `loft-dist predict`: one round's model as a self-contained directory, and
inference from that directory alone — no run dir, no dataset, no Ray.

Export layout (the round's checkpoint without its DeepSpeed optimizer state, plus what rebuilds the model):
    adapter/{adapter_config.json, adapter_model.safetensors}   the adapter (peft format for LoRA and LN; none: absent)
    head.safetensors                                           cosine-head weights
    … any other weights the method saves (ULFine: its linear head), train_state.json
    export.json                                                class names, model / peft / algorithm config, …
    README.md                                                  model card
The backbone itself is rebuilt from `model.name` / `model.pretrained` (an open_clip tag from the local cache,
a weights file, or the seeded random init), and the model and its test logits come from the same
`loft_dist.algorithms.load_model` / `inference_logits` that the evaluation's scorer uses, so `predict`
gives the probabilities the round was evaluated with.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import tempfile
from pathlib import Path

from loft_dist import storage
from loft_dist.errors import StorageError, WeightsError

EXPORT_FILE = "export.json"
FORMAT = "loft_dist.export"
FORMAT_VERSION = 1
VIEW = "clean"  # the test-time transform of the evaluation (SPEC G.9: resize, no augmentation)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def completed_rounds(run_dir: str | Path) -> list[int]:
    """Rounds >= 1 whose checkpoint and metrics are in place (and, when state.json exists, whose eval phase
    is recorded complete): the rounds an export may take. Round 0 is zero-shot CLIP and has no checkpoint."""
    lay = storage.RunLayout(str(run_dir))
    done = set(storage.read_json(lay.state)["completed"]) if storage.is_file(lay.state) else None
    return [r for r in lay.rounds() if r >= 1 and storage.is_file(storage.join(lay.checkpoint(r), "head.safetensors"))
            and storage.is_file(lay.metrics(r)) and (done is None or f"r{r}.eval" in done)]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("loft_dist", "torch", "open_clip_torch", "peft", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _headline(m: dict) -> dict:
    """The numbers a model card shows, from a round's metrics.json (None stays None: "–" in the card)."""
    t = m["test"]
    out = {"test_images": t.get("n"), "accuracy": t["accuracy"], "balanced_accuracy": t["balanced_accuracy"],
           "macro_f1": t.get("macro_f1"), "ece": t.get("ece"),
           **{g: t["groups"][g]["accuracy"] for g in ("many", "medium", "few")},
           **{g: t["tertiles"][g]["accuracy"] for g in ("head", "mid", "tail")}}
    o = m.get("ood_test") or {}
    out.update({"ood_auroc": o.get("auroc"), "ood_fpr95": o.get("fpr95")})
    p = m.get("pseudo_labels") or {}
    out.update({"pseudo_label_precision": p.get("precision"), "pseudo_label_coverage": p.get("coverage")})
    return out


def _round_to_export(run_dir: Path, round_idx: int | None) -> int:
    """round_idx when it completed with a checkpoint (default: the last that did); a one-line error otherwise."""
    from loft_dist.config import ConfigError

    rounds = completed_rounds(run_dir)
    if not rounds:
        raise StorageError(f"{run_dir} has no completed round with a checkpoint (rounds/r<k>/checkpoint, k >= 1); "
                           f"round 0 is zero-shot CLIP and is not exported")
    r = rounds[-1] if round_idx is None else round_idx
    if r not in rounds:
        raise ConfigError(f"--round={r} is not allowed: completed rounds of {run_dir} with a checkpoint are "
                          f"{', '.join(map(str, rounds))}")
    return r


def export_round(run_dir: str | Path, out_dir: str | Path, round_idx: int | None = None) -> Path:
    """Copy round `round_idx` (default: the last completed) of a run into `out_dir` with export.json and a
    model card. An existing `out_dir` is replaced only when it is empty or an earlier export. The run dir may be
    an object-store URI: what the export reads of it is fetched first (never the tables, never optimizer state)."""
    if not storage.is_uri(str(run_dir)) or storage.is_local(str(run_dir)):
        return _export_round(Path(storage.resolve(str(run_dir))[1]), Path(out_dir), round_idx, str(run_dir))
    with tempfile.TemporaryDirectory(prefix="loft_dist-export-") as tmp:
        _fetch_for_export(str(run_dir), Path(tmp))
        return _export_round(Path(tmp), Path(out_dir), round_idx, str(run_dir))


def _fetch_for_export(run_uri: str, local: Path) -> None:
    """The parts of a remote run dir an export reads: config.yaml, state.json, data/dataset.json, and of each round
    its metrics.json and checkpoint without the DeepSpeed state."""
    from loft_dist.models.checkpoint import DS_DIR

    if not storage.is_file(storage.join(run_uri, "config.yaml")):
        raise StorageError(f"{storage.join(run_uri, 'config.yaml')} not found: {run_uri} is not a loft_dist run dir")
    for rel in ("config.yaml", "state.json", "data/dataset.json"):
        if storage.is_file(storage.join(run_uri, rel)):
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(storage.read_bytes(storage.join(run_uri, rel)))
    for rnd in storage.listdir(storage.join(run_uri, "rounds")):
        remote = storage.join(run_uri, "rounds", rnd)
        files = ["metrics.json"] + [f"checkpoint/{n}" for n in storage.listdir(storage.join(remote, "checkpoint"))
                                    if n != DS_DIR]
        for rel in files:
            src, dst = storage.join(remote, rel), local / "rounds" / rnd / rel
            if storage.is_file(src):
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(storage.read_bytes(src))
            elif storage.is_dir(src):
                with storage.local_dir(src) as d:
                    shutil.copytree(d, dst)


def _export_round(run_dir: Path, out: Path, round_idx: int | None, run_name: str) -> Path:
    from loft_dist.config import ConfigError, from_dict
    from loft_dist.data.store import find_dataset_info, load_run_config
    from loft_dist.models.checkpoint import DS_DIR

    lay = storage.RunLayout(str(run_dir))
    if not storage.is_file(lay.config):
        raise StorageError(f"{lay.config} not found: {run_dir} is not a loft_dist run dir")
    r = _round_to_export(run_dir, round_idx)
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ConfigError(f"--out={out} is not allowed: it exists, is not empty and is not a loft_dist export; "
                          f"choose a new directory")
    cfg_dict = load_run_config(run_dir)
    cfg = from_dict(cfg_dict)  # validates the sections export.json will carry
    info = find_dataset_info(run_dir, cfg_dict)
    metrics = storage.read_json(lay.metrics(r))
    ckpt = Path(lay.checkpoint(r))
    train_state = json.loads((ckpt / "train_state.json").read_text()) if (ckpt / "train_state.json").is_file() else {}
    # dataset.json may live on storage the exporting machine cannot see; newer checkpoints carry the names too
    names = info["class_names"] if info else train_state.get("class_names")
    if names is None:
        raise StorageError(f"dataset.json of {run_dir} not found (data.root={cfg.data.root!r}, or "
                                f"{lay.data}) and the checkpoint names no classes: the export needs them")

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "class_names": names,
        "model": cfg_dict["model"], "peft": cfg_dict["peft"], "algorithm": cfg_dict["algorithm"],
        "image_size": cfg.data.image_size, "view": VIEW,
        "round": r, "run": {"name": storage.name(run_name), "dir": storage.absolute(run_name)},
        "metrics": _headline(metrics), "train_state": train_state,
        "versions": _versions(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = Path(storage.staging(str(out.resolve())))
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"--out={out}: cannot create a directory there ({e.strerror or e}); choose a writable "
                          f"directory") from e
    try:
        for item in ckpt.iterdir():
            if item.name in (DS_DIR, storage.SUCCESS):  # optimizer state for exact resume: large, and useless for
                # inference; the commit marker belongs to the run dir's copy
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))
        (tmp / "README.md").write_text(model_card(meta, cfg_dict, info))
        storage.commit(str(tmp), str(out.resolve()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _tower(p: dict) -> str:
    method = p.get("method")
    if method == "full":
        return "fine-tuned in full (every weight in adapter/)"
    if method == "none":
        return "frozen, no adapter (linear probe)"
    if method == "lora":
        return (f"frozen, with a LoRA adapter (r={p.get('r')}, alpha={p.get('alpha')}, on "
                f"{', '.join(p.get('target_modules') or [])})")
    if method == "ln":
        return "frozen, with peft's LN tuning of the block LayerNorms"
    return f"frozen, with a `{method}` adapter (loft_dist's layout, docs/weights.md)"


def _method_summary(name) -> str:
    from loft_dist.algorithms import METHODS

    return METHODS[name].summary if name in METHODS else "a method this loft_dist does not know"


def model_card(meta: dict, cfg: dict, info: dict | None) -> str:
    m, p, a, t = meta["model"], meta["peft"], cfg.get("algorithm", {}), cfg.get("train", {})
    names = meta["class_names"]
    lab = (info or {}).get("counts", {}).get("labeled") or []
    rows, ood = (info or {}).get("rows", {}), (info or {}).get("ood_counts", {})
    h = meta["metrics"]
    from loft_dist.models.standin import describe_pretrained

    backbone = (f"pretrained weights `{describe_pretrained(m['pretrained'])}`" if m.get("pretrained")
                else f"random init, seed {m.get('init_seed')}: a demo model, not a useful classifier")
    lines = [
        f"# loft_dist model — {meta['run']['name']}, round {meta['round']}", "",
        f"An open_clip `{m['name']}` image tower ({backbone}), {_tower(p)},"
        + f" and a cosine classifier (scale {m.get('head_scale')}) over {len(names)} classes, trained by loft_dist "
        f"with `algorithm.name={a.get('name')}` — {_method_summary(a.get('name'))}.", "",
        "## Use", "",
        "```", "loft-dist predict EXPORT_DIR image1.jpg image2.png [--json]", "```", "",
        "```python",
        "from loft_dist.export import load_export",
        "model, meta = load_export('EXPORT_DIR')   # torch module in eval mode; meta = export.json",
        "```", "",
        f"Input: any image PIL can read, converted to RGB, resized to {meta['image_size']}×{meta['image_size']} "
        f"(bicubic) and normalised with CLIP's mean/std (the `{meta['view']}` view of loft_dist.data.transforms). "
        f"Output: softmax(test logits / {a.get('temperature', 1.0)}) over the classes below — the probabilities "
        "the round's evaluation scored (its accuracy and calibration below).", "",
    ]
    if m.get("pretrained"):
        lines += [f"The backbone weights are not in this directory: `{m['pretrained']}` must be in the open_clip "
                  "cache, or at that path, wherever the model is loaded.", ""]
    lines += ["## Data", ""]
    proto = (info or {}).get("protocol") or {}
    if proto:
        lines += ["| protocol | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in proto.items()), ""]
    if lab:
        lines.append(f"Labeled: {sum(lab)} images, {max(lab)} → {min(lab)} per class. Pool (unlabeled): "
                     f"{rows.get('unlabeled', '–')} images, of which OOD {ood.get('unlabeled', 0)}. Test: "
                     f"{rows.get('test', '–')} images; OOD test: {rows.get('ood_test', 0)}.")
    else:
        lines.append("dataset.json of the run was not available at export time.")
    shown = names if len(names) <= 50 else names[:50] + [f"… ({len(names) - 50} more in export.json)"]
    lines += ["", "Classes: " + ", ".join(f"`{n}`" for n in shown), "",
              "## Method", "",
              "| algorithm | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in a.items()), "",
              f"Training: {cfg.get('rounds', {}).get('num_rounds', '–')} rounds × {t.get('epochs_per_round', '–')} "
              f"epochs, SGD lr {t.get('lr')} (cosine), micro batch {t.get('micro_batch_size')} × "
              f"{t.get('num_workers')} Ray Train workers × accumulation {t.get('grad_accum')}, DeepSpeed ZeRO "
              f"stage {t.get('zero_stage')}, {t.get('precision')}, {'GPU' if t.get('use_gpu') else 'CPU'}. "
              "The full config is in the run dir's config.yaml.", "",
              f"## Metrics (round {meta['round']}, test split)", "",
              "| metric | value |", "|---|---|",
              *(f"| {k.replace('_', ' ')} | {v if k == 'test_images' else _pct(v)} |" for k, v in h.items()),
              "", "– = not measured, or an empty group (many / medium / few are defined by labeled count; "
              "head / mid / tail are frequency tertiles).", "",
              "## Provenance", "",
              f"Exported {meta['created']} from `{meta['run']['dir']}` round {meta['round']}.", "",
              "| package | version |", "|---|---|", *(f"| {k} | {v} |" for k, v in meta["versions"].items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
def read_export_meta(export_dir: str | Path) -> dict:
    """export.json of an export, checked to be one this loft_dist reads."""
    d = Path(export_dir)
    meta_path = d / EXPORT_FILE
    if not meta_path.is_file():
        raise WeightsError(f"{meta_path} not found: {d} is not a loft_dist export (make one with "
                                f"`loft-dist export RUN_DIR --out DIR`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')}; this loft_dist "
                         f"reads {FORMAT!r} up to v{FORMAT_VERSION}")
    return meta


def load_export(export_dir: str | Path, device: str = "cpu"):
    """(the method's model in eval mode on `device`, export.json dict); no Ray, no run dir."""
    from loft_dist.algorithms import load_model
    from loft_dist.config import from_dict

    meta = read_export_meta(export_dir)
    cfg = from_dict({k: meta[k] for k in ("model", "peft", "algorithm")})
    model = load_model(cfg, meta["class_names"], Path(export_dir)).to(device).eval()
    return model, meta


def predict(export_dir: str | Path, images: list[str], batch_size: int = 32, device: str = "cpu") -> list[dict]:
    """One dict per image, in order: {path, class, index, probability}, or {path, error} when it cannot be read."""
    import torch

    from loft_dist.algorithms import inference_logits
    from loft_dist.config import from_dict
    from loft_dist.data.transforms import build_view, decode_image

    model, meta = load_export(export_dir, device)
    acfg = from_dict({"algorithm": meta["algorithm"]}).algorithm
    view = build_view(meta["view"], meta["image_size"], hflip=False)
    names = meta["class_names"]
    results: list[dict] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        decoded, slots = [], []
        for path in chunk:
            try:
                decoded.append(decode_image(Path(path).read_bytes()))
                slots.append(len(results))
                results.append({"path": path})
            except Exception as e:  # noqa: BLE001 - a bad file is reported by reason; the others are still predicted
                results.append({"path": path, "error": f"{type(e).__name__}: {e}"[:200]})
        if not decoded:
            continue
        with torch.inference_mode():
            logits = inference_logits(acfg, model, torch.from_numpy(view.batch(decoded)).to(device), "test")
            probs = torch.softmax(logits.float() / acfg.temperature, dim=-1).cpu()  # as the scorer's eval mode
        conf, idx = probs.max(dim=-1)
        for slot, c, i in zip(slots, conf.tolist(), idx.tolist()):
            results[slot].update({"class": names[i], "index": i, "probability": c})
    return results
