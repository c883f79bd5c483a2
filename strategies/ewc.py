"""Elastic Weight Consolidation (EWC) with a diagonal Fisher, and its online variant.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017, Eq. 3: after task k the
loss of later tasks gains the quadratic penalty ``lambda/2 * sum_i F_k,i (theta_i - theta*_k,i)^2`` for every
earlier task k, where ``F_k`` is the diagonal of the Fisher information at the task's optimum ``theta*_k``.

Online EWC (Schwarz et al., "Progress & Compress", ICML 2018, §4; Chaudhry et al. 2018's EWC++) keeps one running
Fisher ``F <- gamma * F + F_k`` and one anchor (the latest optimum), so the state does not grow with the number of
tasks.

The Fisher diagonal is the empirical Fisher: the mean over the task's training samples of the squared per-sample
gradient of the log-likelihood, computed exactly with ``torch.func`` (see ``strategies/importance.py``). Distributed: each
worker sums squared per-sample gradients over its shard; the sums and sample counts are all-reduced, so W workers
give the Fisher of the union of their shards, the same as one worker on the same samples.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig
from strategies.importance import mean_grad_stat, nll_objective, per_worker, quadratic_penalty


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
    return 0.5 * quadratic_penalty(params, fisher, anchor)


def diagonal_fisher(ctx: StageContext, chunk: int, max_samples: int | None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of ``ctx.model`` on the current domain's training data, averaged over all workers:
    the mean over samples of the squared per-sample gradient of the negative log-likelihood.

    Returns:
        name -> tensor shaped like the parameter.
    """
    return mean_grad_stat(ctx, nll_objective(ctx.model, ctx), torch.square, chunk, max_samples)


class EWC(Strategy):
    """EWC (separate penalties per task) or online EWC (one decayed Fisher and the latest anchor)."""

    name = "ewc"
    Config = EWCConfig

    def __init__(self, config: EWCConfig) -> None:
        super().__init__(config)
        self.config: EWCConfig = config
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Add the term ``ewc`` = ``lambda * sum_k 0.5 * sum_i F_k,i (theta_i - theta*_k,i)^2``."""
        if not self.fishers or self.config.ewc_lambda == 0:
            return
        params = dict(ctx.model.named_parameters())
        penalty = sum(ewc_penalty(params, f, a) for f, a in zip(self.fishers, self.anchors))
        terms.add("ewc", self.config.ewc_lambda * penalty)

    def after_task(self, ctx: StageContext) -> None:
        """Compute the task's Fisher (all-reduced) and store the anchor ``theta*``."""
        fisher = diagonal_fisher(ctx, self.config.chunk, per_worker(self.config.fisher_samples, ctx.world_size))
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
