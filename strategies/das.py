"""DAS: soft-masking of units for continual domain-adaptive (pre-)training.

Ke et al., "Continual Pre-training of Language Models", ICLR 2023, §3 (and ContinualLM ``networks/baselines/
softmask.py``). A unit (neuron, channel or attention head, see ``strategies/units.py``) is gated by a virtual gate
fixed at 1; the importance of a unit is the accumulated ``|d L / d gate|`` over a domain's data, standardised within
its layer and mapped to [0, 1) by ``|tanh(.)|``.

- Before the first domain, the importance of the starting model's units (its general knowledge) comes from a proxy
  loss that needs no labels: the KL divergence between the outputs of two forward passes with independent dropout on
  the units (``protect_initial``; meant for pre-trained models).
- After each domain, importance comes from the gradient of that domain's loss.
- Importances accumulate by element-wise max; while a domain trains, the gradients of the parameters producing each
  unit are multiplied by ``(1 - importance)``.

``strength`` (an extension, as for SPG, :func:`strategies.spg.strengthen`) multiplies the accumulated importance,
capped at 1, before it gates the gradients; 1.0 is the paper's method.

Under Adam, a gradient soft-mask mostly does not hold: Adam divides each parameter's step by the root of its own
running mean of squared gradients, so a gradient scaled by a constant ``1 - importance`` gives the same step (only a
factor near 0, where Adam's epsilon dominates, slows a parameter). ``apply_to: update`` (an extension) masks the
optimizer's step instead: after ``optimizer.step()`` each unit's parameters move by ``(1 - importance)`` times the
step the optimizer took, which holds whatever the optimizer; ``apply_to: gradient`` (the default) is the paper's.

The contrastive term of the paper is not implemented. Distributed: the gate gradients of each global batch (the
workers' batches of one step) are summed across workers before the absolute value (:func:`gate_importance`), so
every worker holds the importance one process computes on the same global batches; masking runs after DDP's
all-reduce (and, with ``apply_to: update``, after the optimizer's step, on identical parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig
from strategies.importance import capped_batches, per_worker
from strategies.spg import STRENGTH_HELP, standardized_importance, strengthen
from strategies.units import gated, model_units, scale_unit_grads, unit_factors

GateObjective = Callable[[Batch, dict[str, torch.Tensor]], torch.Tensor]


class DASConfig(StrategyConfig):
    """Parameters of :class:`DAS`."""

    protect_initial: bool = Field(True, description="before the first domain, protect the starting model's units "
                                                     "with the proxy-KL importance")
    dropout: float = Field(0.1, gt=0.0, lt=1.0, description="unit dropout of the two proxy forward passes")
    importance_samples: int | None = Field(1024, ge=1, description="samples (all workers) per importance pass")
    strength: float = Field(1.0, ge=0.0, description=STRENGTH_HELP)
    apply_to: Literal["gradient", "update"] = Field(
        "gradient", description="gradient: scale each unit's gradients by 1 - importance (the paper; Adam's "
        "normalisation undoes most of it); update: scale the optimizer's step instead (holds under Adam)")


def normalize(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer: ``|tanh(standardise(raw))|`` in [0, 1) (name -> ``[n_units]``)."""
    return {n: standardized_importance(v) for n, v in raw.items()}


def gate_importance(ctx: StageContext, objective: GateObjective, max_samples: int | None) -> dict[str, torch.Tensor]:
    """Normalised unit importance: ``sum_b |d objective_b / d gate|`` over the global batches b of the current
    domain, per layer ``{name: [n_units]}``.

    A global batch is the workers' batches of the same step together: each worker's per-batch gate gradients
    (``[n_batches, n_units]``, the objective being a sum over samples) are gathered and summed by batch index before
    the absolute value, so W workers give the importance one process gives on the same global batches (a worker
    with fewer batches adds nothing to the later ones).
    """
    units = model_units(ctx.model)
    was_training = ctx.model.training
    ctx.model.eval()
    rows = []
    for batch in capped_batches(ctx, max_samples):
        batch = batch.to(ctx.device)
        gates = {u.name: torch.ones(u.size, device=ctx.device, requires_grad=True) for u in units}
        grads = torch.autograd.grad(objective(batch, gates), list(gates.values()), allow_unused=True,
                                    materialize_grads=True)
        rows.append(torch.cat([g.detach().cpu() for g in grads]))
    ctx.model.train(was_training)
    width = sum(u.size for u in units)
    parts = ctx.all_gather_object(torch.stack(rows) if rows else torch.zeros(0, width))
    per_batch = torch.zeros(max(len(part) for part in parts), width)
    for part in parts:
        per_batch[: len(part)] += part
    raw = per_batch.abs().sum(0).split([u.size for u in units])
    return normalize({u.name: v for u, v in zip(units, raw)})


