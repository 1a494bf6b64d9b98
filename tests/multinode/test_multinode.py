"""Multi-node, proven on one machine: placement through config, shared storage, and losing a node mid-round.

Every run is `loft-dist run configs/tiny.yaml` joined to the 4-node local cluster of conftest.py (the session's
`ray start` head and three role nodes of this module's own); where workers and actors ran comes from two independent
records: the node ids the train loop writes into its metrics (`worker_nodes`, by rank) and Ray's state API (which
node each actor lived on, and how often it restarted).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from multinode_lib import FRACTIONS, PLACEMENT, TINY_ROUND, Driver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TRAIN_WORKER = "RayTrainWorker"
SCORER = "MapBatches(Scorer)"  # Ray Data names the pool's actors MapWorker(MapBatches(Scorer))


def ids(paths) -> list[int]:
    return pq.read_table(sorted(str(p) for p in paths), columns=["id"]).column("id").to_pylist()


def pool_ids(data_root: Path) -> list[int]:
    return sorted(ids(data_root.glob("unlabeled/*.parquet")))


def assert_one_row_per_pool_image(table: Path, pool: list[int]) -> None:
    assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
    got = ids(table.glob("*.parquet"))
    assert len(got) == len(pool) and sorted(got) == pool, f"{table}: ids lost or duplicated"


def wait_for(condition, driver: Driver, what: str, timeout: float = 600, every: float = 0.5):
    """Poll `condition` until it returns something truthy, while the driver runs."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = condition()
        if value:
            return value
        if not driver.running():
            pytest.fail(f"the run ended before {what}; log tail:\n{driver.tail()}")
        time.sleep(every)
    pytest.fail(f"no {what} after {timeout:.0f} s; log tail:\n{driver.tail()}")


