"""Elastic Weight Consolidation (EWC) with a diagonal Fisher, and its online variant.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, Eq. 3: after task k the
loss of later tasks gains the quadratic penalty ``lambda/2 * sum_i F_k,i (theta_i - theta*_k,i)^2`` for every
earlier task k, where ``F_k`` is the diagonal of the Fisher information at the task's optimum ``theta*_k``.

Online EWC (Schwarz et al., "Progress & Compress", ICML 2018, §4; Chaudhry et al. 2018's EWC++) keeps one running
Fisher ``F <- gamma * F + F_k`` and one anchor (the latest optimum), so the state does not grow with the number of
tasks.

The Fisher diagonal is the empirical Fisher: the mean over the task's training samples of the squared per-sample
gradient of the log-likelihood, computed exactly with ``torch.func`` (``vmap`` over ``grad``). Distributed: each
worker sums squared per-sample gradients over its shard; the sums and sample counts are all-reduced, so W workers
give the Fisher of the union of their shards, the same as one worker on the same samples.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch.func import functional_call, grad, vmap

from strategies.base import Batch, StageContext, Strategy, StrategyConfig


class EWCConfig(StrategyConfig):
    """Parameters of :class:`EWC`."""

    ewc_lambda: float = Field(100.0, ge=0.0, description="penalty strength lambda")
    mode: Literal["separate", "online"] = "separate"
    decay: float = Field(1.0, ge=0.0, le=1.0, description="online EWC: Fisher decay gamma")
    fisher_samples: int | None = Field(1024, ge=1,
                                       description="samples (all workers together) for the Fisher; None = all")
    chunk: int = Field(16, ge=1, description="per-sample-gradient chunk size (memory: chunk x #params floats)")


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``0.5 * sum_i F_i (theta_i - theta*_i)^2`` over all named parameters present in ``fisher``.

    Args:
        params, fisher, anchor: name -> tensor of the same shape.
    Returns:
        scalar tensor (differentiable in ``params``).
    """
    total = torch.zeros(())
    for name, f in fisher.items():
        p = params[name]
        total = total + (f.to(p.device) * (p - anchor[name].to(p.device)) ** 2).sum()
    return 0.5 * total


def per_sample_sq_grads(model: torch.nn.Module, ctx: StageContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Sum over the batch of squared per-sample gradients of the cross-entropy loss.

    Returns:
        name -> tensor shaped like the parameter: ``sum_n (d loss_n / d theta)^2``.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return ctx.criterion(logits, Batch(x.unsqueeze(0), y.unsqueeze(0), t.unsqueeze(0)))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params, batch.x, batch.y, batch.t)
    return {n: (g ** 2).sum(0) for n, g in grads.items()}


def diagonal_fisher(ctx: StageContext, chunk: int, max_samples: int | None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of ``ctx.model`` on the current domain's training data, averaged over all workers.

    Returns:
        name -> tensor shaped like the parameter (mean squared per-sample gradient).
    """
    model = ctx.model
    was_training = model.training
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    count = 0
    for batch in ctx.iter_task_batches():
        if max_samples is not None:
            keep = max_samples - count
            batch = Batch(batch.x[:keep], batch.y[:keep], batch.t[:keep])
        for start in range(0, len(batch), chunk):
            part = Batch(batch.x[start:start + chunk], batch.y[start:start + chunk], batch.t[start:start + chunk])
            for n, g in per_sample_sq_grads(model, ctx, part).items():
                sums[n] += g
        count += len(batch)
        if max_samples is not None and count >= max_samples:
            break
    model.train(was_training)
    n_total = ctx.all_reduce_sum(torch.tensor([float(count)]))
    return {n: ctx.all_reduce_sum(s) / n_total.clamp(min=1.0) for n, s in sums.items()}


class EWC(Strategy):
    """EWC (separate penalties per task) or online EWC (one decayed Fisher and the latest anchor)."""

    name = "ewc"
    Config = EWCConfig

    def __init__(self, config: EWCConfig) -> None:
        super().__init__(config)
        self.config: EWCConfig = config
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Add ``lambda * sum_k 0.5 * sum_i F_k,i (theta_i - theta*_k,i)^2``."""
        if not self.fishers or self.config.ewc_lambda == 0:
            return loss
        params = dict(ctx.model.named_parameters())
        penalty = sum(ewc_penalty(params, f, a) for f, a in zip(self.fishers, self.anchors))
        return loss + self.config.ewc_lambda * penalty

    def after_task(self, ctx: StageContext) -> None:
        """Compute the task's Fisher (all-reduced) and store the anchor ``theta*``."""
        cap = self.config.fisher_samples
        per_worker = None if cap is None else math.ceil(cap / ctx.world_size)
        fisher = diagonal_fisher(ctx, self.config.chunk, per_worker)
        anchor = {n: p.detach().cpu().clone() for n, p in ctx.model.named_parameters() if n in fisher}
        fisher = {n: f.cpu() for n, f in fisher.items()}
        if self.config.mode == "online":
            if self.fishers:
                fisher = {n: self.config.decay * self.fishers[0][n] + f for n, f in fisher.items()}
            self.fishers, self.anchors = [fisher], [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def state_dict(self) -> dict[str, Any]:
        """``{"fishers": [name -> F_k], "anchors": [name -> theta*_k]}`` (one entry per task, or one if online)."""
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the Fishers and anchors of earlier tasks."""
        self.fishers = list(state.get("fishers", []))
        self.anchors = list(state.get("anchors", []))
