"""Shards: manifests, stable digests, val carving, permutations, and the errors that name the culprit."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import shards
from orchestrator.errors import ShardError
from orchestrator.spec import SourceSpec

DIGITS = SourceSpec(kind="sklearn_digits", classes=[3, 4], rows_per_shard=100)


def test_manifest_layout_and_contents(tmp_path: Path) -> None:
    m = shards.build_domain(str(tmp_path / "d"), "d", DIGITS, None)
    on_disk = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert on_disk == m
    assert m["label_set"] == [3, 4] and m["schema"]["features"]["shape"] == [1, 8, 8]
    assert m["source"]["classes"] == [3, 4]
    for split in ("train", "val", "test"):
        entry = m["splits"][split]
        assert sum(s["rows"] for s in entry["shards"]) == entry["rows"] > 0
        for s in entry["shards"]:
            blob = (tmp_path / "d" / s["path"]).read_bytes()
            assert len(blob) == s["bytes"] and len(s["sha256"]) == 64
    assert len(m["splits"]["train"]["shards"]) >= 2  # rows_per_shard=100 splits train into several shards


def test_digests_are_stable_across_builds(tmp_path: Path) -> None:
    a = shards.build_domain(str(tmp_path / "a"), "same", DIGITS, None)
    b = shards.build_domain(str(tmp_path / "b"), "same", DIGITS, None)
    assert a["digest"] == b["digest"] and a["splits"] == b["splits"]
    c = shards.build_domain(str(tmp_path / "c"), "same", SourceSpec(kind="sklearn_digits", classes=[3, 5]), None)
    assert c["digest"] != a["digest"]


def test_val_is_carved_deterministically_from_train(tmp_path: Path) -> None:
    raw = shards.load_raw(DIGITS, None)
    s1 = shards.make_domain_splits(raw, DIGITS, "dom")
    s2 = shards.make_domain_splits(raw, DIGITS, "dom")
    assert np.array_equal(s1["val"].x, s2["val"].x)
    n_train_raw = int(np.isin(raw.train.y, [3, 4]).sum())
    assert len(s1["val"].y) + len(s1["train"].y) == n_train_raw
    assert len(s1["val"].y) == round(n_train_raw * 0.1)
    # train and val partition the filtered raw train split (as a multiset of rows)
    both = sorted(r.tobytes() for r in np.concatenate([s1["train"].x, s1["val"].x]))
    assert both == sorted(r.tobytes() for r in raw.train.x[np.isin(raw.train.y, [3, 4])])


def test_permutation_is_seeded_and_recorded(tmp_path: Path) -> None:
    src = SourceSpec(kind="sklearn_digits", permutation_seed=3)
    raw = shards.load_raw(src, None)
    perm = np.random.default_rng(3).permutation(64)
    out = shards.make_domain_splits(raw, src, "p")
    assert np.array_equal(out["test"].x, raw.test.x[:, perm])
    m = shards.build_domain(str(tmp_path / "p"), "p", src, None)
    assert m["source"]["permutation_seed"] == 3


def test_verify_detects_corrupt_and_missing_shards(tmp_path: Path) -> None:
    uri = str(tmp_path / "d")
    m = shards.build_domain(uri, "d", DIGITS, None)
    shards.verify_domain(uri, m)
    shard = tmp_path / "d" / m["splits"]["test"]["shards"][0]["path"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=r"corrupt shard .*test/part-00000\.parquet: sha256"):
        shards.verify_domain(uri, m)
    shard.unlink()
    with pytest.raises(ShardError, match=r"missing shard .*test/part-00000\.parquet"):
        shards.verify_domain(uri, m)


def test_verify_names_a_missing_label_column(tmp_path: Path) -> None:
    uri = str(tmp_path / "d")
    m = shards.build_domain(uri, "d", DIGITS, None)
    entry = m["splits"]["train"]["shards"][0]
    path = tmp_path / "d" / entry["path"]
    table = pq.read_table(path).rename_columns(["x", "label"])
    pq.write_table(table, path)
    import hashlib

    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ShardError, match=r"train/part-00000\.parquet: label column 'y' not found \(columns: label, x\)"):
        shards.verify_domain(uri, m)


def test_build_never_overwrites(tmp_path: Path) -> None:
    uri = str(tmp_path / "d")
    first = shards.build_domain(uri, "d", DIGITS, None)
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    with pytest.raises(ShardError, match="already holds a domain"):
        shards.build_domain(uri, "d", SourceSpec(kind="sklearn_digits", classes=[1]), None)
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before and first["label_set"] == [3, 4]
    assert not list(tmp_path.glob("*.tmp-*"))


def test_read_split_round_trips(tmp_path: Path) -> None:
    uri = str(tmp_path / "d")
    m = shards.build_domain(uri, "d", DIGITS, None)
    raw = shards.make_domain_splits(shards.load_raw(DIGITS, None), DIGITS, "d")
    back = shards.read_split(uri, m, "train")
    assert np.array_equal(back.x, raw["train"].x) and np.array_equal(back.y, raw["train"].y)


def test_mnist_idx_reader(data_root: Path) -> None:
    raw = shards.load_raw(SourceSpec(kind="mnist", path="mnist"), data_root)
    assert raw.train.x.shape == (60000, 784) and raw.test.x.shape == (10000, 784)
    assert sorted(np.unique(raw.train.y).tolist()) == list(range(10))
    assert raw.train.x.dtype == np.uint8 and raw.train.x.max() == 255


def test_missing_raw_files_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"cannot read IDX file .*nowhere/train-images-idx3-ubyte\.gz"):
        shards.load_raw(SourceSpec(kind="mnist", path=str(tmp_path / "nowhere")), None)
