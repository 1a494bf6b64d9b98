"""SIGKILL one scoring actor while `run(cfg)` scores the pool: Ray Data restarts the actor and retries its batches
(max_restarts = max_task_retries = -1), and the round's pseudo-label table still holds exactly one row per
pool image — none lost, none written twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultlib import Watcher, completed, fault_config, session_actors, sigkill, split_ids, table_ids
from loft_dist.rounds import run

pytestmark = pytest.mark.slow


def test_kill_one_scoring_actor_mid_round(tmp_path, prepared_root, ray_session):
    cfg = fault_config(tmp_path, prepared_root, "kill_scorer", "rounds.num_rounds=0", "scoring.batch_size=16")
    run_dir = Path(cfg.run_dir).resolve()
    chunk = run_dir / "rounds" / "r0" / ".pseudo_labels.work" / "chunk-00000"
    earlier = {a["ActorID"] for a in session_actors("MapWorker", state=None)}
    killed: dict = {}

    def kill_the_first_scorer() -> bool:
        if "r0.score" in completed(run_dir):
            return True  # the phase ended before a scorer was seen: `killed` stays empty and the test fails
        scorers = [a for a in session_actors("MapWorker") if a["ActorID"] not in earlier]
        if not scorers:
            return False
        a = scorers[0]
        killed.update(actor_id=a["ActorID"], pid=a["Pid"], chunk_committed=(chunk / "_SUCCESS").is_file())
        sigkill(a["Pid"])
        return True

    watcher = Watcher(kill_the_first_scorer, interval=0.05)
    watcher.start()
    try:
        run(cfg)
    finally:
        watcher.result()

    assert killed, "no scoring actor was seen while round 0 scored the pool"
    assert not killed["chunk_committed"], "the actor was killed after its work was committed: nothing was tested"
    actor = ray_session._private.state.actors()[killed["actor_id"]]
    assert actor["NumRestarts"] >= 1 or actor["Pid"] != killed["pid"], f"the killed actor was not replaced: {actor}"

    pool = split_ids(prepared_root, "unlabeled")
    table = run_dir / "rounds" / "r0" / "pseudo_labels"
    ids = table_ids(table)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} pool ids were written twice"
    assert sorted(ids) == pool, f"missing ids: {sorted(set(pool) - set(ids))[:10]}"
    assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
    assert completed(run_dir) == ["prepare", "r0.score", "r0.eval"]
    assert (run_dir / "report" / "report.md").is_file()
