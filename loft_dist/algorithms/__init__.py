"""The methods behind `algorithm.name`, and the few places where the training loop and the scorer ask which one runs.

Every method goes through the same round driver; what differs is data in `METHODS` (does it train, does it
train on the pool, which config values its name implies) and, for the loss and the model, the method's own
module: `loft` (LoFT, LoFT-OW), `fixmatch`, `supervised` (LP, LFT, FFT), `ulfine`. The pseudo-label
decision rule is one function for all of them: `loft.pseudo_label_decision`.

This file imports no torch at module level: `config.py` reads `METHODS` to validate a config before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loft_dist.errors import ConfigError

ADAPTERS = ("lora", "adaptformer", "vpt", "bitfit", "ln")  # peft.method values that add a light adapter


@dataclass(frozen=True)
class Method:
    module: str  # loft_dist.algorithms.<module>: the loss (and, for ulfine, the model)
    summary: str
    trains: bool = True  # zero-shot trains nothing: the run is round 0 only
    pseudo_labels: bool = True  # trains on the pool (offline: the round's accepted rows; online: per step)
    # Config values the name implies, merged beneath the user's YAML and overrides (so either can change them).
    defaults: dict = field(default_factory=dict)
    peft_methods: tuple = ()  # peft.method values the method is defined with (empty = any)


METHODS = {
    "zero_shot": Method("supervised", "CLIP zero-shot with the text prototypes; no training", trains=False,
                        pseudo_labels=False),
    "lp": Method("supervised", "linear probe: frozen tower, cosine head only, labeled data only",
                 pseudo_labels=False, defaults={"peft": {"method": "none"}}, peft_methods=("none",)),
    "lft": Method("supervised", "LIFT: light adapter + head, labeled data only, logit-adjusted loss",
                  pseudo_labels=False, peft_methods=ADAPTERS),
    "fft": Method("supervised", "full fine-tuning of the tower + head, labeled data only",
                  pseudo_labels=False, defaults={"peft": {"method": "full"}}, peft_methods=("full",)),
    # FixMatch: c_ood = c_hard leaves no soft band (ties go to hard); plain CE (tau 0); lambda_u 1 as in FixMatch.
    "fixmatch": Method("fixmatch", "FixMatch: hard pseudo-labels at MSP >= 0.95, plain cross-entropy",
                       defaults={"algorithm": {"c_hard": 0.95, "c_ood": 0.95, "lambda_u": 1.0, "lambda_uc": 0.0,
                                               "tau": 0.0}}),
    "loft": Method("loft", "LoFT, closed world: hard + soft pseudo-labels, nothing rejected (SPEC Decision 2)",
                   defaults={"algorithm": {"c_ood": 0.0}}),
    "loft_ow": Method("loft", "LoFT-OW: stage-1 zero-shot filter + stage-2 MSP rejection at c_ood 0.3",
                      defaults={"algorithm": {"c_ood": 0.3, "zs_filter": True}}),
    # ULFine's SSL base is not retrievable (SPEC B.5); the LTSSL norm is FixMatch's hard rule + LA supervised loss.
    "ulfine": Method("ulfine", "ULFine (reconstructed): PAF + orthogonality + dual logit fusion on FixMatch",
                     defaults={"algorithm": {"c_hard": 0.95, "c_ood": 0.95, "lambda_u": 1.0, "lambda_uc": 0.0}}),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"algorithm.name={name!r}; one of {', '.join(METHODS)}") from None


def _module(name: str):
    import importlib

    return importlib.import_module(f"loft_dist.algorithms.{get_method(name).module}")


def load_model(cfg, class_names: list[str], checkpoint: str | None):
    """The model a method trains and scores with: the ClipClassifier, or ULFine's two-head wrapper around it."""
    if cfg.algorithm.name == "ulfine":
        from loft_dist.algorithms.ulfine import load_ulfine

        return load_ulfine(cfg, class_names, checkpoint)
    from loft_dist.models.checkpoint import load_classifier

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


def after_step(acfg, model, out, code, target, soft) -> None:
    """Work after each optimizer step that is not a gradient: ULFine's prototype adaptive fitting."""
    if acfg.name == "ulfine":
        from loft_dist.algorithms.ulfine import after_step as ulfine_after_step

        ulfine_after_step(model, out, code, target, soft, acfg)
