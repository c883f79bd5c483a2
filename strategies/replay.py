"""Experience replay with a reservoir buffer and a per-batch replay ratio.

The buffer holds at most ``buffer_size`` samples chosen by reservoir sampling over the stream of training samples, as
in the experience replay (ER) of Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019, §3. Each
sample enters the reservoir once per stage (during the first epoch).

Replay ratio: ``ratio`` is the fraction of each training batch drawn from the buffer. With ``B`` new samples per
step, ``m = round(B * ratio / (1 - ratio))`` buffer samples are appended, so a batch of ``B + m`` samples holds
``m / (B + m) = ratio`` replayed samples and the number of steps per epoch stays that of finetuning.

Replay by fraction: with ``fraction`` (e.g. 0.01, the 1% rehearsal of Scialom et al., "Fine-tuned Language Models
are Continual Learners", EMNLP 2022, §3), each domain leaves a reservoir sample of ``fraction`` of its training samples
in the buffer, which therefore grows with the stream; replayed samples are drawn from all of it.

Storage: ``storage: parquet`` keeps the buffer as Parquet parts on the pipeline's storage instead of in the stage
checkpoint (:class:`strategies.buffer.SharedBuffer`), for buffers too large to carry in one process.

Distributed: see ``strategies/buffer.py``; every worker ends the stage with the same global buffer.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig
from strategies.buffer import Reservoir, SharedBuffer, local_capacity, restore_sampler, sampler_state


class RehearsalConfig(StrategyConfig):
    """Buffer parameters shared by the rehearsal strategies (replay, DER++)."""

    buffer_size: int = Field(1100, ge=1, description="samples kept in the replay buffer")
    storage: Literal["memory", "parquet"] = Field(
        "memory", description="keep the buffer in the stage checkpoint, or as Parquet parts on the pipeline's storage")


class ReplayConfig(RehearsalConfig):
    """Parameters of :class:`Replay`: a fixed ``buffer_size``, or a ``fraction`` of every domain's samples."""

    fraction: float | None = Field(None, gt=0.0, le=1.0, description="keep this share of every domain's training "
                                   "samples instead (the buffer grows with the stream); overrides buffer_size")
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each batch drawn from the buffer")


def fraction_quota(rows: int, fraction: float) -> int:
    """Samples a domain of ``rows`` training samples contributes to a ``fraction`` buffer (at least 1)."""
    return max(1, round(rows * fraction))


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
        self.shared = SharedBuffer(config.storage)  # the global buffer from the previous stage
        self.buffer = Reservoir(config.buffer_size, np.random.default_rng(0))
        self.kept = Reservoir(0, np.random.default_rng(0))  # fraction mode: the earlier domains' samples
        self.quota = 0

    @property
    def size(self) -> int:
        """Samples in this worker's buffer."""
        return self.buffer.size

    def before_task(self, ctx: StageContext) -> None:
        """Take this worker's part (``rank::world_size``) of the global buffer and seed the RNGs.

        With ``fraction``, the earlier domains' samples stay whole (``self.kept``) and a fresh reservoir collects
        ``fraction`` of this domain's samples.
        """
        rng = np.random.default_rng([ctx.seed, ctx.task_id, ctx.rank, 17])
        self.torch_rng = ctx.generator(salt=17)
        if self.config.fraction is None:
            self.buffer = self.shared.worker_part(ctx, local_capacity(self.config.buffer_size, ctx.world_size), rng)
            return
        if not ctx.rows_per_epoch:
            raise ValueError("replay.fraction needs the stage's row count (StageContext.rows_per_epoch)")
        self.quota = fraction_quota(ctx.rows_per_epoch, self.config.fraction)
        self.kept = self.shared.worker_part(ctx, None, rng)
        self.buffer = Reservoir(local_capacity(self.quota, ctx.world_size), rng)

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Append ``replay_count(B, ratio)`` buffer samples, then (first epoch only) offer the new samples."""
        m = replay_count(len(batch), self.config.ratio)
        drawn = self.buffer.sample(m, self.torch_rng) if self.config.fraction is None else self._sample_all(m)
        mixed = batch
        if drawn:
            mixed = batch.cat(Batch.from_fields(drawn).to(batch.x.device))
        if ctx.epoch == 0:
            self.buffer.insert({"x": batch.x, "y": batch.y, "t": batch.t})
        return mixed

    def _sample_all(self, m: int) -> dict[str, Any]:
        """Draw from the earlier domains' samples and this domain's reservoir, in proportion to their sizes."""
        total = self.kept.size + self.buffer.size
        if total == 0 or m <= 0:
            return {}
        from_old = int(torch.binomial(torch.tensor(float(m)), torch.tensor(self.kept.size / total),
                                      generator=self.torch_rng))
        parts = [p for p in (self.kept.sample(from_old, self.torch_rng), self.buffer.sample(m - from_old,
                                                                                             self.torch_rng)) if p]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def after_task(self, ctx: StageContext) -> None:
        """Merge the workers' reservoirs into one global buffer: at most ``buffer_size`` samples, or (``fraction``)
        the earlier domains' samples plus ``fraction`` of this domain's."""
        if self.config.fraction is None:
            self.shared.commit(ctx, self.buffer, self.config.buffer_size, self.name)
        else:
            self.shared.commit(ctx, self.buffer, self.quota, self.name, append=True)

    def stage_state_dict(self) -> dict[str, Any]:
        """This worker's reservoir of the current domain and the sampler's random state."""
        return sampler_state(self.buffer, self.torch_rng)

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the reservoir and the sampler's random state of an in-stage checkpoint."""
        if state:
            self.buffer = restore_sampler(state, self.torch_rng)

    def state_dict(self) -> dict[str, Any]:
        """The global buffer (:meth:`SharedBuffer.state_dict`): with ``memory`` storage ``x`` ``[N, *input_shape]``
        float32, ``y`` ``[N]``, ``t`` ``[N]``, ``n_seen`` (int); with ``parquet`` the list of parts."""
        return self.shared.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global buffer saved by the previous stage."""
        self.shared.load_state_dict(state)
