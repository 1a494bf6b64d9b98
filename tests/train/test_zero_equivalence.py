"""DeepSpeed ZeRO 0 / 1 / 2 with 2 Ray Train workers reach the loss of 1 worker at the same global batch, and all
of them learn: the training loss falls by far more than the stages differ.

ZeRO 0 with 2 ranks is the path where build_engine clips with torch on the all-reduced gradients. The inputs are
reproducible (clean views, no local shuffle, train.preserve_order), so a difference between two stages is their
maths, not which rows met in a step."""

from __future__ import annotations

import pytest

from loft_dist.config import load_config
from loft_dist.data.prepare import prepare_dataset
from loft_dist.data.pseudo_labels import training_dataset
from loft_dist.data.store import read_dataset_info
from loft_dist.train.trainer import fit_round

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
EPOCHS = 4
# Measured on 2 cores, training loss by epoch (lr 0.05, 4 epochs):
#   1 worker x 16        2.3331 2.2611 2.1596 1.9854   (falls 14.9 %)
#   2 workers x 8, ZeRO 0 2.2983 2.3634 2.3380 2.0458   (falls 11.0 %)
#   ZeRO 1 and ZeRO 2: the same to 3e-9 relative.
MIN_FALL = 0.05  # every configuration's last epoch is at least 5 % below its first: under half the smallest fall
SAME_SPLIT = 1e-6  # ZeRO 0 / 1 / 2 on 2 ranks see the same rows per step: only float rounding differs (3e-9)
# 1 rank x 16 rows vs 2 ranks x 8: each step averages another 16 rows (Ray Data hands blocks to ranks, not rows
# in the 1-rank order), measured 3.0 % apart. Twice that: a loose check of the 2-rank maths against 1 rank, while
# the stage-vs-stage check above is the tight one (1e-6 against an effect of 11 %).
OTHER_SPLIT = 0.06


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    cfg = load_config(None, [f"data.root={root / 'data'}", "data.ood_test=0"])
    prepare_dataset(cfg)
    return root


def _fit(root, workers: int, zero: int, micro: int, *extra: str) -> list[float]:
    """The training loss of each epoch."""
    cfg = load_config(None, [
        f"data.root={root / 'data'}", f"run.storage_path={root}", f"run.name=w{workers}z{zero}",
        f"train.num_workers={workers}", f"train.zero_stage={zero}", f"train.micro_batch_size={micro}",
        f"train.epochs_per_round={EPOCHS}", "rounds.num_rounds=1", "train.labeled_view=clean", "train.shuffle_buffer=0",
        "train.preserve_order=true", "train.lr=0.05", *extra])
    info = read_dataset_info(cfg.data_root)
    counts = info["counts"]["labeled"]
    ds = training_dataset(cfg.data_root, cfg, len(counts))
    out = root / f"ckpt-w{workers}z{zero}"
    metrics = fit_round(cfg, ds, class_names=info["class_names"], prior=[c / sum(counts) for c in counts],
                        init_checkpoint=None, round_idx=1, out_dir=str(out),
                        storage_path=str(root / f"ray_train-w{workers}z{zero}"))  # a fresh Ray Train run each
    assert (out / "head.safetensors").is_file()
    return metrics["loss_by_epoch"]["loss"]


def test_two_workers_zero0_zero1_and_zero2_match_one_worker_at_same_global_batch(data_root, ray_session):
    # The 1-rank reference formats batches in the step's own thread: prefetching changes timing, never the result.
    runs = {"1 worker": _fit(data_root, 1, 0, 16, "train.prefetch_batches=0"),  # global batch 16
            "zero0": _fit(data_root, workers=2, zero=0, micro=8),  # 2 x 8 = 16
            "zero1": _fit(data_root, workers=2, zero=1, micro=8),
            "zero2": _fit(data_root, workers=2, zero=2, micro=8)}
    for name, losses in runs.items():
        assert len(losses) == EPOCHS
        assert losses[-1] <= (1 - MIN_FALL) * losses[0], f"{name} did not learn: loss by epoch {losses}"
    final = {name: losses[-1] for name, losses in runs.items()}
    assert final["zero1"] == pytest.approx(final["zero0"], rel=SAME_SPLIT), final
    assert final["zero2"] == pytest.approx(final["zero0"], rel=SAME_SPLIT), final
    assert final["zero0"] == pytest.approx(final["1 worker"], rel=OTHER_SPLIT), final
