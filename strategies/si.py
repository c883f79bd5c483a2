"""Synaptic Intelligence (SI).

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017, §3, Eq. 3-5. While a task
trains, each parameter accumulates its contribution to the drop in loss along the optimisation path,
``omega_i += -g_i * delta_theta_i`` per step (``g`` the gradient used by that step, ``delta_theta`` the step's
update). At the end of task k the importance grows by ``omega_i / (Delta_i^2 + xi)``, with ``Delta_i`` the parameter's
total change over the task and ``xi`` a damping term; later tasks pay ``c * sum_i Omega_i (theta_i - theta*_i)^2``.

Distributed: ``g`` is read after DDP's all-reduce and every worker applies the same update, so ``omega`` is the same
on every worker without communication.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig
from strategies.importance import quadratic_penalty


class SIConfig(StrategyConfig):
    """Parameters of :class:`SI`."""

    si_lambda: float = Field(1.0, ge=0.0, description="penalty strength c")
    epsilon: float = Field(0.1, gt=0.0, description="damping xi")


def si_importance(omega: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                  epsilon: float) -> dict[str, torch.Tensor]:
    """Eq. 5: ``omega_i / (Delta_i^2 + xi)`` per parameter (name -> tensor of the parameter's shape)."""
    return {n: omega[n] / (delta[n] ** 2 + epsilon) for n in omega}


class SI(Strategy):
    """SI: path-integral importance accumulated online, as a quadratic penalty."""

    name = "si"
    Config = SIConfig

    def __init__(self, config: SIConfig) -> None:
        super().__init__(config)
        self.config: SIConfig = config
        self.omega_big: dict[str, torch.Tensor] = {}  # accumulated importance Omega
        self.anchor: dict[str, torch.Tensor] = {}
        self.path: dict[str, torch.Tensor] = {}  # this task's path integral omega
        self.start: dict[str, torch.Tensor] = {}
        self.before: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def _params(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        return {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}

    def before_task(self, ctx: StageContext) -> None:
        """Reset the path integral and remember the task's starting point."""
        self.start = {n: p.detach().clone() for n, p in self._params(ctx).items()}
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Add the term ``si`` = ``c * sum_i Omega_i (theta_i - theta*_i)^2``."""
        if not self.omega_big or self.config.si_lambda == 0:
            return
        terms.add("si", self.config.si_lambda * quadratic_penalty(dict(ctx.model.named_parameters()), self.omega_big,
                                                                  self.anchor))

    def after_backward(self, ctx: StageContext) -> None:
        """Keep the (all-reduced) gradient and the parameters before the step."""
        params = self._params(ctx)
        self.grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
        self.before = {n: p.detach().clone() for n, p in params.items()}

    def after_step(self, ctx: StageContext) -> None:
        """``omega_i += -g_i * (theta_i(after) - theta_i(before))``."""
        for n, p in self._params(ctx).items():
            if n in self.grads:
                self.path[n] -= self.grads[n] * (p.detach() - self.before[n])

    def after_task(self, ctx: StageContext) -> None:
        """``Omega += omega / (Delta^2 + xi)``; the anchor becomes the current parameters."""
        params = self._params(ctx)
        delta = {n: params[n].detach() - self.start[n] for n in self.path}
        new = si_importance(self.path, delta, self.config.epsilon)
        self.omega_big = {n: (self.omega_big.get(n, torch.zeros_like(v.cpu())) + v.cpu()) for n, v in new.items()}
        self.anchor = {n: p.detach().cpu().clone() for n, p in params.items()}

    def stage_state_dict(self) -> dict[str, Any]:
        """This task's path integral omega so far."""
        return {"path": {n: v.detach().cpu() for n, v in self.path.items()}}

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the path integral of an in-stage checkpoint (the task's start was set by ``before_task``)."""
        if state:
            self.path = {n: v.to(self.start[n].device) for n, v in state["path"].items()}

    def state_dict(self) -> dict[str, Any]:
        """``{"omega": name -> Omega, "anchor": name -> theta*}``."""
        return {"omega": self.omega_big, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accumulated importance and the anchor."""
        self.omega_big = dict(state.get("omega", {}))
        self.anchor = dict(state.get("anchor", {}))
