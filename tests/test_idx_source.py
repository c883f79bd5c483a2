"""The user's own IDX files (MNIST format) with only a train split: the test split is a seeded share of it; files
gzipped or not; images and labels that disagree are refused naming the files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import ShardError
from orchestrator.shards import build_domain, verify_domain
from orchestrator.spec import SourceSpec


def write_idx(path: Path, array: np.ndarray, zipped: bool = False) -> None:
    """An IDX file of uint8 ``array`` (magic 0x0000 08 <ndim>, big-endian dims, then the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if zipped else blob)


def test_a_train_only_idx_dataset_becomes_domains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50).astype(np.uint8)
    write_idx(tmp_path / "images.idx", rng.integers(0, 255, size=(200, 7, 9)).astype(np.uint8))
    write_idx(tmp_path / "labels.idx.gz", y, zipped=True)
    source = SourceSpec(kind="idx", path=str(tmp_path), idx={"train": ("images.idx", "labels.idx.gz")},
                        classes=[2, 3], val_fraction=0.1)
    manifest = build_domain(str(tmp_path / "out" / "late"), "late", source, None)
    assert manifest["label_set"] == [2, 3] and manifest["schema"]["features"]["shape"] == [1, 7, 9]
    rows = {s: manifest["splits"][s]["rows"] for s in ("train", "val", "test")}
    assert sum(rows.values()) == 100 and 10 <= rows["test"] <= 30  # 20% of all 200 held out, seeded, then filtered
    verify_domain(str(tmp_path / "out" / "late"), manifest)


def test_images_and_labels_that_disagree_are_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "images.idx", np.zeros((10, 4, 4), np.uint8))
    write_idx(tmp_path / "labels.idx", np.zeros(9, np.uint8))
    source = SourceSpec(kind="idx", path=str(tmp_path), idx={"train": ("images.idx", "labels.idx")})
    with pytest.raises(ShardError, match=r"labels.idx: 9 labels for the 10 images of .*images.idx"):
        build_domain(str(tmp_path / "out"), "d", source, None)
    assert not (tmp_path / "out").exists()
