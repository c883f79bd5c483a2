"""A small class-IL pipeline over the domains a test made (its own shards or images), and the check that a run refused
bad input, for the own-data tests."""

from __future__ import annotations

import subprocess
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


def run_is_refused(proc: subprocess.CompletedProcess, culprits: list[str], workdir: Path, pipeline: str,
                   shards_kept: bool = False) -> str:
    """Check that ``lifelong run`` refused its input: exit 2, exactly one ``error:`` line naming every culprit, no
    run folder or MLflow store under ``workdir``, and (unless ``shards_kept``: valid shards of a wrong pipeline) no
    committed domain; returns the error line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert all(c in errors[0] for c in culprits), errors[0]
    assert not (workdir / pipeline).exists() and not (workdir / "mlflow.db").exists()
    if not shards_kept:
        assert not list((workdir / "shards" / pipeline).glob("*/manifest.json")), "a domain was committed"
    return errors[0]
