"""The methods behind `algorithm.name`: the registry, the one place that looks a method up by name.

What differs between methods is data in `METHODS` (does it train, does it train on the pool, which config values
its name implies; it lives in `loft_dist.config`, re-exported here) and one object per method, `METHOD` in the
method's own module: `loft` (LoFT, LoFT-OW), `fixmatch`, `supervised` (zero-shot, LP, LFT, FFT), `ulfine`. The
object builds, loads and saves the model, gives its loss, its logits for each purpose and its hooks
(algorithms/base.py). The pseudo-label decision rule is one function for all of them:
`loft.pseudo_label_decision`.
"""

from __future__ import annotations

from loft_dist.config import ADAPTERS, METHODS, Method, get_method  # noqa: F401 - re-exported


def method_of(acfg):
    """The method object of `algorithm.name` (a ClassifierMethod)."""
    import importlib

    return importlib.import_module(f"loft_dist.algorithms.{get_method(acfg.name).module}").METHOD


def load_model(cfg, class_names: list[str], checkpoint: str | None):
    """The model a method trains and scores with, from a checkpoint dir (None: the initial model). A checkpoint in
    object storage is fetched to a temporary directory first (the weight loaders open local files)."""
    from loft_dist import storage

    if checkpoint and storage.is_uri(checkpoint) and not storage.is_local(checkpoint):
        with storage.local_dir(checkpoint) as d:
            return load_model(cfg, class_names, str(d))
    return method_of(cfg.algorithm).build(cfg, class_names, checkpoint)


def inference_logits(acfg, model, images, purpose: str):
    """Scoring and evaluation: purpose `zero_shot` (CLIP's text head), `pseudo_label` (teacher) or `test`."""
    if purpose == "zero_shot":
        return model.zero_shot_logits(images)
    return method_of(acfg).logits(model(images), purpose, acfg)
