"""SIGKILL one Ray Train worker after the round's first checkpoint: Ray Train (FailureConfig(max_failures=1))
restarts the worker group, the loop restores from the last reported checkpoint (`ray.train.get_checkpoint()`:
DeepSpeed state + epoch), and the round finishes with every epoch reported exactly once.

The round's training is driven through `fit_round`, the unit that owns the failure handling, on the labeled split
(the scoring phases around it are covered by the other fault tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faultlib import Watcher, fault_config, registered_epochs, session_actors, sigkill
from loft_dist.data.pseudo_labels import training_dataset
from loft_dist.data.store import read_dataset_info
from loft_dist.train.trainer import fit_round

pytestmark = pytest.mark.slow
EPOCHS = 3


def test_kill_one_train_worker_mid_round(tmp_path, prepared_root, ray_session):
    cfg = fault_config(tmp_path, prepared_root, "kill_worker", "rounds.num_rounds=1",
                       f"train.epochs_per_round={EPOCHS}", "train.max_failures=1", f"train.num_to_keep={EPOCHS + 2}")
    run_dir = Path(cfg.run_dir).resolve()
    info = read_dataset_info(prepared_root)
    classes, counts = info["class_names"], info["counts"]["labeled"]
    ds, _ = training_dataset(prepared_root, cfg, len(classes), None)
    storage = run_dir / "ray_train"
    trial = storage / "r1"
    earlier = {a["ActorID"] for a in session_actors("RayTrainWorker", state=None)}
    killed: dict = {}

    def kill_a_worker_after_the_first_checkpoint() -> bool:
        epochs = registered_epochs(trial)
        if not epochs:
            return False
        workers = [a for a in session_actors("RayTrainWorker") if a["ActorID"] not in earlier]
        if not workers:
            return False
        victim = workers[-1]
        killed.update(pid=victim["Pid"], actor_id=victim["ActorID"], epochs_before=epochs)
        sigkill(victim["Pid"])
        return True

    watcher = Watcher(kill_a_worker_after_the_first_checkpoint, interval=0.05)
    watcher.start()
    try:
        metrics = fit_round(cfg, ds, class_names=classes, prior=[c / sum(counts) for c in counts],
                            init_checkpoint=None, round_idx=1, storage_path=str(storage),
                            out_dir=str(run_dir / "rounds" / "r1" / "checkpoint"))
    finally:
        watcher.result()

    assert killed, "no training worker was seen after the first registered checkpoint"
    assert max(killed["epochs_before"]) < EPOCHS - 1, f"killed after the last epoch ({killed}): nothing was tested"
    workers = [a for a in session_actors("RayTrainWorker", state=None) if a["ActorID"] not in earlier]
    assert len(workers) > cfg.train.num_workers, "the worker group was not restarted after the kill"

    # Restored, not restarted from scratch: every epoch reported once, in order; the epochs reported after the
    # kill continue from the last checkpoint reported before it.
    reported = registered_epochs(trial)
    assert reported == list(range(EPOCHS)), f"epochs reported (in order): {reported}; killed after {killed}"

    assert metrics["epoch"] == EPOCHS - 1
    final = run_dir / "rounds" / "r1" / "checkpoint"
    assert json.loads((final / "train_state.json").read_text())["epoch"] == EPOCHS - 1
    assert (final / "adapter" / "adapter_model.safetensors").stat().st_size > 0
