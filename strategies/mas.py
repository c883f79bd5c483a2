"""Memory Aware Synapses (MAS).

Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018, §4.1, Eq. 2-4: the importance of
parameter i is the mean over the task's samples of ``|d ||F(x)||_2^2 / d theta_i|``, the sensitivity of the squared
L2 norm of the network's output (here: the outputs of the sample's own head) to the parameter; it needs no labels.
Importance accumulates over tasks (``Omega <- Omega + Omega_k``) and later tasks pay
``lambda * sum_i Omega_i (theta_i - theta*_i)^2`` with ``theta*`` the parameters after the previous task.

Distributed: per-sample absolute gradients are summed on each worker and all-reduced with the sample counts.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig
from strategies.importance import mean_grad_stat, output_norm_objective, per_worker, quadratic_penalty


class MASConfig(StrategyConfig):
    """Parameters of :class:`MAS`."""

    mas_lambda: float = Field(1.0, ge=0.0, description="penalty strength lambda")
    importance_samples: int | None = Field(1024, ge=1, description="samples (all workers) for Omega; None = all")
    chunk: int = Field(16, ge=1, description="per-sample-gradient chunk size")


def mas_importance(ctx: StageContext, chunk: int, max_samples: int | None) -> dict[str, torch.Tensor]:
    """``Omega_k``: mean over samples of ``|d ||F(x)||^2 / d theta|`` on the current domain (all workers).

    Returns:
        name -> tensor shaped like the parameter.
    """
    return mean_grad_stat(ctx, output_norm_objective(ctx.model, ctx), torch.abs, chunk, max_samples)


class MAS(Strategy):
    """MAS: output-sensitivity importance, accumulated over tasks, as a quadratic penalty."""

    name = "mas"
    Config = MASConfig

    def __init__(self, config: MASConfig) -> None:
        super().__init__(config)
        self.config: MASConfig = config
        self.omega: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Add the term ``mas`` = ``lambda * sum_i Omega_i (theta_i - theta*_i)^2``."""
        if not self.omega or self.config.mas_lambda == 0:
            return
        terms.add("mas", self.config.mas_lambda * quadratic_penalty(dict(ctx.model.named_parameters()), self.omega,
                                                                    self.anchor))

    def after_task(self, ctx: StageContext) -> None:
        """Accumulate this task's importance and move the anchor to the current parameters."""
        cap = per_worker(self.config.importance_samples, ctx.world_size)
        new = {n: o.cpu() for n, o in mas_importance(ctx, self.config.chunk, cap).items()}
        self.omega = {n: self.omega.get(n, torch.zeros_like(o)) + o for n, o in new.items()}
        self.anchor = {n: p.detach().cpu().clone() for n, p in ctx.model.named_parameters() if n in new}

    def state_dict(self) -> dict[str, Any]:
        """``{"omega": name -> Omega, "anchor": name -> theta*}``."""
        return {"omega": self.omega, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accumulated importance and the anchor."""
        self.omega = dict(state.get("omega", {}))
        self.anchor = dict(state.get("anchor", {}))
