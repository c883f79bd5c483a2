"""lifelong's orchestrator: pipeline spec, shards, the stage DAG on Ray, evaluation, lineage and the CLI.

Python API::

    from orchestrator import load_pipeline, run, RunOptions
    report = run(load_pipeline("pipelines/split_mnist.yaml"), RunOptions(workdir=Path("lifelong-runs")))

All four are imported lazily: light commands (``lifelong validate``) do not load Ray, and Ray Data's read tasks,
which import ``orchestrator.ingest``, do not load torch (the spec imports neither torch nor the strategies).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Pipeline", "RunOptions", "load_pipeline", "run"]
_HOME = {"Pipeline": "orchestrator.spec", "load_pipeline": "orchestrator.spec", "run": "orchestrator.dag",
         "RunOptions": "orchestrator.dag"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
