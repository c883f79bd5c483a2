"""Ingestion of a stage: every shard row arrives once, tagged with its domain, in the chosen shuffle order, split
equally and disjointly across workers; a worker's first pass streamed ahead (Prefetch) is the stream itself, and
later epochs come from memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator import shards
from orchestrator.errors import ShardError, TrainingError
from orchestrator.ingest import ShardFile, WorkerShard, stage_files
from orchestrator.spec import SourceSpec
from orchestrator.stage import EpochCache, Prefetch, ToBatch, local_shuffle, stream_batches
from orchestrator.storage import Storage
from strategies import Batch


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    uri = str(tmp_path_factory.mktemp("ingest") / "digits")
    source = SourceSpec(kind="sklearn_digits", classes=[0, 1, 2], rows_per_shard=60)
    return uri, shards.build_domain(uri, "digits", source, None)


def _rows(uri: str, manifest: dict) -> list[bytes]:
    """The manifest-order rows of the train split, one ``bytes`` key per row (features and label)."""
    raw = shards.read_split(uri, manifest, "train")
    return [x.tobytes() + bytes([y]) for x, y in zip(raw.x, raw.y)]


def _streamed(shard: WorkerShard, chunk: int = 16) -> tuple[list[bytes], set[int]]:
    """The shard's rows as ``bytes`` keys (as :func:`_rows`), in the order a worker reads them, and its ``t``s."""
    tables = list(shard.tables(chunk))
    assert all(t.num_rows == chunk for t in tables[:-1]) and 0 < tables[-1].num_rows <= chunk
    t = pa.concat_tables(tables)
    x = shards.feature_matrix(t.column("x"), 64)
    y = t.column("y").to_numpy()
    return [a.tobytes() + bytes([int(b)]) for a, b in zip(x, y)], set(t.column("t").to_pylist())


def _kept_neighbours(rows: list[bytes], files: list[list[bytes]]) -> float:
    """Share of within-file neighbour pairs (a row and the next one in its file) that are still neighbours."""
    successor = {a: b for f in files for a, b in zip(f, f[1:])}
    kept = sum(successor.get(a) == b for a, b in zip(rows, rows[1:]))
    return kept / len(successor)


def _shard(uri: str, manifest: dict, mode: str, rank: int = 0, world: int = 1) -> WorkerShard:
    # seed 2 (file order seed 2 + 1 for domain 1) moves the first file; an order close to the identity proves little
    files = stage_files([("unused", {}), (uri, manifest)], [1], mode, seed=2)  # type: ignore[arg-type]
    return WorkerShard(files, ("x", "y"), Storage(), rank, world, 7 if mode == "full" else None)


@pytest.mark.parametrize("mode", ["files", "full"])
def test_every_row_arrives_once_in_the_chosen_order(mode: str, domain: tuple[str, dict]) -> None:
    uri, manifest = domain
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    expected = _rows(uri, manifest)
    files = [expected[i:i + 60] for i in range(0, len(expected), 60)]
    got, tags = _streamed(_shard(uri, manifest, mode))
    assert sorted(got) == sorted(expected) and tags == {1}  # nothing lost, nothing doubled, tagged with its domain
    assert got != expected  # the order changed
    kept = _kept_neighbours(got, files)
    if mode == "files":
        assert kept > 0.95  # whole files move; rows stay in order within a file
    else:
        assert kept < 0.1  # rows mixed across the whole split


