"""A small class-IL pipeline over the domains a test made (its own shards or images), for the own-data tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_pipeline(tmp_path: Path, domains: list[dict[str, Any]], epochs: int) -> Path:
    """``<tmp_path>/p.yaml``: pipeline ``p``, class-IL over ``domains``, an MLP of 32 hidden units, ``epochs`` epochs
    of batches of 16, one evaluation actor of 0.25 CPU."""
    spec = {"name": "p", "scenario": "class_il", "domains": domains,
            "model": {"name": "mlp", "hidden": [32]}, "training": {"epochs": epochs, "batch_size": 16},
            "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
