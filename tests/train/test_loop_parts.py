"""Parts of the training loop that run without Ray: the epoch metrics' group reduction."""

from __future__ import annotations

import pytest
import torch

from loft_dist.train import loop


def test_epoch_sums_are_reduced_on_the_engines_device(monkeypatch):
    """With train.use_gpu the group is NCCL-only, which cannot reduce a CPU tensor: the sums must travel on the
    engine's device. A recording all_reduce stands in for the group (doubling = two equal ranks)."""
    seen = []

    def all_reduce(t):
        seen.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    sums = {"steps": 3.0, "loss": 1.5, "loss_s": 0.9, "pool_rows": 8.0, "hard_rows": 2.0, "soft_rows": 6.0}
    # A device other than the CPU default shows where the reduction ran; a meta tensor has no values to read back.
    with pytest.raises((NotImplementedError, RuntimeError)):
        loop._group_metrics(dict(sums), {}, True, torch.device("meta"))
    assert seen == [torch.device("meta")]
    curves: dict = {}
    m = loop._group_metrics(sums, curves, True, torch.device("cpu"))
    assert m["steps_all_ranks"] == 6 and abs(m["loss"] - 0.5) < 1e-12 and curves == {"loss": [0.5], "loss_s": [0.3]}
    assert (m["pool_rows_seen"], m["hard_share"], m["soft_share"]) == (16, 0.25, 0.75)