@pytest.mark.parametrize("mode", ["files", "full"])
def test_workers_get_equal_disjoint_parts(mode: str, domain: tuple[str, dict]) -> None:
    uri, manifest = domain
    expected = _rows(uri, manifest)
    parts = [_streamed(_shard(uri, manifest, mode, rank, 3), chunk=7)[0] for rank in range(3)]
    assert [len(p) for p in parts] == [len(expected) // 3] * 3  # equal: DDP ranks take the same number of steps
    union = [r for p in parts for r in p]
    assert len(set(union)) == len(union) and set(union) <= set(expected)  # disjoint, and real rows
    assert len(expected) - len(union) < 3  # only the remainder of the division is dropped


def test_the_local_shuffle_mixes_rows_and_loses_none(domain: tuple[str, dict]) -> None:
    uri, manifest = domain
    expected = _rows(uri, manifest)
    files = [expected[i:i + 60] for i in range(0, len(expected), 60)]
    shard = _shard(uri, manifest, "local")
    mixed = pa.concat_tables(list(local_shuffle(shard.tables(16), rows=48, seed=0)))
    x = shards.feature_matrix(mixed.column("x"), 64)
    got = [a.tobytes() + bytes([int(b)]) for a, b in zip(x, mixed.column("y").to_numpy())]
    assert sorted(got) == sorted(expected)
    assert _kept_neighbours(got, files) < 0.2  # rows no longer follow their file's order


def test_batches_are_whole_scaled_and_mapped_to_output_units(domain: tuple[str, dict]) -> None:
    uri, manifest = domain
    targets = torch.tensor([[-1, -1, -1], [5, 6, 7]])  # domain 1's labels 0, 1, 2 -> output units 5, 6, 7
    collate = ToBatch("x", "y", (8, 8), 1 / 16, targets)
    batches = list(stream_batches(_shard(uri, manifest, "local"), collate, batch_size=32, shuffle_rows=50))
    rows = manifest["splits"]["train"]["rows"]
    assert [len(b) for b in batches[:-1]] == [32] * (len(batches) - 1) and sum(len(b) for b in batches) == rows
    x = torch.cat([b.x for b in batches])
    assert x.shape == (rows, 8, 8) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(torch.cat([b.y for b in batches]).tolist()) == {5, 6, 7}
    with pytest.raises(TrainingError, match="label 2 of domain 1 is not in its label set"):
        list(stream_batches(_shard(uri, manifest, "files"), ToBatch("x", "y", (8, 8), 1.0, targets[:, :2]), 32))


def test_features_are_read_from_binary_and_list_columns() -> None:
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), 3, [None, pa.py_buffer(x.tobytes())])
    listed = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)
    variable = pa.array([bytes(r) for r in x], type=pa.binary())
    for column in (fixed, fixed.slice(1), listed, pa.chunked_array([listed.slice(0, 1), listed.slice(1)]), variable):
        assert (shards.feature_matrix(column, 4) == x[3 - len(column):]).all()
    with pytest.raises(ValueError, match="holds 12 values for 3 rows of 5"):
        shards.feature_matrix(listed, 5)
    with pytest.raises(ValueError, match="feature column of type string"):
        shards.feature_matrix(pa.array(["a"]), 1)


def test_an_unreadable_shard_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "part-0.parquet"
    bad.write_bytes(b"not parquet at all")
    shard = WorkerShard((ShardFile(str(bad), 0, 10),), ("x", "y"), Storage())
    with pytest.raises(ShardError, match=f"shard {bad}: "):
        list(shard.tables(4))


def numbered_batches(n: int, fail_at: int | None = None) -> Iterator[Batch]:
    """n batches of 4 rows: ``x`` holds the batch number; raises ShardError at batch ``fail_at``."""
    for i in range(n):
        if i == fail_at:
            raise ShardError(f"shard {i} is corrupt")
        yield Batch(torch.full((4, 2), float(i)), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_a_prefetched_first_pass_is_the_stream_itself_and_later_epochs_come_from_memory() -> None:
    streamed: list[int] = []

    def stream() -> Iterator[Batch]:
        streamed.append(1)
        return numbered_batches(5)

    ahead = Prefetch(3, stream=stream, max_batches=2)  # the thread blocks after 2 batches
    ahead.thread.join(0.5)
    assert ahead.thread.is_alive() and ahead.queue.qsize() == 2
    done: list[int] = []
    cache = EpochCache(stream, limit_bytes=2**20, batch_size=4, shuffle=False, seed=0, first_pass=ahead.batches(),
                       after_first_pass=lambda: done.append(1))
    first = [int(b.x[0, 0]) for b in cache()]
    assert first == [0, 1, 2, 3, 4] and done == [1] and streamed == [1]  # one stream only, in its own order
    again = [int(b.x[0, 0]) for b in cache()]
    assert again == first and done == [1] and streamed == [1]  # from memory: no second stream, no second callback


def test_a_failed_prefetch_raises_in_the_stage_and_a_cancelled_one_stops() -> None:
    failing = Prefetch(0, lambda: numbered_batches(5, fail_at=2), max_batches=8)
    with pytest.raises(ShardError, match="shard 2 is corrupt"):
        list(failing.batches())
    idle = Prefetch(1, lambda: numbered_batches(100), max_batches=1)
    idle.cancel()
    assert not idle.thread.is_alive()
