"""Fixtures of the fault-injection tests (tiny config; helpers in faultlib.py)."""

from __future__ import annotations

import pytest

from faultlib import DATA_OVERRIDES, TINY
from loft_dist.config import load_config


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory) -> str:
    """The tiny dataset, prepared once (no Ray needed); runs point data.root at it and skip `prepare`."""
    from loft_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("fault_data") / "data"
    cfg = load_config(TINY, DATA_OVERRIDES + [f"data.root={root}"])
    prepare_dataset(cfg)
    return str(root)