def registered_checkpoints(snapshot: Path) -> list[dict]:
    """Metrics of the checkpoints Ray Train has registered (all ranks reported), in report order."""
    try:
        return [r["metrics"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []  # not written yet, or caught mid-write


@pytest.fixture(scope="module")
def tiny_run(cluster, tmp_path_factory):
    """The tiny config, one round, on the cluster: placement overrides, and ZeRO 1 so that each rank writes an
    optimizer shard of its own (stage 0, the default, keeps one replicated copy on rank 0). Its run dir seeds
    the fault tests."""
    storage = tmp_path_factory.mktemp("multinode")
    before = {a.actor_id for a in cluster.actors("")}
    d = Driver(cluster, storage, "placement", TINY_ROUND + PLACEMENT + FRACTIONS + ["train.zero_stage=1"])
    try:
        seconds = d.wait()
    finally:
        d.stop()
    new = [a for a in cluster.actors("") if a.actor_id not in before]
    return SimpleNamespace(run_dir=d.run_dir, seconds=seconds,
                           train_actors=[a for a in new if a.class_name == TRAIN_WORKER],
                           scoring_actors=[a for a in new if SCORER in a.class_name])


def test_train_workers_spread_over_trainer_nodes_and_scoring_stays_on_scorer_nodes(cluster, tiny_run):
    run_dir = tiny_run.run_dir
    assert json.loads((run_dir / "state.json").read_text())["completed"] == [
        "prepare", "r0.score", "r0.eval", "r1.score", "r1.train", "r1.eval"]

    # Train: one worker per trainer node (SPREAD + {trainer: 0.5}), recorded by the loop and by Ray alike.
    ckpt = run_dir / "rounds" / "r1" / "checkpoint"
    state = json.loads((ckpt / "train_state.json").read_text())
    nodes = state["worker_nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"both ranks on one node: {nodes}"
    assert [cluster.role_of(n) for n in nodes] == ["trainer", "trainer"]
    assert json.loads((run_dir / "rounds" / "r1" / "train_metrics.json").read_text())["worker_nodes"] == nodes
    assert {a.node_id for a in tiny_run.train_actors} == set(nodes)

    # Scoring (pool rounds 0 and 1, evaluations): every actor on the scorer node.
    assert tiny_run.scoring_actors, "no scoring actor seen"
    assert {cluster.role_of(a.node_id) for a in tiny_run.scoring_actors} == {"scorer"}

    # Storage every node reads and writes: each rank's optimizer shard (written on two trainer nodes) is in the
    # round's checkpoint, which the scorer node then loaded to evaluate; the pool tables are complete.
    shards = sorted(p.name for p in (ckpt / "deepspeed").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 0 and (ckpt / "head.safetensors").is_file()
    assert state["epoch"] == 1
    pool = pool_ids(run_dir / "data")
    for r in (0, 1):
        assert_one_row_per_pool_image(run_dir / "rounds" / f"r{r}" / "pseudo_labels", pool)
        m = json.loads((run_dir / "rounds" / f"r{r}" / "metrics.json").read_text())
        assert 0.0 <= m["test"]["accuracy"] <= 1.0
    assert (run_dir / "report" / "report.md").is_file()


def test_losing_a_trainer_node_mid_round_resumes_from_the_last_checkpoint(cluster, tiny_run, driver, tmp_path):
    # Round 1 of the placement run up to its scored pool (the round-1 pool table comes from the initial model and
    # does not depend on train.*); this copy trains the round with 3 epochs so that the node loss lands mid-round.
    run_dir = tmp_path / "trainer_loss"
    shutil.copytree(tiny_run.run_dir, run_dir, ignore=shutil.ignore_patterns("ray_train", "report"))
    r1 = run_dir / "rounds" / "r1"
    for name in ("checkpoint", "predictions"):
        shutil.rmtree(r1 / name, ignore_errors=True)
    for name in ("train_metrics.json", "metrics.json"):
        (r1 / name).unlink(missing_ok=True)
    (run_dir / "config.yaml").unlink()
    (run_dir / "state.json").write_text(json.dumps({"completed": ["prepare", "r0.score", "r0.eval", "r1.score"]}))

    epochs = 3
    d = driver(tmp_path, "trainer_loss", TINY_ROUND + PLACEMENT + FRACTIONS + [
        f"train.epochs_per_round={epochs}", "train.checkpoint_every=1", "train.max_failures=1", "train.num_to_keep=10"])
    snapshot = run_dir / "ray_train" / "r1" / "checkpoint_manager_snapshot.json"
    first = wait_for(lambda: registered_checkpoints(snapshot), d, "a registered checkpoint of round 1")
    assert first[0]["epoch"] == 0
    victim = first[0]["worker_nodes"][1]  # rank 1's node
    assert cluster.role_of(victim) == "trainer"
    cluster.remove(victim)
    cluster.add("trainer")  # the replacement a cloud autoscaler would bring up
    d.wait()

    assert "[FailurePolicy] RETRY" in d.log.read_text(errors="replace"), "Ray Train did not retry the worker group"
    results = registered_checkpoints(snapshot)
    # Each epoch reported once: the restarted worker group resumed after the last checkpoint, not from epoch 0.
    assert [m["epoch"] for m in results] == list(range(epochs)), results
    assert victim in results[0]["worker_nodes"]
    after = results[-1]["worker_nodes"]
    assert victim not in after, f"node {victim} was removed after epoch 0, yet the last epoch ran on it"
    assert {cluster.role_of(n) for n in after} == {"trainer"} and not set(after) & cluster.removed
    assert json.loads((r1 / "checkpoint" / "train_state.json").read_text())["epoch"] == epochs - 1
    assert "r1.eval" in d.completed() and (r1 / "metrics.json").is_file()


# The scorer-loss run's own pool: the tiny pool plus enough generated OOD images that scoring it takes tens of
# seconds, so that the node is removed while the pool is being scored (the tiny pool alone is scored in ~1 s,
# faster than the state API can report the actor's node on a busy machine).
BIG_POOL = ["data.ood_count=6000", "data.ood_test=0"]


def test_losing_the_scorer_node_mid_round_keeps_one_row_per_pool_image(cluster, driver, tmp_path):
    cluster.add("scorer")  # a second scorer-capable node, so that the pool can go on
    known = {a.actor_id for a in cluster.actors(SCORER)}
    d = driver(tmp_path, "scorer_loss", ["rounds.num_rounds=0", *BIG_POOL, *PLACEMENT, *FRACTIONS])
    table = d.run_dir / "rounds" / "r0" / "pseudo_labels"

    def scoring_actor_placed():  # round 0's pool actor, once it has a node (starting up or scoring)
        if "r0.score" in d.completed():
            pytest.fail("round 0's pool was scored before the scorer node could be removed")
        return next((a for a in cluster.actors(SCORER) if a.actor_id not in known and a.node_id
                     and a.state in ("PENDING_CREATION", "ALIVE")), None)

    actor = wait_for(scoring_actor_placed, d, "a scoring actor of round 0", every=0.2)
    lost = actor.node_id
    assert cluster.role_of(lost) == "scorer"
    cluster.remove(lost)
    assert not (table / "_SUCCESS").exists(), "the pool table was committed before the node loss: nothing tested"
    d.wait()

    run_dir = d.run_dir
    assert_one_row_per_pool_image(table, pool_ids(run_dir / "data"))
    assert json.loads((run_dir / "rounds" / "r0" / "metrics.json").read_text())["test"]["n"] > 0
    # The same actor was restarted on the other scorer node; nothing of this run's scoring left the scorer nodes.
    final = next(a for a in cluster.actors(SCORER) if a.actor_id == actor.actor_id)
    assert final.num_restarts >= 1 and final.node_id != lost, final
    ran_on = {a.node_id for a in cluster.actors(SCORER) if a.actor_id not in known}
    assert {cluster.role_of(n) for n in ran_on} == {"scorer"} and ran_on - {lost}
