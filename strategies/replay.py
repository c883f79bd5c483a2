"""Experience replay with a reservoir buffer and a per-batch replay ratio.

The buffer holds at most ``buffer_size`` samples chosen by reservoir sampling (Vitter 1985, Algorithm R) over the
stream of training samples, as in the experience replay (ER) of Chaudhry et al., "On Tiny Episodic Memories in
Continual Learning", 2019, §3. Each sample enters the reservoir once per stage (during the first epoch).

Replay ratio: ``ratio`` is the fraction of each training batch drawn from the buffer. With ``B`` new samples per
step, ``m = round(B * ratio / (1 - ratio))`` buffer samples are appended, so a batch of ``B + m`` samples holds
``m / (B + m) = ratio`` replayed samples and the number of steps per epoch stays that of finetuning.

Distributed: with W workers each worker keeps a reservoir of ``ceil(buffer_size / W)`` over its own shard of the
stream and replays from it. ``after_task`` all-gathers the local reservoirs into one global buffer, identical on
every worker, which is what the checkpoint stores; the next stage gives worker r the samples ``r::W``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig


class ReplayConfig(StrategyConfig):
    """Parameters of :class:`Replay`."""

    buffer_size: int = Field(1100, ge=1, description="samples kept in the replay buffer")
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each batch drawn from the buffer")


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


def replay_count(batch_size: int, ratio: float) -> int:
    """Buffer samples to append to ``batch_size`` new ones so that they form ``ratio`` of the batch."""
    return round(batch_size * ratio / (1.0 - ratio))


class Replay(Strategy):
    """Reservoir replay buffer mixed into every batch at a fixed ratio."""

    name = "replay"
    Config = ReplayConfig

    def __init__(self, config: ReplayConfig) -> None:
        super().__init__(config)
        self.config: ReplayConfig = config
        self.global_state: dict[str, Any] | None = None  # the merged buffer from the previous stage
        self.x: torch.Tensor | None = None  # local buffer [capacity, *input_shape]
        self.y = torch.empty(0, dtype=torch.long)
        self.t = torch.empty(0, dtype=torch.long)
        self.size = 0
        self.n_seen = 0
        self.capacity = config.buffer_size
        self.rng: np.random.Generator = np.random.default_rng(0)
        self.torch_rng = torch.Generator()

    def before_task(self, ctx: StageContext) -> None:
        """Take this worker's part (``rank::world_size``) of the global buffer and seed the RNGs."""
        self.capacity = math.ceil(self.config.buffer_size / ctx.world_size)
        self.rng = np.random.default_rng([ctx.seed, ctx.task_id, ctx.rank, 17])
        self.torch_rng = ctx.generator(salt=17)
        self.x, self.size, self.n_seen = None, 0, 0
        if self.global_state and self.global_state["y"].numel():
            g = self.global_state
            part = slice(ctx.rank, None, ctx.world_size)
            x, y, t = g["x"][part], g["y"][part], g["t"][part]
            self._allocate(x.shape[1:], x.dtype)
            self.size = min(len(y), self.capacity)
            n = self.size
            self.x[:n], self.y[:n], self.t[:n] = x[:n], y[:n], t[:n]
            self.n_seen = g["n_seen"] // ctx.world_size

    def _allocate(self, shape: torch.Size, dtype: torch.dtype) -> None:
        self.x = torch.zeros((self.capacity, *shape), dtype=dtype)
        self.y = torch.zeros(self.capacity, dtype=torch.long)
        self.t = torch.zeros(self.capacity, dtype=torch.long)

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Append ``replay_count(B, ratio)`` buffer samples, then (first epoch only) offer the new samples."""
        mixed = batch
        m = replay_count(len(batch), self.config.ratio)
        if self.size > 0 and m > 0:
            idx = torch.randint(0, self.size, (m,), generator=self.torch_rng)
            mixed = batch.cat(Batch(self.x[idx].to(batch.x.device), self.y[idx].to(batch.y.device),
                                    self.t[idx].to(batch.t.device)))
        if ctx.epoch == 0:
            self._insert(batch)
        return mixed

    def _insert(self, batch: Batch) -> None:
        if self.x is None:
            self._allocate(batch.x.shape[1:], batch.x.dtype)
        writes, self.n_seen, self.size = reservoir_update(self.n_seen, self.size, self.capacity, len(batch), self.rng)
        if writes:
            last = dict(writes)  # slot -> batch row; a later write to the same slot wins, as in sequential insertion
            slots, rows = torch.tensor(list(last)), torch.tensor(list(last.values()))
            self.x[slots] = batch.x[rows].detach().cpu()
            self.y[slots] = batch.y[rows].cpu()
            self.t[slots] = batch.t[rows].cpu()

    def after_task(self, ctx: StageContext) -> None:
        """Merge the workers' reservoirs into one global buffer of at most ``buffer_size`` samples."""
        local = {"x": self.x[: self.size].clone() if self.x is not None else None,
                 "y": self.y[: self.size].clone(), "t": self.t[: self.size].clone(), "n_seen": self.n_seen}
        gathered = ctx.all_gather_object(local)
        parts = [p for p in gathered if p["x"] is not None and len(p["y"])]
        if not parts:
            self.global_state = None
            return
        cap = self.config.buffer_size
        self.global_state = {
            "x": torch.cat([p["x"] for p in parts])[:cap],
            "y": torch.cat([p["y"] for p in parts])[:cap],
            "t": torch.cat([p["t"] for p in parts])[:cap],
            "n_seen": sum(p["n_seen"] for p in gathered),
        }

    def state_dict(self) -> dict[str, Any]:
        """The global buffer: ``x`` ``[N, *input_shape]`` float32, ``y`` ``[N]``, ``t`` ``[N]``, ``n_seen`` (int)."""
        return dict(self.global_state) if self.global_state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global buffer saved by the previous stage."""
        self.global_state = dict(state) if state else None
