"""A reservoir buffer of named tensor fields, consistent across Ray Train workers.

Reservoir sampling is Vitter's Algorithm R (1985): after n items, each is in a buffer of capacity C with probability
C/n. With W workers each worker keeps a reservoir of ``ceil(C / W)`` over its own shard of the stream;
:func:`merge` concatenates the gathered local reservoirs (rank order) into one global buffer of at most C samples,
and :meth:`Reservoir.from_global` gives worker r the slice ``r::W`` of it at the next stage.

The global buffer is a dict of tensors with equal first dimension (always ``x`` ``[N, *input_shape]``, ``y``
``[N]``, ``t`` ``[N]``; DER++ adds ``logits`` ``[N, K]``) plus ``n_seen`` (int, items offered so far).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


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
        res = cls(capacity, rng)
        if state and len(state["y"]):
            part = {k: v[rank::world][:capacity] for k, v in state.items() if isinstance(v, torch.Tensor)}
            res._allocate(part)
            res.size = len(part["y"])
            for k, v in part.items():
                res.fields[k][: res.size] = v
            res.n_seen = state["n_seen"] // world
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

    def local(self) -> dict[str, Any]:
        """This worker's items and count, to be gathered by :func:`merge`."""
        return {**{k: v[: self.size].clone() for k, v in self.fields.items()}, "n_seen": self.n_seen}


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
