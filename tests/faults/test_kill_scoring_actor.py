"""SIGKILL the scoring actor while it holds a batch, as `run(cfg)` scores the pool: Ray Data restarts the actor and
retries the batch (max_restarts = max_task_retries = -1), and the round's pseudo-label table still holds exactly
one row per pool image — the killed batch's rows included, none lost, none written twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from faultlib import (Watcher, completed, fault_config, session_actors, sigkill, split_ids, table_ids,
                      traced_scorer)
from loft_dist.rounds import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_kill_one_scoring_actor_mid_round(tmp_path, prepared_root, ray_session):
    cfg = fault_config(tmp_path, prepared_root, "kill_scorer", "rounds.num_rounds=0", "scoring.batch_size=16")
    run_dir = Path(cfg.run_dir).resolve()
    chunk = run_dir / "rounds" / "r0" / ".pseudo_labels.work" / "chunk-00000"
    earlier = {a["ActorID"] for a in session_actors("MapWorker", state=None)}
    killed: dict = {}
    pool = split_ids(prepared_root, "unlabeled")
    in_pool = set(pool)  # round 0's job scores the test split too (the same model): its batches are not the pool's

    with traced_scorer(tmp_path / "trace", hold=True) as trace:
        def kill_the_scorer_holding_a_batch() -> bool:
            if "r0.score" in completed(run_dir):
                return True  # the phase ended before a batch was held: `killed` stays empty and the test fails
            held = [b for b in trace.batches() if in_pool.intersection(b["ids"]) and b["done_at"] is None]
            if not held:
                return False
            b = held[0]  # waits in the scorer until trace.release(): it cannot finish before the kill
            actor = [a for a in session_actors("MapWorker") if a["Pid"] == b["pid"] and a["ActorID"] not in earlier]
            assert actor, f"pid {b['pid']} held a batch but is not a live scoring actor of this run"
            killed.update(actor_id=actor[0]["ActorID"], pid=b["pid"], n=b["n"], ids=b["ids"],
                          chunk_committed=(chunk / "_SUCCESS").is_file())
            sigkill(b["pid"])
            killed["at"] = time.time()
            trace.release()
            return True

        watcher = Watcher(kill_the_scorer_holding_a_batch, interval=0.05)
        watcher.start()
        try:
            run(cfg)
        finally:
            watcher.result()
        batches = [b for b in trace.batches() if b["modes"] == ["zero_shot"]]

    assert killed, "no scoring actor was seen holding a batch while round 0 scored the pool"
    assert not killed["chunk_committed"], "the actor was killed after its work was committed: nothing was tested"
    held = [b for b in batches if (b["pid"], b["n"]) == (killed["pid"], killed["n"])]
    assert len(held) == 1 and held[0]["done_at"] is None, f"the killed batch finished after all: {held}"
    # The retry: after the kill, the actor came back in a new process, which scored the killed batch — the same
    # rows — to the end.
    actor = ray_session._private.state.actors()[killed["actor_id"]]
    assert actor["NumRestarts"] >= 1 and actor["Pid"] != killed["pid"], f"the killed actor was not replaced: {actor}"
    again = [(b["pid"], b["n"]) for b in batches if b["ids"] == killed["ids"] and b["started_at"] > killed["at"]
             and b["done_at"] is not None]
    assert again, f"the killed batch ({len(killed['ids'])} ids from {killed['ids'][0]}) was never scored again"
    assert {pid for pid, _ in again} == {actor["Pid"]}, f"retried by {again}, not by the restarted actor {actor}"

    table = run_dir / "rounds" / "r0" / "pseudo_labels"
    ids = table_ids(table)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} pool ids were written twice"
    assert sorted(ids) == pool, f"missing ids: {sorted(set(pool) - set(ids))[:10]}"
    assert all(ids.count(i) == 1 for i in in_pool.intersection(killed["ids"])), \
        "the killed batch's pool rows are not in the table exactly once"
    assert json.loads((table / "_SUCCESS").read_text())["rows"] == len(pool)
    assert completed(run_dir) == ["prepare", "r0.score", "r0.eval"]
    assert (run_dir / "report" / "report.md").is_file()
