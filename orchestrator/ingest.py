"""A stage's training data as a Ray Dataset: read the domains' shards, tag each row with its domain, shuffle.

Shards are streamed by Ray Data's Parquet reader from wherever they live (local disk or object storage, through the
pipeline's :class:`orchestrator.storage.Storage`) and are never collected on the driver. ``training.shuffle`` picks
how much the order is mixed, cheapest first:

- ``files``: the shard files of each domain in a seeded random order; rows keep their order within a file;
- ``local`` (default): as ``files``, plus a shuffle buffer of ``training.shuffle_buffer`` rows in each worker's
  batch iterator (``iter_torch_batches(local_shuffle_buffer_size=...)``, see ``orchestrator/stage.py``);
- ``full``: Ray Data's global ``random_shuffle`` of all rows (an all-to-all exchange: a full extra pass over the
  data before training).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import ray.data

from orchestrator.shards import shard_uris
from orchestrator.storage import Storage

ShuffleMode = Literal["files", "local", "full"]


class AddDomainColumn:
    """Ray Data map: append an int64 column ``t`` (the domain index) to an Arrow batch."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, table: pa.Table) -> pa.Table:
        """``[N]`` rows in, the same rows with ``t = index`` out."""
        return table.append_column("t", pa.array(np.full(table.num_rows, self.index, dtype=np.int64)))


@contextmanager
def _parquet_v1() -> Iterator[None]:
    """Build Parquet reads with Ray Data's first Parquet datasource (``DataContext.use_datasource_v2 = False``).

    The second one (default in Ray 2.60) lists files through a pool of ``FooterReader`` actors that it starts and
    kills on every execution: measured on 2 cores, 2-4 s per epoch of a 2-file domain, against 0.3-0.7 s for the
    first one, which reads the footers in the read tasks. The choice is made when the read is built, so the setting is
    restored right after.
    """
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def stage_dataset(domains: list[tuple[str, dict[str, Any]]], indices: list[int], shuffle: ShuffleMode, seed: int,
                  storage: Storage, num_cpus: float = 0.25) -> ray.data.Dataset:
    """The training rows of domains ``indices`` (``(uri, manifest)`` each, in stream order), tagged and shuffled.

    Args:
        shuffle: see the module docstring. seed: base seed of the file order and of the full shuffle.
        num_cpus: CPUs each read/map task reserves (fractional: Ray Train workers hold the rest).
    Returns:
        a lazy Dataset with the manifest's feature and label columns plus ``t`` (int64 domain index).
    """
    parts = []
    for j in indices:
        uri, manifest = domains[j]
        order = ray.data.FileShuffleConfig(seed=seed + j) if shuffle in ("files", "local") else None
        with _parquet_v1():
            read = ray.data.read_parquet(shard_uris(uri, manifest, "train"), filesystem=storage.ray_filesystem(uri),
                                         shuffle=order, num_cpus=num_cpus)
        parts.append(read.map_batches(AddDomainColumn(j), batch_format="pyarrow", num_cpus=num_cpus, batch_size=None))
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if shuffle == "full":
        dataset = dataset.random_shuffle(seed=seed)
    return dataset
