"""The user's tables as classification domains: a CSV with numeric feature columns and a label column of class names,
written by the test, is cut into class-IL domains (by a class grouping, or by another column's values) and runs
through `lifelong run`; a label column that mixes numbers and names, a feature column of text and a missing label
column are refused with one error line naming the file and column, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.spec import SourceSpec
from orchestrator.tables import load_table
from tests.small_stream import run_is_refused, write_pipeline

NAMES = ("alder", "birch", "cedar", "maple")  # sorted: labels 0..3


def lifelong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def write_table(path: Path, per_class: int = 60) -> Path:
    """Four classes of 3 numeric features (Gaussian blobs, well apart), a ``site`` column and a ``species`` label."""
    rng = np.random.default_rng(0)
    centres = {name: rng.normal(0, 4, size=3) for name in NAMES}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["height", "girth", "leaf", "site", "species"])
        for i in range(per_class):
            for name in NAMES:
                values = centres[name] + rng.normal(0, 0.5, size=3)
                writer.writerow([f"{v:.4f}" for v in values] + [f"site-{i % 2}", name])
    return path


def source(csv_path: Path, **extra: object) -> dict[str, object]:
    return {"kind": "csv", "path": str(csv_path), "feature_columns": ["height", "girth", "leaf"],
            "label_column": "species", **extra}


def test_a_table_reads_as_float_features_and_named_labels(tmp_path: Path) -> None:
    raw = load_table(SourceSpec.model_validate(source(write_table(tmp_path / "trees.csv"))), None)
    assert raw.shape == (3,) and raw.scale == 1.0 and raw.label_names == list(NAMES)
    assert raw.train.x.dtype == np.float32 and len(raw.train.y) + len(raw.test.y) == 240
    assert sorted(set(raw.train.y.tolist())) == [0, 1, 2, 3]
    assert len(raw.test.y) == 48  # test_fraction 0.2 of 240 rows, seeded


@pytest.mark.e2e
def test_a_csv_classification_stream_runs_class_il(tmp_path: Path) -> None:
    csv_path = write_table(tmp_path / "trees.csv", per_class=200)
    path = write_pipeline(tmp_path, [{"name": "conifers-and-alder", "source": source(csv_path,
                                                                                      classes=["alder", "cedar"])},
                                     {"name": "broadleaf", "source": source(csv_path, classes=["birch", "maple"])}],
                          epochs=6)
    proc = lifelong("run", str(path), "--json", "--no-progress", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["R"][0][0] > 0.9 and report["R"][1][1] > 0.9  # the blobs are far apart
    manifest = json.loads((tmp_path / "w" / "shards" / "p" / "broadleaf" / "manifest.json").read_text())
    assert manifest["label_set"] == [1, 3] and manifest["label_names"] == {"1": "birch", "3": "maple"}
    assert manifest["schema"]["features"] == {"column": "x", "dtype": "float32", "shape": [3], "scale": 1.0}


@pytest.mark.parametrize("spoil, culprits", [
    ("mixed labels", ["trees.csv", "label column 'species' mixes numbers and names"]),
    ("text feature", ["trees.csv", "feature column 'girth'", "not numbers"]),
    ("no label column", ["trees.csv", "label column 'species' not found"]),
])
def test_bad_tables_are_refused_naming_the_file_and_column(tmp_path: Path, spoil: str, culprits: list[str]) -> None:
    csv_path = write_table(tmp_path / "trees.csv", per_class=10)
    lines = csv_path.read_text().splitlines()
    if spoil == "mixed labels":
        lines[3] = lines[3].rsplit(",", 1)[0] + ",7"
    elif spoil == "text feature":
        cells = lines[5].split(",")
        lines[5] = ",".join([cells[0], "tall", *cells[2:]])
    else:
        lines[0] = lines[0].replace("species", "kind")
    csv_path.write_text("\n".join(lines) + "\n")
    path = write_pipeline(tmp_path, [{"name": "a", "source": source(csv_path, classes=["alder", "birch"])},
                                     {"name": "b", "source": source(csv_path, where={"site": "site-1"})}], epochs=1)
    proc = lifelong("run", str(path), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    run_is_refused(proc, culprits, tmp_path / "w", "p")
