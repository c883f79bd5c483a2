"""A stage's training data: which shard files it streams, and each worker's part of them, read with pyarrow.

The driver lists a stage's shard files once, from the manifests (:func:`stage_files`: URI, domain, row count; nothing
is listed or sampled on storage). Each training worker then reads its own part straight from storage (local disk or
object storage, through the pipeline's :class:`orchestrator.storage.Storage`), row group by row group, on a thread
of its own process (:class:`WorkerShard`). Nothing passes through the driver or the Ray object store, and no other
process is started: on 2 cores, Ray Data's read tasks (one process each, plus its statistics actor) had stage 0 wait
6.3-7.2 s for its first batch (3.5-3.7 s without them) and slowed the epochs they overlapped (``bench_pipeline.py``).

A worker's part is an equal share of the stage's rows (``rows // world`` each, the last few dropped with several
workers, as DDP needs the same number of steps on every rank). ``training.shuffle`` picks how the order is mixed,
cheapest first:

- ``files``: the shard files of each domain in a seeded random order (several domains' files interleaved); each
  worker takes a contiguous run of that stream; rows keep their order within a file;
- ``local`` (default): as ``files``, plus a shuffle buffer of ``training.shuffle_buffer`` rows in each worker
  (``orchestrator.stage.local_shuffle``);
- ``full``: a seeded permutation of all the stage's rows; worker r takes positions ``[r n, (r + 1) n)`` of it. Each
  worker reads every file once and keeps its own rows, so its share is held in memory before its first batch.

Only ``files`` and ``local`` stream: memory stays at a row group per worker whatever the domain's size. Epochs after
the first that a worker keeps in memory are re-shuffled there (``stage.EpochCache``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import ShardError
from orchestrator.shards import shard_uris, verify_domain
from orchestrator.storage import Storage

ShuffleMode = Literal["files", "local", "full"]


@dataclass(frozen=True)
class ShardFile:
    """One training shard of a stage: its URI, the index of its domain in the stream, and its row count."""

    uri: str
    domain: int
    rows: int


def stage_files(domains: Sequence[tuple[str, Mapping[str, Any]]], indices: Sequence[int], shuffle: ShuffleMode,
                seed: int) -> tuple[ShardFile, ...]:
    """The train-split shard files of domains ``indices`` (``(uri, manifest)`` each, in stream order), in the order
    the stage streams them: seeded random per domain and interleaved across domains for ``files``/``local``, the
    manifests' order for ``full`` (its permutation is over rows)."""
    rng = np.random.default_rng(seed)
    files: list[ShardFile] = []
    for j in indices:
        uri, manifest = domains[j]
        uris = shard_uris(uri, manifest, "train")
        rows = [int(s["rows"]) for s in manifest["splits"]["train"]["shards"]]
        order = rng.permutation(len(uris)) if shuffle in ("files", "local") else range(len(uris))
        files += [ShardFile(uris[i], j, rows[i]) for i in order]
    if shuffle in ("files", "local") and len(indices) > 1:
        files = [files[i] for i in rng.permutation(len(files))]  # several domains (joint): interleave their files
    return tuple(files)


