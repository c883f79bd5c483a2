"""Dark Experience Replay++ (DER++).

Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020, §3,
Eq. 6: a reservoir buffer keeps each seen sample with its label *and* the logits the model produced for it; every
step adds, for two independent buffer batches,

    alpha * MSE(f(x'), z')  +  beta * CE(f(x''), y'')

to the cross-entropy on the new batch. Samples are offered to the reservoir at every step with the logits of that
step (as in the authors' code, Mammoth ``models/derpp.py``).

Hook use: ``train_batch`` appends the two buffer batches to the new batch so one forward pass (one DDP forward)
serves all three terms; ``loss`` restricts the ``ce`` term to the new samples and adds ``derpp.mse`` and
``derpp.ce`` on the two buffer slices (terms other strategies add or scale are kept). Distributed and ``storage``: as replay
(``strategies/buffer.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy
from strategies.buffer import Reservoir, SharedBuffer, local_capacity, restore_sampler, sampler_state
from strategies.replay import RehearsalConfig


class DERPPConfig(RehearsalConfig):
    """Parameters of :class:`DERPP` (``buffer_size`` samples are kept with their logits)."""

    alpha: float = Field(0.5, ge=0.0, description="weight of the logit MSE term")
    beta: float = Field(0.5, ge=0.0, description="weight of the buffer cross-entropy term")
    replay_batch: int | None = Field(None, ge=1, description="samples per buffer batch (default: the batch size)")


def derpp_terms(outputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``MSE(outputs, logits)`` averaged over all elements (``[m, K]`` each); the dark-knowledge term of Eq. 6."""
    return torch.nn.functional.mse_loss(outputs, logits)


class DERPP(Strategy):
    """DER++: replay of labels and stored logits."""

    name = "derpp"
    Config = DERPPConfig

    def __init__(self, config: DERPPConfig) -> None:
        super().__init__(config)
        self.config: DERPPConfig = config
        self.shared = SharedBuffer(config.storage)
        self.buffer = Reservoir(config.buffer_size, np.random.default_rng(0))
        self.n_new = 0
        self.drawn: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})

    def before_task(self, ctx: StageContext) -> None:
        """Take this worker's part of the global buffer and seed the RNGs."""
        rng = np.random.default_rng([ctx.seed, ctx.task_id, ctx.rank, 29])
        self.buffer = self.shared.worker_part(ctx, local_capacity(self.config.buffer_size, ctx.world_size), rng)
        self.torch_rng = ctx.generator(salt=29)

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Append two independent buffer batches (for the MSE and the CE terms) after the current batch."""
        self.n_new = len(batch)
        m = self.config.replay_batch or len(batch)
        self.drawn = (self.buffer.sample(m, self.torch_rng), self.buffer.sample(m, self.torch_rng))
        out = batch
        for d in self.drawn:
            if d:
                out = out.cat(Batch.from_fields(d).to(batch.x.device))
        return out

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Restrict ``ce`` to the new samples and add ``derpp.mse`` = ``alpha * MSE(f(x'), z')`` and ``derpp.ce`` =
        ``beta * CE(f(x''), y'')``; store the new samples with their logits."""
        n = self.n_new
        head = batch.select(slice(0, n))
        terms.replace("ce", ctx.criterion(outputs[:n], head))
        first, _ = self.drawn
        if first:
            m = len(first["y"])
            logits = first["logits"].to(outputs.device)
            terms.add("derpp.mse", self.config.alpha * derpp_terms(outputs[n:n + m], logits))
            sl = slice(n + m, n + 2 * m)
            terms.add("derpp.ce", self.config.beta * ctx.criterion(outputs[sl], batch.select(sl)))
        self.buffer.insert({"x": head.x, "y": head.y, "t": head.t, "logits": outputs[:n].detach()})

    def after_task(self, ctx: StageContext) -> None:
        """Merge the workers' reservoirs into one global buffer of at most ``buffer_size`` samples."""
        self.shared.commit(ctx, self.buffer, self.config.buffer_size, self.name)

    def stage_state_dict(self) -> dict[str, Any]:
        """This worker's reservoir (samples with their logits) and the sampler's random state."""
        return sampler_state(self.buffer, self.torch_rng)

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the reservoir and the sampler's random state of an in-stage checkpoint."""
        if state:
            self.buffer = restore_sampler(state, self.torch_rng)

    def state_dict(self) -> dict[str, Any]:
        """The global buffer (:meth:`SharedBuffer.state_dict`), with ``logits`` ``[N, K]`` beside ``x``, ``y``, ``t``."""
        return self.shared.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the global buffer saved by the previous stage."""
        self.shared.load_state_dict(state)