def loss_objective(ctx: StageContext) -> GateObjective:
    """The domain's cross-entropy (summed over the batch) with the gates applied."""
    units = model_units(ctx.model)

    def objective(batch: Batch, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        with gated(units, gates):
            return ctx.criterion(ctx.model(batch.x), batch, reduction="none").sum()

    return objective


def proxy_kl_objective(ctx: StageContext, dropout: float) -> GateObjective:
    """KL between the softmax outputs of two passes with independent unit dropout (no labels needed)."""
    units = model_units(ctx.model)
    rng = ctx.generator(salt=53)

    def dropped(gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: g * (torch.rand(g.shape, generator=rng) >= dropout).to(g) / (1 - dropout) for n, g in gates.items()}

    def objective(batch: Batch, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        with gated(units, dropped(gates)):
            first = torch.log_softmax(ctx.model(batch.x), dim=-1)
        with gated(units, dropped(gates)):
            second = torch.log_softmax(ctx.model(batch.x), dim=-1)
        return torch.nn.functional.kl_div(second, first, log_target=True, reduction="sum")

    return objective


class DAS(Strategy):
    """DAS: unit-level soft-masking by accumulated importance."""

    name = "das"
    Config = DASConfig

    def __init__(self, config: DASConfig) -> None:
        super().__init__(config)
        self.config: DASConfig = config
        self.importance: dict[str, torch.Tensor] = {}
        self.before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # apply_to: update

    def _cap(self, ctx: StageContext) -> int | None:
        return per_worker(self.config.importance_samples, ctx.world_size)

    def before_task(self, ctx: StageContext) -> None:
        """Before the first domain: protect the starting model's units with the proxy-KL importance."""
        if ctx.task_id == 0 and not self.importance and self.config.protect_initial:
            self.importance = gate_importance(ctx, proxy_kl_objective(ctx, self.config.dropout), self._cap(ctx))

    def _keep(self) -> dict[str, torch.Tensor]:
        return {n: 1.0 - strengthen(v, self.config.strength) for n, v in self.importance.items()}

    def after_backward(self, ctx: StageContext) -> None:
        """``apply_to: gradient``: scale each unit's parameter gradients by ``1 - importance``; ``update``: remember
        the parameters before the optimizer's step."""
        if not self.importance:
            return
        if self.config.apply_to == "gradient":
            scale_unit_grads(model_units(ctx.model), self._keep())
        else:
            self.before = [(p, f, p.detach().clone()) for p, f in unit_factors(model_units(ctx.model), self._keep())]

    def after_step(self, ctx: StageContext) -> None:
        """``apply_to: update``: shrink each unit's step to ``(1 - importance)`` of what the optimizer took."""
        with torch.no_grad():
            for p, keep, old in self.before:
                p.copy_(old + keep * (p - old))
        self.before = []

    def after_task(self, ctx: StageContext) -> None:
        """Fold this domain's loss-gradient importance into the accumulated importance (element-wise max)."""
        new = gate_importance(ctx, loss_objective(ctx), self._cap(ctx))
        self.importance = {n: torch.maximum(self.importance[n], v) if n in self.importance else v
                           for n, v in new.items()}

    def state_dict(self) -> dict[str, Any]:
        """``{"importance": layer name -> [n_units] in [0, 1)}``."""
        return {"importance": self.importance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accumulated unit importance."""
        self.importance = dict(state.get("importance", {}))
