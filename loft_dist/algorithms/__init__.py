"""The methods behind `algorithm.name`, and the few places where the training loop and the scorer ask which one runs.

Every method goes through the same round driver; what differs is data in `METHODS` (does it train, does it
train on the pool, which config values its name implies) and, for the loss and the model, the method's own
module: `loft` (LoFT, LoFT-OW), `fixmatch`, `supervised` (LP, LFT, FFT), `ulfine`. The pseudo-label
decision rule is one function for all of them: `loft.pseudo_label_decision`.

`METHODS` is configuration data (the values a name implies) and lives in `loft_dist.config`; it is re-exported here.
"""

from __future__ import annotations

from loft_dist.config import ADAPTERS, METHODS, Method, get_method  # noqa: F401 - re-exported
from loft_dist.errors import WeightsError


def _module(name: str):
    import importlib

    return importlib.import_module(f"loft_dist.algorithms.{get_method(name).module}")


def load_model(cfg, class_names: list[str], checkpoint: str | None):
    """The model a method trains and scores with: the ClipClassifier, or ULFine's two-head wrapper around it. A
    checkpoint in object storage is fetched to a temporary directory first (the weight loaders open local files)."""
    from loft_dist import storage

    if checkpoint and storage.is_uri(checkpoint) and not storage.is_local(checkpoint):
        with storage.local_dir(checkpoint) as d:
            return load_model(cfg, class_names, str(d))
    if cfg.algorithm.name == "ulfine":
        from loft_dist.algorithms.ulfine import load_ulfine

        return load_ulfine(cfg, class_names, checkpoint)
    from pathlib import Path

    from loft_dist.algorithms.ulfine import ULFINE_FILE
    from loft_dist.models.checkpoint import load_classifier

    if checkpoint and (Path(checkpoint) / ULFINE_FILE).is_file():  # its fused logits need the head it would drop
        raise WeightsError(f"{checkpoint} was trained with algorithm.name=ulfine (it has {ULFINE_FILE}), but "
                           f"algorithm.name={cfg.algorithm.name}; use it with algorithm.name=ulfine")

    return load_classifier(cfg.model, cfg.peft, class_names, checkpoint)


def save_model(model, directory, state: dict | None = None) -> None:
    if hasattr(model, "save"):  # ULFine: its extra head next to the classifier's files
        model.save(directory, state)
        return
    from loft_dist.models.checkpoint import save_weights

    save_weights(model, directory, state)


def training_loss(acfg, out, code, target, weight, soft, prior):
    """The method's loss over one batch of labeled and pseudo-labeled rows; returns (loss, float parts)."""
    return _module(acfg.name).loss(out, code, target, weight, soft, prior, acfg)


def logits_for(acfg, out, purpose: str):
    """Logits for `pseudo_label` (the teacher) or `test`, from the model's outputs (ULFine: per dlf.use_for)."""
    if acfg.name == "ulfine":
        from loft_dist.algorithms.ulfine import logits_for as ulfine_logits

        return ulfine_logits(out, purpose, acfg)
    return out


def inference_logits(acfg, model, images, purpose: str):
    """Scoring and evaluation: purpose `zero_shot` (CLIP), `pseudo_label` (teacher) or `test`."""
    if purpose == "zero_shot":
        return model.zero_shot_logits(images)
    return logits_for(acfg, model(images), purpose)


def start_round(acfg, model, pool_stats: dict | None) -> None:
    """Work before a round's first step: ULFine's P_u^k from the round's table (offline; pool_stats None online)."""
    if acfg.name == "ulfine":
        from loft_dist.algorithms.ulfine import start_round as ulfine_start_round

        ulfine_start_round(model, pool_stats, acfg)


def after_step(acfg, model, out, code, target, soft) -> None:
    """Work after each optimizer step that is not a gradient: ULFine's prototype adaptive fitting."""
    if acfg.name == "ulfine":
        from loft_dist.algorithms.ulfine import after_step as ulfine_after_step

        ulfine_after_step(model, out, code, target, soft, acfg)
