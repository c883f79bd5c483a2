"""A reservoir buffer of named tensor fields, consistent across Ray Train workers.

Reservoir sampling is Vitter's Algorithm R (1985): after n items, each is in a buffer of capacity C with probability
C/n. With W workers each worker keeps a reservoir of ``ceil(C / W)`` over its own shard of the stream;
:func:`merge` concatenates the gathered local reservoirs (rank order) into one global buffer of at most C samples,
and :meth:`Reservoir.from_global` gives worker r the slice ``r::W`` of it at the next stage.

The global buffer is a dict of tensors with equal first dimension (always ``x`` ``[N, *input_shape]``, ``y``
``[N]``, ``t`` ``[N]``; DER++ adds ``logits`` ``[N, K]``) plus ``n_seen`` (int, items offered so far).

:class:`SharedBuffer` keeps that global buffer between stages, either inside the strategy state (``memory``: it
travels in the stage checkpoint) or as Parquet part files on the pipeline's storage (``parquet``): each worker writes
its own part, the checkpoint holds only the list of parts, and no process ever holds the whole buffer, so it can grow
past what the driver, rank 0 or the checkpoint could carry (the workers together still hold it during a stage).
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from strategies.base import ObjectStore, StageContext


def reservoir_update(n_seen: int, size: int, capacity: int, batch_len: int,
                     rng: np.random.Generator) -> tuple[list[tuple[int, int]], int, int]:
    """Reservoir sampling (Algorithm R) for a batch of new items.

    Args:
        n_seen: items seen before this batch. size: items in the buffer now. capacity: buffer capacity.
        batch_len: items in the batch. rng: random source.
    Returns:
        ``(writes, n_seen', size')`` where ``writes`` lists ``(slot, batch_index)`` pairs to apply in order
        (a later write to the same slot wins, exactly as sequential insertion would).
    """
    writes = []
    for i in range(batch_len):
        n_seen += 1
        if size < capacity:
            writes.append((size, i))
            size += 1
        else:
            j = int(rng.integers(0, n_seen))
            if j < capacity:
                writes.append((j, i))
    return writes, n_seen, size


class Reservoir:
    """One worker's reservoir of named tensor fields.

    Args:
        capacity: samples this worker keeps. rng: the worker's random source for slot choice.
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = capacity, rng
        self.fields: dict[str, torch.Tensor] = {}
        self.size = 0
        self.n_seen = 0

    @classmethod
    def from_global(cls, state: dict[str, Any] | None, rank: int, world: int, capacity: int,
                    rng: np.random.Generator) -> Reservoir:
        """This worker's part (``rank::world``) of a global buffer, as a reservoir of ``capacity``."""
        if not state or not len(state["y"]):
            return cls(capacity, rng)
        part = {k: v[rank::world] for k, v in state.items() if isinstance(v, torch.Tensor)}
        return cls.from_rows(part, state["n_seen"] // world, capacity, rng)

    @classmethod
    def from_rows(cls, rows: dict[str, torch.Tensor], n_seen: int, capacity: int,
                  rng: np.random.Generator) -> Reservoir:
        """A reservoir of ``capacity`` holding the first ``capacity`` of ``rows`` (``{field: [N, ...]}``)."""
        res = cls(capacity, rng)
        if rows and len(rows["y"]):
            part = {k: v[:capacity] for k, v in rows.items()}
            res._allocate(part)
            res.size = len(part["y"])
            for k, v in part.items():
                res.fields[k][: res.size] = v
        res.n_seen = n_seen
        return res

    def _allocate(self, like: dict[str, torch.Tensor]) -> None:
        self.fields = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in like.items()}

    def insert(self, items: dict[str, torch.Tensor]) -> None:
        """Offer a batch of items (``{field: [B, ...]}``) to the reservoir."""
        if not self.fields:
            self._allocate(items)
        n = len(next(iter(items.values())))
        writes, self.n_seen, self.size = reservoir_update(self.n_seen, self.size, self.capacity, n, self.rng)
        if writes:
            last = dict(writes)  # slot -> batch row; a later write to the same slot wins
            slots, rows = torch.tensor(list(last)), torch.tensor(list(last.values()))
            for k, v in items.items():
                self.fields[k][slots] = v[rows].detach().cpu()

    def sample(self, m: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``m`` items drawn uniformly with replacement (``{field: [m, ...]}``); empty dict if the buffer is empty."""
        if self.size == 0 or m <= 0:
            return {}
        idx = torch.randint(0, self.size, (m,), generator=generator)
        return {k: v[idx] for k, v in self.fields.items()}

    def stage_state(self) -> dict[str, Any]:
        """Everything this reservoir holds, its random source included, for an in-stage checkpoint
        (:meth:`from_stage_state` rebuilds it)."""
        return {"fields": {k: v[: self.size].clone() for k, v in self.fields.items()}, "size": self.size,
                "n_seen": self.n_seen, "capacity": self.capacity, "rng": self.rng.bit_generator.state}

    @classmethod
    def from_stage_state(cls, state: dict[str, Any]) -> Reservoir:
        """The reservoir :meth:`stage_state` described."""
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        return cls.from_rows(dict(state["fields"]), int(state["n_seen"]), int(state["capacity"]), rng)

    def local(self) -> dict[str, Any]:
        """This worker's items and count, to be gathered by :func:`merge`."""
        return {**{k: v[: self.size].clone() for k, v in self.fields.items()}, "n_seen": self.n_seen}


def sampler_state(buffer: Reservoir, generator: torch.Generator) -> dict[str, Any]:
    """A rehearsal strategy's in-stage state: this worker's reservoir and its sampler's random state."""
    return {"buffer": buffer.stage_state(), "torch_rng": generator.get_state()}


def restore_sampler(state: dict[str, Any], generator: torch.Generator) -> Reservoir:
    """Set ``generator`` to the random state :func:`sampler_state` kept and return its reservoir."""
    generator.set_state(state["torch_rng"])
    return Reservoir.from_stage_state(state["buffer"])


def merge(parts: list[dict[str, Any]], capacity: int) -> dict[str, Any] | None:
    """Merge gathered local reservoirs (rank order) into a global buffer of at most ``capacity`` items."""
    full = [p for p in parts if "y" in p and len(p["y"])]
    if not full:
        return None
    out: dict[str, Any] = {k: torch.cat([p[k] for p in full])[:capacity] for k in full[0] if k != "n_seen"}
    out["n_seen"] = sum(p["n_seen"] for p in parts)
    return out


def local_capacity(total: int, world: int) -> int:
    """Per-worker capacity so that W local reservoirs hold at least ``total`` items together."""
    return math.ceil(total / world)


# ---------------------------------------------------------------- the global buffer between stages

def fields_to_table(fields: dict[str, torch.Tensor]) -> pa.Table:
    """Tensors ``{field: [N, ...]}`` as an Arrow table: 1-D fields as columns, others as fixed-size lists of their
    flattened rows, with the row shape in the field metadata."""
    columns, schema = [], []
    for name, v in fields.items():
        flat = v.detach().cpu().reshape(len(v), -1).numpy()
        shape = ",".join(str(d) for d in v.shape[1:])
        if v.dim() == 1:
            arr = pa.array(v.detach().cpu().numpy())
        else:
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
        columns.append(arr)
        schema.append(pa.field(name, arr.type, metadata={"shape": shape}))
    return pa.Table.from_arrays(columns, schema=pa.schema(schema))


def table_to_fields(table: pa.Table) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fields_to_table`."""
    out = {}
    for field, col in zip(table.schema, table.columns):
        shape = [int(d) for d in (field.metadata or {}).get(b"shape", b"").decode().split(",") if d]
        arr = col.combine_chunks()
        values = arr.flatten().to_numpy(zero_copy_only=False) if shape else arr.to_numpy(zero_copy_only=False)
        out[field.name] = torch.from_numpy(np.array(values).reshape(len(table), *shape))  # a writable copy
    return out


def write_part(store: ObjectStore, folder: str, rank: int, fields: dict[str, torch.Tensor]) -> str:
    """Write one worker's buffer part to ``<folder>/part-<rank>.parquet`` atomically (``store.write_bytes``: a
    temporary key, then a move) and return its URI.

    Args:
        store: the pipeline's storage (``StageContext.store``).
    Raises:
        FileExistsError: if the part already exists (parts are never overwritten).
    """
    uri = f"{folder.rstrip('/')}/part-{rank:05d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(fields_to_table(fields), sink)
    try:
        store.write_bytes(uri, sink.getvalue().to_pybytes())
    except FileExistsError:
        raise FileExistsError(f"buffer part {uri} already exists") from None
    return uri


def read_part(store: ObjectStore, uri: str) -> dict[str, torch.Tensor]:
    """Read a part written by :func:`write_part`.

    Raises:
        OSError: if the part is missing or unreadable (the message names it).
    """
    try:
        return table_to_fields(pq.read_table(pa.BufferReader(store.read_bytes(uri))))
    except Exception as e:  # noqa: BLE001 - the store's own error (missing, unreachable) or a corrupt file
        raise OSError(f"replay buffer part {uri} cannot be read: {e}") from None


class SharedBuffer:
    """The global buffer of a rehearsal strategy between stages.

    Args:
        storage: ``memory`` (the merged buffer is the strategy state and travels in the checkpoint) or ``parquet``
            (each worker writes its part under ``StageContext.state_uri``; the state is ``{"parts": [{"uri", "rows"}],
            "n_seen"}``).

    Either way, worker r of W works on the rows ``r::W`` of the global buffer (parts concatenated in order), so a
    stage sees the same buffer with both storages.
    """

    def __init__(self, storage: Literal["memory", "parquet"] = "memory") -> None:
        self.storage = storage
        self.state: dict[str, Any] | None = None

    def __len__(self) -> int:
        """Samples in the global buffer."""
        if not self.state:
            return 0
        if "parts" in self.state:
            return sum(p["rows"] for p in self.state["parts"])
        return len(self.state["y"])

    def worker_part(self, ctx: StageContext, capacity: int | None, rng: np.random.Generator) -> Reservoir:
        """This worker's rows ``rank::world`` of the global buffer as a reservoir of ``capacity`` (None: all of
        them, with no room to grow)."""
        total = len(self)
        cap = capacity if capacity is not None else -(-total // ctx.world_size)
        if not self.state or "parts" not in self.state:
            return Reservoir.from_global(self.state, ctx.rank, ctx.world_size, cap, rng)
        rows: list[dict[str, torch.Tensor]] = []
        offset = 0
        for part in self.state["parts"]:
            first = (ctx.rank - offset) % ctx.world_size  # first local row whose global index is rank (mod world)
            if first < part["rows"]:
                fields = read_part(ctx.store, part["uri"])
                rows.append({k: v[first::ctx.world_size] for k, v in fields.items()})
            offset += part["rows"]
        merged = {k: torch.cat([r[k] for r in rows]) for k in rows[0]} if rows else {}
        return Reservoir.from_rows(merged, self.state["n_seen"] // ctx.world_size, cap, rng)

    def commit(self, ctx: StageContext, reservoir: Reservoir, capacity: int, name: str, append: bool = False) -> None:
        """End of stage: the workers' reservoirs (gathered in rank order, at most ``capacity`` samples) become the
        global buffer, or are appended to it (``append``). Collective: every worker calls it.

        Raises:
            ValueError: for ``parquet`` storage without ``StageContext.state_uri``.
        """
        if self.storage == "memory":
            new = merge(ctx.all_gather_object(reservoir.local()), capacity)
            parts = [p for p in (self.state if append else None, new) if p]
            self.state = merge(parts, sum(len(p["y"]) for p in parts)) if parts else None
            return
        if ctx.state_uri is None:
            raise ValueError(f"{name}: storage 'parquet' needs the stage's state folder (StageContext.state_uri)")
        token = uuid.uuid4().hex[:12]
        info = ctx.all_gather_object((reservoir.size, reservoir.n_seen, token))
        before = sum(size for size, _, _ in info[: ctx.rank])
        keep = max(0, min(reservoir.size, capacity - before))
        folder = f"{ctx.state_uri.rstrip('/')}/{name}-{info[0][2]}"
        mine = None
        if keep:
            local = reservoir.local()
            kept = {k: v[:keep] for k, v in local.items() if k != "n_seen"}
            mine = {"uri": write_part(ctx.store, folder, ctx.rank, kept), "rows": keep}
        new_parts = [p for p in ctx.all_gather_object(mine) if p]
        old = self.state if append and self.state else {"parts": [], "n_seen": 0}
        self.state = {"parts": old["parts"] + new_parts, "n_seen": old["n_seen"] + sum(n for _, n, _ in info)}

    def state_dict(self) -> dict[str, Any]:
        """``memory``: the merged buffer (``x``, ``y``, ``t``[, ``logits``], ``n_seen``); ``parquet``: ``parts`` and
        ``n_seen``; ``{}`` when empty."""
        return dict(self.state) if self.state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (either storage)."""
        self.state = dict(state) if state else None
