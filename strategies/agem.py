"""Averaged Gradient Episodic Memory (A-GEM).

Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019, §4, Eq. 11: an episodic memory keeps samples of
earlier tasks. At every step a reference gradient ``g_ref`` is computed on a random memory batch; if the proposed
gradient ``g`` would increase the average memory loss (``g . g_ref < 0``) it is projected:

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref

and left unchanged otherwise. The memory is split equally among the tasks seen so far (``buffer_size // k``
samples per task); each task's samples are a reservoir sample of its stream.

Distributed: ``after_backward`` runs after DDP's all-reduce, so ``g`` is the global gradient. Every worker holds the
same global memory and draws the reference batch with the same generator (seeded by seed, task and step, not by
rank), so ``g_ref`` and the projection are identical on every worker. ``g_ref`` is taken with
``torch.autograd.grad`` on the unwrapped model, which does not touch ``.grad`` or DDP's reducer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig
from strategies.buffer import Reservoir, local_capacity, merge


class AGEMConfig(StrategyConfig):
    """Parameters of :class:`AGEM`."""

    buffer_size: int = Field(1100, ge=1, description="episodic memory size, split equally among past tasks")
    sample_size: int = Field(256, ge=1, description="memory samples per reference gradient")


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """Eq. 11: project ``g`` (flat ``[P]``) so that it does not conflict with ``g_ref`` (flat ``[P]``).

    Returns ``g`` unchanged when ``g . g_ref >= 0``, else ``g - (g . g_ref / g_ref . g_ref) g_ref``.
    """
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - dot / torch.dot(g_ref, g_ref).clamp_min(1e-12) * g_ref


def write_flat_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat gradient ``[sum of numels]`` back into the ``.grad`` of ``params``, in order."""
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def balance_memory(old: dict[str, Any] | None, new: dict[str, Any] | None, capacity: int) -> dict[str, Any] | None:
    """Memory of ``old`` plus ``new`` with an equal share (``capacity // tasks``) for every task id in ``t``."""
    parts = [p for p in (old, new) if p]
    if not parts:
        return None
    fields = [k for k in parts[0] if k != "n_seen"]
    cat = {k: torch.cat([p[k] for p in parts]) for k in fields}
    tasks = sorted(set(cat["t"].tolist()))
    quota = capacity // len(tasks)
    keep = torch.cat([(cat["t"] == task).nonzero().flatten()[:quota] for task in tasks])
    return {**{k: v[keep] for k, v in cat.items()}, "n_seen": sum(p["n_seen"] for p in parts)}


class AGEM(Strategy):
    """A-GEM: project the gradient when it conflicts with the episodic memory's average gradient."""

    name = "agem"
    Config = AGEMConfig

    def __init__(self, config: AGEMConfig) -> None:
        super().__init__(config)
        self.config: AGEMConfig = config
        self.memory: dict[str, Any] | None = None  # global memory of earlier tasks, identical on all workers
        self.current = Reservoir(config.buffer_size, np.random.default_rng(0))
        self.projected = 0

    def before_task(self, ctx: StageContext) -> None:
        """Start a reservoir for this task's samples (this worker's share of the task's quota)."""
        quota = self.config.buffer_size // (ctx.task_id + 1)
        rng = np.random.default_rng([ctx.seed, ctx.task_id, ctx.rank, 41])
        self.current = Reservoir(local_capacity(quota, ctx.world_size), rng)
        self.projected = 0

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Offer the new samples to this task's reservoir (first epoch only); the batch is unchanged."""
        if ctx.epoch == 0:
            self.current.insert({"x": batch.x, "y": batch.y, "t": batch.t})
        return batch

    def after_backward(self, ctx: StageContext) -> None:
        """Replace the all-reduced gradient by its projection against the memory's reference gradient."""
        if not self.memory:
            return
        g = torch.Generator().manual_seed(hash((ctx.seed, ctx.task_id, ctx.step, 41)) & 0x7FFF_FFFF)
        idx = torch.randperm(len(self.memory["y"]), generator=g)[: self.config.sample_size]  # a random subset
        ref = Batch.from_fields(self.memory).select(idx).to(ctx.device)
        params = [p for p in ctx.model.parameters() if p.requires_grad and p.grad is not None]
        ref_loss = ctx.criterion(ctx.model(ref.x), ref)
        g_ref = torch.cat([r.flatten() for r in torch.autograd.grad(ref_loss, params, allow_unused=True,
                                                                    materialize_grads=True)])
        flat = torch.cat([p.grad.flatten() for p in params])
        new = agem_project(flat, g_ref)
        if new is not flat:
            self.projected += 1
            write_flat_grad(params, new)

    def after_task(self, ctx: StageContext) -> None:
        """Add this task's samples (gathered from all workers) to the memory, rebalancing the per-task quotas."""
        quota = self.config.buffer_size // (ctx.task_id + 1)
        new = merge(ctx.all_gather_object(self.current.local()), quota)
        self.memory = balance_memory(self.memory, new, self.config.buffer_size)

    def stage_state_dict(self) -> dict[str, Any]:
        """This worker's reservoir of the current task's samples."""
        return {"current": self.current.stage_state()}

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the current task's reservoir of an in-stage checkpoint."""
        if state:
            self.current = Reservoir.from_stage_state(state["current"])

    def state_dict(self) -> dict[str, Any]:
        """The episodic memory: ``x``, ``y``, ``t`` tensors and ``n_seen``."""
        return dict(self.memory) if self.memory else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the episodic memory of earlier tasks."""
        self.memory = dict(state) if state else None
