"""The checkpoints Ray Train registered for a round, and the check that a resumed round restored the one it came from
(used by the fault tests)."""

from __future__ import annotations

import json
from pathlib import Path


def _registered(trial: Path) -> list[dict]:
    """Ray Train's checkpoint manager snapshot of a round's trial dir: its registered checkpoints, in report order.

    Only these count: a checkpoint dir is written to storage by each rank as it reports, and registered once every
    rank has; a worker killed in between leaves an unregistered dir behind, which a restore never uses.
    """
    try:
        snapshot = json.loads((trial / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return []
    return snapshot["checkpoint_results"]


def registered_epochs(trial: Path) -> list[int]:
    """Epochs of the checkpoints Ray Train registered, in report order."""
    return [r["metrics"]["epoch"] for r in _registered(trial)]


def registered_checkpoints(trial: Path) -> dict[int, Path]:
    """Epoch → directory of each checkpoint Ray Train registered."""
    return {r["metrics"]["epoch"]: trial / r["checkpoint_dir_name"] for r in _registered(trial)}


def check_restores(trial: Path) -> list[int]:
    """Check every resume of a round's training against the checkpoint it came from; returns the epochs restored.

    The train loop records, in the first checkpoint after a resume, what it holds right after loading: a digest of
    each trainable tensor and each optimizer-state tensor, the optimizer's lr and the epoch. Here they are compared
    with the checkpoint of that epoch as written on disk (DeepSpeed's rank-0 model-states file at ZeRO 0: the
    trainable module tensors and the replicated optimizer state), so a resume that skipped or botched the load —
    weights back at their init, momentum empty — is caught, whatever epochs follow it.
    """
    import torch

    from loft_dist.train.loop import flat_tensors, tensor_digests

    ckpts = registered_checkpoints(trial)
    restored = []
    for epoch, ckpt in sorted(ckpts.items()):
        record = json.loads((ckpt / "train_state.json").read_text()).get("restored")
        if record is None:
            continue
        source = ckpts[record["epoch"]]
        assert record["epoch"] < epoch, f"checkpoint of epoch {epoch} says it resumed from epoch {record['epoch']}"
        saved = torch.load(source / "deepspeed" / "state" / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)
        on_disk = tensor_digests(saved["module"])
        assert record["params"], "the resume record lists no trainable tensor"
        trained = {n for n in on_disk if "lora_" in n or n.startswith("head.")}
        assert trained <= set(record["params"]), f"not restored: {sorted(trained - set(record['params']))[:5]}"
        diff = [n for n, d in record["params"].items() if on_disk.get(n) != d]
        assert not diff, f"{len(diff)} trainable tensors differ from the checkpoint of epoch {record['epoch']} " \
                         f"right after the resume, e.g. {diff[:3]}"
        assert saved["optimizer"]["state"], "the checkpoint holds no optimizer state (this check reads ZeRO 0's)"
        momentum = tensor_digests(flat_tensors(saved["optimizer"]))
        assert any(k.endswith("momentum_buffer") for k in momentum)
        assert record["optimizer_state"] == momentum, "optimizer state after the resume differs from the checkpoint's"
        assert record["lr"] == [g["lr"] for g in saved["optimizer"]["param_groups"]]
        assert record["lr"][0] == json.loads((source / "train_state.json").read_text())["lr"]
        restored.append(record["epoch"])
    return restored
