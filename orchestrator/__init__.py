"""lifelong's orchestrator: pipeline spec, shards, the stage DAG on Ray, evaluation, lineage and the CLI.

Python API::

    from orchestrator import load_pipeline, run, RunOptions
    report = run(load_pipeline("pipelines/split_mnist.yaml"), RunOptions(workdir=Path("lifelong-runs")))

``run`` and ``RunOptions`` are imported lazily so that light commands (``lifelong validate``) do not load Ray.
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec import Pipeline, load_pipeline

__all__ = ["Pipeline", "RunOptions", "load_pipeline", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "RunOptions"):
        from orchestrator import dag

        return getattr(dag, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
