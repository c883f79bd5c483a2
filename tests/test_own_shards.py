"""Shards a user wrote by hand (Parquet files and a manifest.json, as a held-out image dataset would be brought in):
a valid domain validates and runs; what the run would hit later is refused before any run folder or MLflow run
exists, by `lifelong validate` and by `lifelong run` alike, with one error line naming the culprit and exit 2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from orchestrator.manifest import parse
from orchestrator.shards import digest
from tests.small_stream import write_pipeline

SIDE = 6  # 6x6 grey images


def lifelong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def images(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, SIDE*SIDE]`` uint8 images of class ``label``: a bright band at a class-dependent row, plus noise."""
    x = rng.integers(0, 60, size=(n, SIDE, SIDE))
    x[:, label % SIDE, :] += 180
    return x.reshape(n, -1).astype(np.uint8)


def write_domain(root: Path, name: str, labels: list[int], rows: dict[str, int], seed: int,
                 label_column: str = "y", relabel: dict[str, int] | None = None, mixed: bool = False) -> Path:
    """A domain as a user would write it: one Parquet file per split (a list<uint8> feature column and an int64
    label column) and a manifest with every sha256 and digest. ``relabel``: write that split's first label as 99.
    ``mixed``: a label column of mixed types, as a table whose labels are numbers and names comes out (text)."""
    rng = np.random.default_rng(seed)
    folder = root / name
    listing: dict[str, Any] = {}
    for split, n in rows.items():
        y = np.array([labels[i % len(labels)] for i in range(n)], dtype=np.int64)
        if relabel and split in relabel and n:
            y[0] = relabel[split]
        x = np.concatenate([images(int(v), 1, rng) for v in y]) if n else np.zeros((0, SIDE * SIDE), np.uint8)
        labels_out = pa.array([f"class-{v}" if i % 2 else str(v) for i, v in enumerate(y.tolist())]) \
            if mixed else pa.array(y)
        table = pa.table({"pixels": pa.array(list(x), type=pa.list_(pa.uint8())), label_column: labels_out})
        (folder / split).mkdir(parents=True)
        path = folder / split / "part-00000.parquet"
        pq.write_table(table, path)
        shards = [{"path": f"{split}/part-00000.parquet", "rows": n,
                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
        listing[split] = {"rows": n, "shards": shards, "digest": digest(json.dumps(shards, sort_keys=True))}
    manifest = {"format": "lifelong-shards/1", "domain": name, "label_set": labels,
                "schema": {"features": {"column": "pixels", "dtype": "uint8", "shape": [1, SIDE, SIDE],
                                        "scale": 1 / 255},
                           "label": {"column": label_column, "dtype": "int64"}},
                "splits": listing, "digest": digest(json.dumps(listing, sort_keys=True))}
    parse(manifest)  # the public model accepts what this helper writes
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def stream(tmp_path: Path, change: Callable[[Path], None] | None = None) -> Path:
    """Two class-IL domains of hand-written shards and the pipeline that reads them; ``change`` spoils them."""
    root = tmp_path / "held-out"
    sizes = {"train": 120, "val": 20, "test": 40}
    write_domain(root, "a", [0, 1], sizes, seed=0)
    write_domain(root, "b", [2, 3], sizes, seed=1)
    if change is not None:
        change(root)
    return write_pipeline(tmp_path, [{"name": "a", "uri": str(root / "a")}, {"name": "b", "uri": str(root / "b")}],
                          epochs=3)


def drop_digests(root: Path) -> None:
    manifest = json.loads((root / "b" / "manifest.json").read_text())
    del manifest["digest"]
    for split in manifest["splits"].values():
        del split["digest"]
    (root / "b" / "manifest.json").write_text(json.dumps(manifest))


def rewrite(name: str, **kwargs: Any) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        import shutil

        shutil.rmtree(root / name)
        labels = [2, 3] if name == "b" else [0, 1]
        sizes = kwargs.pop("rows", {"train": 120, "val": 20, "test": 40})
        write_domain(root, name, labels, sizes, seed=1, **kwargs)
    return change


CASES = {
    "no digests": (drop_digests, ["b/manifest.json", "digest", "Field required"]),
    "test label outside the label set": (rewrite("b", relabel={"test": 99}),
                                         ["b/test/part-00000.parquet", "label 99", "label_set [2, 3]"]),
    "train label outside the label set": (rewrite("b", relabel={"train": 99}),
                                          ["b/train/part-00000.parquet", "label 99"]),
    "empty domain": (rewrite("b", rows={"train": 0, "val": 0, "test": 0}), ["domain 'b'", "train split is empty"]),
    "another label column": (rewrite("b", label_column="label"),
                             ["domain 'b'", "schema.label.column", "'label'", "'y'"]),
    "a label column of mixed types": (rewrite("b", mixed=True),
                                      ["b/train/part-00000.parquet", "label column 'y' holds string, not integers"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_run_would_hit_is_refused_before_it_starts(tmp_path: Path, case: str) -> None:
    change, culprits = CASES[case]
    path = stream(tmp_path, change)
    for command in ("validate", "run"):
        proc = lifelong(command, str(path), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, (command, proc.stderr[-2000:])
        assert all(c in errors[0] for c in culprits), (command, errors[0])
        assert not (tmp_path / "w" / "p").exists(), f"{command} created a run folder"
        assert not (tmp_path / "w" / "mlflow.db").exists(), f"{command} created an MLflow store"


@pytest.mark.e2e
def test_hand_written_shards_validate_and_run(tmp_path: Path) -> None:
    path = stream(tmp_path)
    proc = lifelong("validate", str(path), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0 and "shards re-hashed" in proc.stdout, proc.stderr
    verify = lifelong("shards", "verify", str(tmp_path / "held-out" / "a"), cwd=tmp_path)
    assert verify.returncode == 0 and "3 shards, 180 rows" in verify.stdout, verify.stderr
    run = lifelong("run", str(path), "--json", "--no-progress", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["R"][0][0] > 0.9 and report["R"][1][1] > 0.9  # the band is easy to learn
