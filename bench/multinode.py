"""Round time of the tiny run on 1 Ray node vs 3 simulated nodes on this machine (what multi-node costs).

Both runs use the same config (placement by custom resources, fractional CPUs) and the same logical resources
(3 CPUs, 600 MB of object store): the 1-node cluster is one raylet holding {trainer: 2, scorer: 1}; the 3-node
cluster is a head with {scorer: 1} plus two {trainer: 1} nodes, all on the same cores. So the difference is
overhead (more raylets and object stores, gloo and object transfers between nodes), never a speed-up. Each
run is a `loft-dist run` driver joined to a `ray.cluster_utils.Cluster`, as in tests/multinode.

    python bench/multinode.py                 # prints one line; appends a section to BENCHMARKS.md
    python bench/multinode.py --no-record --epochs 1
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "multinode"))

from common import append_section  # noqa: E402
from multinode_lib import FRACTIONS, PLACEMENT, WORKER_ENV, Driver, LocalCluster  # noqa: E402

PHASE = re.compile(r"phase (\S+) done in ([\d.]+) s")
TOPOLOGIES = {  # name → LocalCluster arguments
    "1 node": dict(trainers=0, scorers=0, head_cpus=3, head_resources={"trainer": 2, "scorer": 1}),
    "3 nodes": dict(trainers=2, scorers=0, head_cpus=1, head_resources={"scorer": 1}),
}


def one_run(topology: str, storage: Path, data_root: Path, epochs: int) -> dict:
    t0 = time.time()
    cluster = LocalCluster(cpus_per_node=1, object_store_mb=200, env=WORKER_ENV, **TOPOLOGIES[topology])
    start_s = time.time() - t0
    try:
        load = os.getloadavg()[0]
        d = Driver(cluster, storage, topology.replace(" ", "_"), [
            "rounds.num_rounds=1", f"train.epochs_per_round={epochs}", "data.ood_test=0", f"data.root={data_root}",
            *PLACEMENT, *FRACTIONS])
        wall = d.wait()
        phases = {name: float(s) for name, s in PHASE.findall(d.log.read_text())}
    finally:
        cluster.shutdown()
    return {"topology": topology, "start_s": start_s, "wall_s": wall, "phases": phases,
            "round_s": sum(phases.get(f"r1.{p}", 0.0) for p in ("score", "train", "eval")),
            "load": (load + os.getloadavg()[0]) / 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="train.epochs_per_round")
    p.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_multinode_") as tmp:
        storage = Path(tmp)
        results = [one_run(t, storage, storage / "data", args.epochs) for t in TOPOLOGIES]  # 1st run prepares data
    one, three = results
    line = (f"multinode: round 1 (score+train+eval, {args.epochs} epochs) {one['round_s']:.1f} s on 1 node vs "
            f"{three['round_s']:.1f} s on 3 nodes ({100 * (three['round_s'] / one['round_s'] - 1):+.0f} %); "
            f"train {one['phases'].get('r1.train', 0):.1f} vs {three['phases'].get('r1.train', 0):.1f} s; "
            f"cluster start {one['start_s']:.1f} vs {three['start_s']:.1f} s; "
            f"load avg {one['load']:.1f} / {three['load']:.1f}")
    print(line)
    if args.no_record:
        return
    names = ["r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]
    rows = [f"| {r['topology']} | {r['start_s']:.1f} | " + " | ".join(f"{r['phases'].get(n, float('nan')):.1f}" for n in names)
            + f" | **{r['round_s']:.1f}** | {r['wall_s']:.1f} | {r['load']:.1f} |" for r in results]
    body = "\n".join([
        "Tiny config, 1 round (`rounds.num_rounds=1 train.epochs_per_round=%d data.ood_test=0`), placement by custom "
        "resources (`train.placement_strategy=SPREAD train.custom_resources={trainer: 0.5} "
        "scoring.custom_resources={scorer: 0.5}`), fractional CPUs. Same 3 logical CPUs and 600 MB of object store "
        "in both: 1 raylet, or head {scorer} + 2 x {trainer}, all on the same cores. Seconds per phase "
        "(`phase … done in` of the driver log); round = r1.score + r1.train + r1.eval; wall includes driver "
        "start-up and `prepare` (first run only). Load avg = the machine's 1-min load during the run (the machine "
        "is shared; timings under load are not comparable across entries)." % args.epochs,
        "",
        "| topology | cluster start | " + " | ".join(names) + " | round | wall | load avg |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|---:|",
        *rows,
        "",
        line,
    ])
    append_section("Multi-node: 1 node vs 3 simulated nodes", f"python bench/multinode.py --epochs {args.epochs}", body)


if __name__ == "__main__":
    main()
