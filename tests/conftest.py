"""Shared fixtures: one local Ray for the whole session (ray.init costs ~3 s, each fit ~17 s of overhead)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray sized like CI (2 cores), with a capped object store and extra logical CPUs for fractional actors."""
    import ray

    from loft_dist.runtime import configure_ray_data

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    configure_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists only beside the project's checkout, not on a user's machine)")
    return SHARED
