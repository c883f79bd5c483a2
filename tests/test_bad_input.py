"""Bad input: one-line error naming the culprit, exit code 2, and no half-written run."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from orchestrator import shards
from orchestrator.spec import SourceSpec

REPO = Path(__file__).resolve().parents[1]


def lifelong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_clean_failure(proc: subprocess.CompletedProcess, workdir: Path, *culprits: str) -> None:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for c in culprits:
        assert c in errors[0], errors[0]
    assert proc.stdout == ""
    assert not (workdir / "p").exists(), "a run folder was created"
    assert not (workdir / "mlflow.db").exists(), "an MLflow run was created"


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_malformed_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\ndomains:\n  - {name: a\n")
    proc = lifelong("run", str(bad), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "bad.yaml", "malformed YAML", "line")


def test_unknown_strategy(tmp_path: Path) -> None:
    proc = lifelong("run", str(REPO / "pipelines" / "split_mnist.yaml"), "--set", "strategy.name=nope",
                    "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "split_mnist.yaml", "strategy.0", "unknown strategy 'nope'")


def test_missing_shard_path(tmp_path: Path) -> None:
    spec = write(tmp_path / "p.yaml", {"name": "p", "domains": [{"name": "a", "uri": str(tmp_path / "nowhere")}]})
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "domains.0 (a)", str(tmp_path / "nowhere" / "manifest.json"))


def test_missing_label_column(tmp_path: Path) -> None:
    uri = tmp_path / "shards" / "a"
    manifest = shards.build_domain(str(uri), "a", SourceSpec(kind="sklearn_digits", classes=[0, 1]), None)
    entry = manifest["splits"]["train"]["shards"][0]
    path = uri / entry["path"]
    pq.write_table(pq.read_table(path).rename_columns(["x", "target"]), path)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # a consistent manifest, a wrong schema
    (uri / "manifest.json").write_text(__import__("json").dumps(manifest))
    spec = write(tmp_path / "p.yaml", {"name": "p", "domains": [{"name": "a", "uri": str(uri)}]})
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "domain 'a'", "train/part-00000.parquet",
                         "label column 'y' not found")


def digits_spec(tmp_path: Path, **sections: Any) -> Path:
    """A one-domain pipeline on the embedded digits, with ``sections`` (e.g. ``training={...}``) added."""
    return write(tmp_path / "p.yaml", {"name": "p", "domains": [
        {"name": "a", "source": {"kind": "sklearn_digits", "classes": [0, 1]}}], **sections})


def test_unreachable_ray_cluster(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path)
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), "--address", "127.0.0.1:1", cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "the Ray cluster at --address 127.0.0.1:1 is unreachable", "refused")


def test_unreachable_tracking_server(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path)
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), "--tracking-uri",
                    "http://alice:pa55w0rd@127.0.0.1:1", cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "MLflow tracking URI http://alice:***@127.0.0.1:1 is unreachable",
                         "refused")
    assert "pa55w0rd" not in proc.stdout + proc.stderr


def test_custom_resource_the_cluster_lacks(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, training={"resources": {"node_x": 1}})
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "training.resources.node_x", "this Ray cluster has 0")


def test_ray_resource_given_as_a_custom_one(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, evaluation={"resources": {"CPU": 1}})
    proc = lifelong("run", str(spec), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert_clean_failure(proc, tmp_path / "w", "p.yaml", "evaluation.resources", "CPU: set it with the role's own")