@dataclass(frozen=True)
class WorkerShard:
    """Worker ``rank``'s part of a stage's training data (see the module docstring), read where it runs.

    Attributes:
        files: the stage's shard files in stream order. columns: the columns read (``(features, label)``, or
            ``(features,)`` for text).
        storage: how to reach the URIs. rank, world: this worker and the number of workers.
        permutation_seed: for ``shuffle: full``, the seed of the permutation of all rows; None streams in file order.
    """

    files: tuple[ShardFile, ...]
    columns: tuple[str, ...]
    storage: Storage
    rank: int = 0
    world: int = 1
    permutation_seed: int | None = None

    @property
    def rows(self) -> int:
        """Rows this worker reads per pass: the stage's rows divided equally (rounded down)."""
        return sum(f.rows for f in self.files) // self.world

    def tables(self, chunk_rows: int) -> Iterator[pa.Table]:
        """One pass over this worker's rows as Arrow tables of exactly ``chunk_rows`` rows (the last one possibly
        fewer), with the feature and label columns and an int64 ``t`` (the domain index).

        Raises:
            ShardError: if a shard cannot be read or lacks a column (naming its URI).
        """
        if self.permutation_seed is None:
            start = self.rank * self.rows
            yield from _rechunk(self._read(start, start + self.rows), chunk_rows)
        else:
            yield from _rechunk(iter([self._permuted()]), chunk_rows)

    def _read(self, start: int, stop: int) -> Iterator[pa.Table]:
        """Rows ``[start, stop)`` of the stage's stream, row group by row group, tagged with their domain."""
        offset = 0
        for f in self.files:
            lo, hi = max(start, offset) - offset, min(stop, offset + f.rows) - offset
            offset += f.rows
            if lo >= hi:
                continue
            for table, at in self._row_groups(f):
                a, b = max(lo, at), min(hi, at + table.num_rows)
                if a < b:
                    part = table.slice(a - at, b - a)
                    yield part.append_column("t", pa.array(np.full(part.num_rows, f.domain, dtype=np.int64)))

    def _row_groups(self, f: ShardFile) -> Iterator[tuple[pa.Table, int]]:
        """``(row group, its first row)`` of one shard file, read one at a time; while object storage cannot be
        reached, the file is opened again and the row group read again (:meth:`Storage.retrying`)."""
        fs, path = self.storage.arrow(f.uri)
        reader: list[pq.ParquetFile] = []  # the open file, dropped when a read fails

        def group(i: int) -> pa.Table | int:
            try:
                if not reader:
                    reader.append(pq.ParquetFile(fs.open_input_file(path)))
                return reader[0].num_row_groups if i < 0 else reader[0].read_row_group(i, columns=list(self.columns))
            except BaseException:
                reader.clear()
                raise

        try:
            count, at = int(self.storage.retrying(f.uri, lambda: group(-1))), 0
            for i in range(count):
                table = self.storage.retrying(f.uri, lambda: group(i))
                assert isinstance(table, pa.Table)
                yield table, at
                at += table.num_rows
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"shard {f.uri}: {str(e).strip().splitlines()[0]}") from None

    def _permuted(self) -> pa.Table:
        """This worker's rows of the seeded permutation of all the stage's rows, in permutation order."""
        total = sum(f.rows for f in self.files)
        mine = np.random.default_rng(self.permutation_seed).permutation(total)[self.rank * self.rows:
                                                                             (self.rank + 1) * self.rows]
        wanted = np.sort(mine)
        kept, offset = [], 0
        for table in self._read(0, total):
            lo, hi = np.searchsorted(wanted, [offset, offset + table.num_rows])
            if hi > lo:
                kept.append(table.take(pa.array(wanted[lo:hi] - offset)))
            offset += table.num_rows
        if not kept:
            return pa.table({})
        rows = pa.concat_tables(kept)  # in stream order; put them in permutation order
        return rows.take(pa.array(np.searchsorted(wanted, mine)))


def _rechunk(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables``, in order, as tables of exactly ``rows`` rows (the last one possibly fewer)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= rows:
            merged = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            yield merged.slice(0, rows)
            rest = merged.slice(rows)
            pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_tables(pending) if len(pending) > 1 else pending[0]


def validate_domains(domains: Sequence[tuple[str, str, Mapping[str, Any]]], storage: Storage) -> None:
    """Re-hash every shard of every ``(name, uri, manifest)`` domain and check its schema and row count.

    Raises:
        ShardError: at the first fault, naming the domain and the shard.
    """
    for name, uri, manifest in domains:
        try:
            verify_domain(uri, manifest, storage=storage)
        except ShardError as e:
            raise ShardError(f"domain '{name}': {e}") from None
