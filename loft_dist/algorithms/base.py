"""What every method object provides, with the defaults of a method whose model is the plain `ClipClassifier`.

A method's module holds one object, `METHOD`, and the registry (algorithms/__init__.py) is the only place that
looks one up by `algorithm.name`. Everything else calls the object: the training loop (build, loss, logits,
start_round, after_step, save), the scorer and export (build, logits).
"""

from __future__ import annotations

from pathlib import Path

from loft_dist.errors import WeightsError


class ClassifierMethod:
    """A method that trains the `ClipClassifier` (what trains in it is `peft.method`) with the given loss; its
    logits for every purpose are the classifier's output, and it keeps no state between steps."""

    def __init__(self, loss):
        # loss(out, code, target, weight, soft, prior, acfg) -> (loss, {name: float}) over one batch
        self.loss = loss

    def build(self, cfg, class_names: list[str], checkpoint):
        """The model of a (local) checkpoint dir, or the initial one when checkpoint is None."""
        from loft_dist.models.checkpoint import load_classifier
        from loft_dist.models.ulfine import ULFINE_FILE

        if checkpoint and (Path(checkpoint) / ULFINE_FILE).is_file():  # its fused logits need the head it would drop
            raise WeightsError(f"{checkpoint} was trained with algorithm.name=ulfine (it has {ULFINE_FILE}), but "
                               f"algorithm.name={cfg.algorithm.name}; use it with algorithm.name=ulfine")
        return load_classifier(cfg.model, cfg.peft, class_names, checkpoint)

    def save(self, model, directory, state: dict | None = None) -> None:
        from loft_dist.models.checkpoint import save_weights

        save_weights(model, directory, state)

    def logits(self, out, purpose: str, acfg):
        """Logits for `pseudo_label` (the teacher), `train` or `test` from the model's forward output."""
        return out

    def start_round(self, model, pool_stats: dict | None, acfg) -> None:
        """Work before a round's first step, given the round table's class statistics (offline) or None."""

    def after_step(self, model, out, code, target, soft, acfg) -> None:
        """Work after each optimizer step that is not a gradient."""
