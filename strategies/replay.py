"""Experience replay with a reservoir buffer and a per-batch replay ratio.

The buffer holds at most ``buffer_size`` samples chosen by reservoir sampling over the stream of training samples, as
in the experience replay (ER) of Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019, §3. Each
sample enters the reservoir once per stage (during the first epoch).

Replay ratio: ``ratio`` is the fraction of each training batch drawn from the buffer. With ``B`` new samples per
step, ``m = round(B * ratio / (1 - ratio))`` buffer samples are appended, so a batch of ``B + m`` samples holds
``m / (B + m) = ratio`` replayed samples and the number of steps per epoch stays that of finetuning.

Distributed: see ``strategies/buffer.py``; every worker ends the stage with the same global buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig
from strategies.buffer import Reservoir, local_capacity, merge


class ReplayConfig(StrategyConfig):
    """Parameters of :class:`Replay`."""

    buffer_size: int = Field(1100, ge=1, description="samples kept in the replay buffer")
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each batch drawn from the buffer")


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
        self.buffer = Reservoir(config.buffer_size, np.random.default_rng(0))

    @property
    def size(self) -> int:
        """Samples in this worker's buffer."""
        return self.buffer.size

    def before_task(self, ctx: StageContext) -> None:
        """Take this worker's part (``rank::world_size``) of the global buffer and seed the RNGs."""
        rng = np.random.default_rng([ctx.seed, ctx.task_id, ctx.rank, 17])
        self.buffer = Reservoir.from_global(self.global_state, ctx.rank, ctx.world_size,
                                            local_capacity(self.config.buffer_size, ctx.world_size), rng)
        self.torch_rng = ctx.generator(salt=17)

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Append ``replay_count(B, ratio)`` buffer samples, then (first epoch only) offer the new samples."""
        drawn = self.buffer.sample(replay_count(len(batch), self.config.ratio), self.torch_rng)
        mixed = batch
        if drawn:
            dev = batch.x.device
            mixed = batch.cat(Batch(drawn["x"].to(dev), drawn["y"].to(dev), drawn["t"].to(dev)))
        if ctx.epoch == 0:
            self.buffer.insert({"x": batch.x, "y": batch.y, "t": batch.t})
        return mixed

    def after_task(self, ctx: StageContext) -> None:
        """Merge the workers' reservoirs into one global buffer of at most ``buffer_size`` samples."""
        self.global_state = merge(ctx.all_gather_object(self.buffer.local()), self.config.buffer_size)

    def state_dict(self) -> dict[str, Any]:
        """The global buffer: ``x`` ``[N, *input_shape]`` float32, ``y`` ``[N]``, ``t`` ``[N]``, ``n_seen`` (int)."""
        return dict(self.global_state) if self.global_state else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global buffer saved by the previous stage."""
        self.global_state = dict(state) if state else None
