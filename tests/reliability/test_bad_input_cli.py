"""Promise 7's cases that are refused before anything runs: an ``s3://`` domain with no AWS credentials anywhere, and
a model factory path that does not import. Each through `lifelong run`: one error line naming the culprit, exit 2,
nothing written (no run folder, no MLflow store, no shards)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.small_stream import run_is_refused


def _run(tmp_path: Path, spec: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "scenario": "class_il", "model": {"name": "mlp", "hidden": [8]},
                                    **spec}))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--workdir",
                           str(tmp_path / "w")], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)


def test_an_s3_domain_without_credentials_is_refused_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")  # no ~/.aws, no instance metadata
    proc = _run(tmp_path, {"domains": [{"name": "a", "uri": "s3://lifelong-nowhere/shards/a"}]}, env)
    line = run_is_refused(proc, ["no AWS credentials", "s3://lifelong-nowhere/shards/a"], tmp_path / "w", "p")
    assert "AWS_ACCESS_KEY_ID" in line


def test_a_model_factory_that_does_not_import_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spec = {"domains": [{"name": "a", "source": {"kind": "sklearn_digits", "classes": [0, 1]}}],
            "model": {"name": "nowhere_pkg.models:make"}}
    proc = _run(tmp_path, spec, dict(os.environ))
    run_is_refused(proc, ["model.name", "nowhere_pkg.models:make"], tmp_path / "w", "p")
    assert not (tmp_path / "w").exists()
