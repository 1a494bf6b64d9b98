"""`loft-dist` commands. Each takes a YAML config plus key=value overrides and validates it before Ray starts."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loft-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="`run` of the defaults from the CLIP stand-in (offline, minutes on 2 cores)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds.num_rounds=1")
    for name, help_ in (("prepare", "build the sharded Parquet dataset of a config"),
                        ("run", "run or resume all rounds of a config"),
                        ("score", "pseudo-label a pool (scoring.input → scoring.output) with scoring.checkpoint; "
                                  "resumable")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
        c.add_argument("overrides", nargs="*", help="key=value overrides")
    rep = sub.add_parser("report", help="(re)write report/ of a run dir")
    rep.add_argument("run_dir")
    exp = sub.add_parser("export", help="copy one round's model (adapter + head) with export.json and a model card")
    exp.add_argument("run_dir")
    exp.add_argument("--round", type=int, default=None, help="round to export (default: the last completed)")
    exp.add_argument("--out", required=True, help="export directory (new, empty, or an earlier export)")
    pred = sub.add_parser("predict", help="classify image files with an export (no Ray, no run dir)")
    pred.add_argument("export_dir")
    pred.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    pred.add_argument("--json", action="store_true", help="one JSON object per line instead of tab-separated text")
    pred.add_argument("--batch-size", type=int, default=32)
    pred.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    ev = sub.add_parser("evaluate", help="score a prepared split with any checkpoint or export: metrics.json and "
                                         "figures in --out")
    ev.add_argument("model", help="an export dir, or a run's checkpoint dir (RUN/rounds/rK/checkpoint)")
    ev.add_argument("dataset", help="a prepared dataset dir (dataset.json), local or a URI")
    ev.add_argument("--out", required=True, help="where predictions/, metrics.json and the figures go")
    ev.add_argument("rest", nargs="*", metavar="[SPLIT] [key=value ...]",
                    help="the split: test (default; with ood_test when the dataset has one), labeled, unlabeled or "
                         "ood_test; then overrides of where it runs, e.g. scoring.max_actors=4")
    gal = sub.add_parser("gallery", help="an HTML page (self-contained, offline) of a pseudo-label table's images per "
                                         "class: most confident, nearest c_hard / c_ood, wrong, rejected")
    gal.add_argument("table_dir", help="a pseudo-label table: scoring.output of `loft-dist score`, or a run's "
                                       "rounds/r<k>/pseudo_labels")
    gal.add_argument("--data", required=True, help="its images: the prepared dataset (its unlabeled split) or the "
                                                   "dir of Parquet image shards the table was scored from")
    gal.add_argument("--out", required=True, help="the HTML file to write")
    gal.add_argument("--class-names", default=None, help="text file of the scorer's class names, one per line in its "
                                                         "order (default: --data's dataset.json, else class 0, 1, …)")
    gal.add_argument("--c-hard", type=float, default=None, help="the algorithm.c_hard the table was scored with "
                                                               "(default: the config default)")
    gal.add_argument("--c-ood", type=float, default=None, help="the algorithm.c_ood the table was scored with "
                                                              "(default: the config default)")
    _standin_parser(sub)
    cmp_ = sub.add_parser("compare", help="side-by-side table and bar plot of the final rounds of several runs")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", required=True, help="directory for compare.md, compare.json, compare.png")
    return p


def _standin_parser(sub) -> None:
    st = sub.add_parser("standin", help="build the CLIP stand-in (NOT CLIP: a tiny open_clip model trained here on a "
                                        "reserved part of the digits with noisy captions); model.pretrained=standin",
                        description="Build the CLIP stand-in. It is NOT CLIP: a tiny open_clip model (loft-tiny-vit) "
                                    "trained here with open_clip's ClipLoss on 150 digits the embedded dataset holds "
                                    "back from every split and 150 generated OOD images, with captions wrong on "
                                    "purpose (docs/standin.md). model.pretrained=standin names the default build.")
    st.add_argument("--out", default=None, help="the .safetensors to write (default: the cache file that "
                                                "model.pretrained=standin names)")
    st.add_argument("--seed", type=int, default=None, help="builder seed (default 0)")
    st.add_argument("--steps", type=int, default=None, help="training steps (default: the tuned setting)")
    st.add_argument("--wrong-caption-share", type=float, default=None,
                    help="share of digits whose captions name a random wrong class (default: the tuned setting)")


def build_standin_file(settings, out) -> dict:
    """The stand-in trained on the embedded dataset's reserved digits (decoded and resized as the clean view gives
    every evaluated image) and generated OOD images of another seed than any demo split, written to `out`; its
    state dict."""
    import numpy as np
    import torch

    from loft_dist.data.embedded import OOD_KINDS, ood_source, reserved_digits
    from loft_dist.data.transforms import clean_pixels
    from loft_dist.models.standin import save_standin, train_standin

    src = reserved_digits()
    ood = ood_source(settings.ood_images, settings.ood_seed, size=src.images.shape[1])  # the digits' native side

    def pixels(s):
        return torch.from_numpy(clean_pixels(s, settings.image_size))

    state = train_standin(pixels(src), src.labels, src.class_names, settings, pixels(ood),
                          np.array([ood.kind(i) for i in range(len(ood))]), OOD_KINDS)
    save_standin(state, out, settings)
    return state


def _standin(args) -> int:
    import dataclasses
    import time

    from loft_dist.models.standin import NOTICE, StandinSettings, standin_path

    given = {"seed": args.seed, "steps": args.steps, "wrong_caption_share": args.wrong_caption_share}
    settings = dataclasses.replace(StandinSettings(), **{k: v for k, v in given.items() if v is not None})
    out = args.out or str(standin_path(settings))
    t0 = time.time()
    build_standin_file(settings, out)
    use = "model.pretrained=standin" if out == str(standin_path()) else f"model.pretrained={out}"
    print(f"done: {out} in {time.time() - t0:.1f} s ({NOTICE}); use it with {use}")
    return 0


def _ensure_standin(cfg) -> None:
    """model.pretrained=standin: build the cached stand-in here, once, before any actor or worker loads it."""
    from loft_dist.models.standin import STANDIN, StandinSettings, standin_path

    wanted = cfg.model.pretrained == STANDIN and cfg.model.name == StandinSettings().model_name  # else preflight says
    if wanted and not standin_path().is_file():
        logging.getLogger(__name__).info("building the CLIP stand-in (not CLIP) into %s", standin_path())
        build_standin_file(StandinSettings(), standin_path())


def _report(args) -> int:
    from loft_dist.eval.report import write_report

    write_report(args.run_dir)
    print(os.path.join(args.run_dir, "report", "report.md"))
    return 0


def _export(args) -> int:
    from loft_dist.export import export_round

    print(export_round(args.run_dir, args.out, args.round))
    return 0


def _predict(args) -> int:
    import json

    from loft_dist.export import predict

    logging.getLogger().setLevel(logging.WARNING)  # stdout is the result; keep stderr to what needs reading
    results = predict(args.export_dir, args.images, args.batch_size, args.device)
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"loft-dist: cannot read {r['path']}: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}\t{r['class']}\t{r['probability']:.6f}")
    return 1 if any("error" in r for r in results) else 0


def _evaluate(args) -> int:
    from loft_dist.errors import ConfigError
    from loft_dist.evaluate import evaluate_model

    split = args.rest[0] if args.rest and "=" not in args.rest[0] else "test"
    overrides = args.rest[1:] if args.rest and "=" not in args.rest[0] else args.rest
    if any("=" not in a for a in overrides):
        raise ConfigError(f"evaluate takes one split, then key=value overrides; got {' '.join(args.rest)}")
    m = evaluate_model(args.model, args.dataset, split, args.out, overrides)
    t = m[split]
    unread = f" ({m['unreadable_rows']} rows could not be read)" if m["unreadable_rows"] else ""
    print(f"done: {split} accuracy {100 * (t['accuracy'] or 0):.1f}%, balanced {100 * (t['balanced_accuracy'] or 0):.1f}% "
          f"on {t['n']} images{unread} — {os.path.join(args.out, 'metrics.json')}")
    return 0


def _gallery(args) -> int:
    from loft_dist.config import AlgorithmConfig
    from loft_dist.eval.gallery import class_names_for, write_gallery

    a = AlgorithmConfig()
    g = write_gallery(args.table_dir, args.data, class_names_for(args.table_dir, args.data, args.class_names),
                      a.c_hard if args.c_hard is None else args.c_hard, a.c_ood if args.c_ood is None else args.c_ood,
                      args.out)
    missing = f", {g['missing']} not found in {args.data}" if g["missing"] else ""
    print(f"done: {g['images']} images of {g['rows']} rows{missing} — {args.out} ({g['bytes'] / 1e6:.1f} MB)")
    return 0


def _compare(args) -> int:
    from loft_dist.eval.compare import compare_runs

    compare_runs(args.run_dirs, args.out)
    print(os.path.join(args.out, "compare.md"))
    return 0


def _prepare(cfg) -> int:
    from loft_dist.data.prepare import prepare_dataset
    from loft_dist.runtime import init_ray

    prepare_dataset(cfg, force=True, start_ray=lambda: init_ray(cfg.run))
    return 0


def _score(cfg) -> int:
    from loft_dist.data.pseudo_labels import read_columns
    from loft_dist.data.quarantine import error_kinds
    from loft_dist.scoring.job import run_score_job

    rows = run_score_job(cfg)
    bad = error_kinds(read_columns(cfg.scoring.output, ["error"])["error"])
    unread = f"; {_unread(bad)} and are marked rejected with their reason in the `error` column" if bad else ""
    print(f"done: {rows} rows in {cfg.scoring.output}{unread}")
    return 0


def _unread(kinds: dict[str, int]) -> str:
    """How many rows could not be read, by error kind: the tail of every command's summary line."""
    return f"{sum(kinds.values())} could not be read ({', '.join(f'{k}: {n}' for k, n in kinds.items())})"


