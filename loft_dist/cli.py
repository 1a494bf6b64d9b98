"""`loft-dist` commands. Each takes a YAML config plus key=value overrides and validates it before Ray starts."""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Offline machines: fail at once on hub look-ups instead of retrying (must be set before huggingface_hub loads).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loft-dist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded tiny run (offline, minutes on 2 CPU cores)")
    demo.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds.num_rounds=1")
    for name, help_ in (("prepare", "build the sharded Parquet dataset of a config"),
                        ("run", "run or resume all rounds of a config")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
        c.add_argument("overrides", nargs="*", help="key=value overrides")
    rep = sub.add_parser("report", help="(re)write report/ of a run dir")
    rep.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    from loft_dist.config import ConfigError, load_config

    try:
        if args.command == "report":
            from loft_dist.eval.report import write_report

            write_report(args.run_dir)
            print(os.path.join(args.run_dir, "report", "report.md"))
            return 0
        cfg = load_config(getattr(args, "config", None), args.overrides)
        if args.command == "prepare":
            from loft_dist.data.prepare import prepare_dataset

            prepare_dataset(cfg, force=True)
            return 0
        from loft_dist.rounds import run

        final = run(cfg)
        acc = final["final"]["test"]["accuracy"]
        print(f"done: {cfg.run_dir} — final test accuracy {100 * acc:.1f}% — report {cfg.run_dir}/report/report.md")
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"loft-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
