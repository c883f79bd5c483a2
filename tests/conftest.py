"""Shared fixtures: the real datasets beside the checkout, and a local 2-CPU Ray instance."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``../shared/data`` beside the checkout (or $LIFELONG_DATA_ROOT); tests needing MNIST skip without it."""
    from orchestrator.shards import find_data_root

    root = find_data_root(None, [REPO])
    if root is None or not (root / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST not found: put ../shared/data beside the checkout or set LIFELONG_DATA_ROOT")
    return root


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, no dashboard and no worker logs on the driver; shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