def _run(cfg) -> int:
    from loft_dist.data.quarantine import quarantined_kinds
    from loft_dist.rounds import run

    final = run(cfg)
    acc = final["final"]["test"]["accuracy"]
    bad = quarantined_kinds(cfg.run_dir)
    unread = f" — {_unread(bad)} and are quarantined in {cfg.run_dir}/quarantine/" if bad else ""
    print(f"done: {cfg.run_dir} — final test accuracy {100 * acc:.1f}%{unread} — report {cfg.run_dir}/report/report.md")
    return 0


RUN_DIR_COMMANDS = {"report": _report, "export": _export, "predict": _predict, "compare": _compare,
                    "evaluate": _evaluate, "gallery": _gallery, "standin": _standin}
CONFIG_COMMANDS = {"prepare": _prepare, "score": _score, "run": _run, "demo": _run}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # argparse cannot take positionals after an option (`evaluate M D --out X key=value`): the rest are evaluate's
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "evaluate":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.rest = args.rest + extra
    # Process-wide settings, made once here rather than as side effects of library calls. Offline machines: fail
    # at once on hub look-ups instead of retrying for ~46 s (read when huggingface_hub is first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _setup_logging()
    from loft_dist.config import load_config
    from loft_dist.errors import LoftError

    try:
        if args.command in RUN_DIR_COMMANDS:
            return RUN_DIR_COMMANDS[args.command](args)
        # The demo starts from the stand-in (docs/standin.md), whose zero-shot skill is real, not from random weights
        demo = ["model.pretrained=standin"] if args.command == "demo" else []
        cfg = load_config(getattr(args, "config", None), demo + args.overrides)
        if cfg.run.s3_endpoint:  # read by pyarrow, boto3 and Ray's S3 client alike; init_ray forwards it to workers
            os.environ["AWS_ENDPOINT_URL_S3"] = cfg.run.s3_endpoint
        if args.command != "prepare":
            _ensure_standin(cfg)
        return CONFIG_COMMANDS[args.command](cfg)
    except LoftError as e:  # the user can fix it: one line; anything else is a bug and keeps its traceback
        print(f"loft-dist: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
