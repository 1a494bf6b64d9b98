"""The scorer: a callable class for `Dataset.map_batches` on an actor pool (model loaded once per actor).

Modes: `zero_shot` (round 0: CLIP zero-shot scores, the stage-1 OOD filter), `teacher` (round r: the model
of round r-1 pseudo-labels the pool), `eval` (predictions on the test splits). The scoring job's rows carry their
`targets`, the (chunk, mode) of every table a row goes into (one actor pool scores every table of one model, and
round 0's pool rows go into two: zero-shot and round 1's teacher), and come out once per target; a batch without
them is scored in the scorer's own mode. Every input row gives exactly one output row per target, whatever its
decision; rows that failed to decode come out `rejected` with their error kept, so the driver can quarantine them.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pyarrow as pa
import torch

from loft_dist.algorithms import inference_logits, load_model
from loft_dist.algorithms.loft import DECISIONS, REJECTED, pseudo_label_decision, zero_shot_keep
from loft_dist.config import from_dict
from loft_dist.data.transforms import normalize_tensor
from loft_dist.errors import DataError

MODES = ("zero_shot", "teacher", "eval")
PURPOSE = {"zero_shot": "zero_shot", "teacher": "pseudo_label", "eval": "test"}  # which logits a mode scores with


class ZeroShotLookup:
    """id → zero-shot MSP from the round-0 table (two columns, sorted; ~12 bytes per pool image)."""

    def __init__(self, table_dir: str):
        from loft_dist.data.pseudo_labels import read_columns

        z = read_columns(table_dir, ["id", "zs_msp"])  # a complete table only: it raises without _SUCCESS
        order = np.argsort(z["id"])
        self.ids, self.vals = z["id"][order].astype(np.int64), z["zs_msp"][order].astype(np.float32)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(len(self.ids) - 1, 0))
        missing = self.ids[pos] != ids if len(self.ids) else np.ones(len(ids), bool)
        if missing.any():
            raise DataError(f"{int(missing.sum())} pool ids (e.g. {ids[missing][:3].tolist()}) are not in the round-0 "
                           f"zero-shot table; the pool changed since round 0 — start a new run")
        return self.vals[pos]


class Scorer:
    def __init__(self, cfg: dict, class_names: list[str], mode: str | None = None, checkpoint: str | None = None,
                 zs_table: str | None = None):
        if mode is not None:
            _check_mode(mode)
        self.cfg = from_dict(cfg)
        torch.set_num_threads(self.cfg.scoring.torch_threads)  # Ray sets OMP_NUM_THREADS from num_cpus
        self.device = "cuda" if self.cfg.scoring.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        # The method's model: ULFine adds a linear head and fuses its logits (algorithm.dlf.use_for).
        self.model = load_model(self.cfg, class_names, checkpoint).to(self.device)
        self.mode = mode
        self.initial = checkpoint is None  # the text-prototype model: round 0's, and round 1's teacher
        self.zs = ZeroShotLookup(zs_table) if zs_table else None
        self.topk = self.cfg.scoring.probs_topk
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.scoring.precision)
        self.autocast = torch.autocast("cuda", dtype=dtype) if dtype and self.device == "cuda" \
            else contextlib.nullcontext()

    def _images(self, x: np.ndarray) -> torch.Tensor:
        """The batch's pixels on the device, normalised: uint8 (job.py decodes with normalized=False) travels as
        uint8 through pinned memory and is normalised there; float32 (already normalised) as it is."""
        if x.dtype != np.uint8:
            return torch.from_numpy(np.require(x, np.float32, ["C", "W"])).to(self.device)
        with warnings.catch_warnings():  # Arrow's read-only buffer, never written: normalising makes a new tensor
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(x))
        if self.device == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return normalize_tensor(t)

    def __call__(self, batch: dict) -> pa.Table:
        targets = batch.get("targets")
        if targets is None:
            if self.mode is None:
                raise ValueError("a batch without a `targets` column, and the Scorer was made without a mode")
            return self._score(batch, [(None, self.mode)])
        targets = np.asarray(targets)
        kinds = list(dict.fromkeys(targets.tolist()))
        # Rows of several read units can meet in one batch (Ray Data bundles blocks): each group by its own targets
        parts = [batch if len(kinds) == 1 else {k: np.asarray(v)[targets == t] for k, v in batch.items()}
                 for t in kinds]
        return pa.concat_tables([self._score(part, [(c, _check_mode(m)) for c, m in json.loads(t)])
                                 for part, t in zip(parts, kinds)])

    def _score(self, batch: dict, targets: list[tuple[int | None, str]]) -> pa.Table:
        """The batch's rows scored once per (chunk, mode) target; the images are moved and the zero-shot
        probabilities computed once for all of them."""
        a = self.cfg.algorithm
        x = self._images(batch["image"])
        ids = np.asarray(batch["id"])
        cache: dict[str, torch.Tensor] = {}

        def probs_of(mode: str) -> torch.Tensor:
            if mode not in cache:
                with torch.inference_mode(), self.autocast:
                    logits = inference_logits(a, self.model, x, PURPOSE[mode])
                    cache[mode] = torch.softmax(logits.float() / a.temperature, dim=-1).cpu()
            return cache[mode]

        return pa.concat_tables([self._rows(batch, ids, probs_of(mode), self._zs_msp(mode, ids, probs_of), chunk)
                                 for chunk, mode in targets])

    def _zs_msp(self, mode: str, ids: np.ndarray, probs_of) -> np.ndarray:
        """The rows' zero-shot MSP (LoFT-OW's stage-1 filter). Teacher rows take round 0's: from its table, or, when
        this is the initial model (round 1's teacher, round 0's model), computed here as round 0 computes it.
        Test rows, and teacher rows of a checkpoint scored without round 0's table, have none."""
        if mode == "zero_shot" or (mode == "teacher" and self.zs is None and self.initial):
            return probs_of("zero_shot").max(-1).values.numpy()
        if mode == "teacher" and self.zs is not None:
            return self.zs(ids)
        return np.full(len(ids), np.nan, np.float32)

    def _rows(self, batch: dict, ids: np.ndarray, probs: torch.Tensor, zs_msp: np.ndarray, chunk: int | None):
        a = self.cfg.algorithm
        keep = zero_shot_keep(torch.from_numpy(zs_msp), a.zs_threshold, a.zs_keep) if a.zs_filter else None
        d = pseudo_label_decision(probs, a.c_hard, a.c_ood, a.soft_weight, keep)
        errors = np.asarray(batch["error"], dtype=object)
        bad = torch.from_numpy(errors != "")
        d["code"][bad] = REJECTED
        d["weight"][bad] = 0.0
        out = {
            "id": ids.astype(np.int64),
            "pred": d["pred"].numpy().astype(np.int32),
            "msp": d["msp"].numpy().astype(np.float32),
            "zs_msp": zs_msp.astype(np.float32),
            "decision": np.asarray(DECISIONS)[d["code"].numpy()].astype(str),
            "weight": d["weight"].numpy().astype(np.float32),
            "true_label": np.asarray(batch["true_label"]).astype(np.int32),
            "error": errors.astype(str),
        }
        if chunk is not None:  # each row's input shard and chunk: job.py commits chunk by chunk (not kept in the table)
            out["path"] = np.asarray(batch["path"]).astype(str)
            out["chunk"] = np.full(len(ids), chunk, np.int64)
        p = probs.numpy().astype(np.float32)
        if self.topk and self.topk < p.shape[1]:
            idx = np.argsort(-p, axis=1)[:, : self.topk]
            top = np.take_along_axis(p, idx, axis=1)
            out["probs_idx"] = _list_column(idx.astype(np.int32))
            p = top / top.sum(axis=1, keepdims=True)
        out["probs"] = _list_column(p)
        # A plain Arrow table (list<float> probs) keeps the Parquet readable without Ray's tensor extension.
        return pa.table(out)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"scorer mode {mode!r}; one of {MODES}")
    return mode


def _list_column(a: np.ndarray) -> pa.ListArray:
    offsets = np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(a.ravel()))
