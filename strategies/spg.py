"""Soft-masking of Parameter-level Gradient flow (SPG).

Konishi et al., "Parameter-Level Soft-Masking for Continual Learning", ICML 2023, §3 (and the authors' code,
UIC-Liu-Lab/SPG ``approaches/spg``):

1. After task k, for every task t <= k, the loss gradient is accumulated over task k's training data: for t = k the
   cross-entropy of head k, for t < k the sum of head t's outputs (how much the shared parameters drive old heads).
2. Each parameter tensor's accumulated gradient is standardised within the tensor (zero mean, unit std) and mapped
   to an importance in [0, 1) by ``|tanh(.)|``; task k's importance is the element-wise max over t.
3. Importance accumulates across tasks by element-wise max: ``a_max <- max(a_max, importance_k)``.
4. While later tasks train, each feature-extractor gradient is multiplied by ``(1 - a_max)``; the classification
   head, shared across tasks, is scaled by ``(1 - mean(a_max over the feature extractor))``.

``strength`` is an extension that the paper does not have, so that a search (``lifelong tune``) can trade
stability for plasticity: the gate uses ``min(1, strength * a_max)`` (:func:`strengthen`). 1.0, the default, is the
paper's method; 0 turns the masking off; values above 1 freeze important parameters sooner.

The head is the model's last ``nn.Linear`` (or the parameters named by ``head``). Task t's outputs are the units of
its labels (``StageContext.units_of()``: its head in task-IL, its classes in class-IL, all units in domain-IL).

Distributed: the objectives are sums over samples, so summing the per-worker gradients (all-reduce) gives the
gradient of one worker on the same samples; standardisation makes the importance independent of the scale.
Masking runs after DDP's all-reduce on identical gradients, so every worker applies the same update.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from strategies.base import StageContext, Strategy, StrategyConfig
from strategies.importance import capped_batches
from strategies.units import head_name


STRENGTH_HELP = ("soft-mask strength, an extension not in the paper: the accumulated importance is multiplied by it "
                 "and capped at 1 before it gates the gradients; 1.0 is the paper's method, 0 turns masking off")


class SPGConfig(StrategyConfig):
    """Parameters of :class:`SPG`."""

    head: str | None = Field(None, description="name prefix of the head parameters (default: the last nn.Linear)")
    importance_samples: int | None = Field(None, ge=1, description="cap on samples per worker; None = all")
    strength: float = Field(1.0, ge=0.0, description=STRENGTH_HELP)


def strengthen(importance: torch.Tensor, strength: float) -> torch.Tensor:
    """The gate's importance ``min(1, strength * importance)`` (same shape; ``strength`` 1.0 returns it as is)."""
    return importance if strength == 1.0 else (importance * strength).clamp(0.0, 1.0)


def standardized_importance(grad: torch.Tensor) -> torch.Tensor:
    """``|tanh((g - mean(g)) / std(g))|`` over one parameter tensor; all-zero gradients give zero importance."""
    if bool((grad == 0).all()) or grad.numel() < 2:
        return torch.zeros_like(grad)
    return torch.tanh((grad - grad.mean()) / grad.std().clamp_min(1e-12)).abs()


def accumulate_importance(a_max: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise max of the accumulated importance and a task's importance (name -> tensor)."""
    return {n: torch.maximum(a_max[n], v) if n in a_max else v.clone() for n, v in new.items()}


def soft_mask(grad: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The masked gradient ``(1 - importance) * grad``."""
    return (1.0 - importance.to(grad.device)) * grad


def head_names(model: torch.nn.Module, prefix: str | None) -> set[str]:
    """Names of the head's parameters: those starting with ``prefix``, else the last ``nn.Linear``'s."""
    if prefix is not None:
        return {n for n, _ in model.named_parameters() if n.startswith(prefix)}
    last = head_name(model)
    if last is None:
        raise ValueError("spg: the model has no nn.Linear head; name the head's parameters with spg.head")
    return {f"{last}.{n}" if last else n for n, _ in model.get_submodule(last).named_parameters()}


def task_importance(ctx: StageContext, head: set[str], max_samples: int | None) -> dict[str, torch.Tensor]:
    """Steps 1-2 for the current task: ``max_t |tanh(standardise(grad_t))|`` per feature-extractor parameter."""
    model = ctx.model
    was_training = model.training
    model.eval()
    body = {n: p for n, p in model.named_parameters() if p.requires_grad and n not in head}
    k = ctx.task_id
    sums = [{n: torch.zeros_like(p) for n, p in body.items()} for _ in range(k + 1)]
    for batch in capped_batches(ctx, max_samples):
        out = model(batch.x.to(ctx.device))
        mask = ctx.units_of().to(out.device)
        for t in range(k + 1):
            if t == k:
                objective = ctx.criterion(out, batch, reduction="none").sum()
            else:
                objective = (out * mask[t]).sum()
            grads = torch.autograd.grad(objective, list(body.values()), retain_graph=t < k, allow_unused=True,
                                        materialize_grads=True)
            for n, g in zip(body, grads):
                sums[t][n] += g
    model.train(was_training)
    importance: dict[str, torch.Tensor] = {}
    for per_t in sums:
        for n, g in per_t.items():
            imp = standardized_importance(ctx.all_reduce_sum(g))
            importance[n] = torch.maximum(importance[n], imp) if n in importance else imp
    return importance


class SPG(Strategy):
    """SPG: parameter-level soft-masking of gradients by accumulated importance (no replay)."""

    name = "spg"
    Config = SPGConfig

    def __init__(self, config: SPGConfig) -> None:
        super().__init__(config)
        self.config: SPGConfig = config
        self.a_max: dict[str, torch.Tensor] = {}
        self.head: set[str] = set()
        self.head_factor = 1.0

    def before_task(self, ctx: StageContext) -> None:
        """Find the head and the head's gradient factor ``1 - mean(a_max)`` over the feature extractor."""
        self.head = head_names(ctx.model, self.config.head)
        if self.a_max:
            gate = strengthen(torch.cat([v.flatten() for v in self.a_max.values()]), self.config.strength)
            self.head_factor = float(1.0 - gate.mean())

    def after_backward(self, ctx: StageContext) -> None:
        """Soft-mask the all-reduced gradients."""
        if not self.a_max:
            return
        for n, p in ctx.model.named_parameters():
            if p.grad is None:
                continue
            if n in self.head:
                p.grad.mul_(self.head_factor)
            elif n in self.a_max:
                p.grad.copy_(soft_mask(p.grad, strengthen(self.a_max[n], self.config.strength)))

    def after_task(self, ctx: StageContext) -> None:
        """Compute this task's importance and fold it into ``a_max`` by element-wise max."""
        new = task_importance(ctx, self.head or head_names(ctx.model, self.config.head),
                              self.config.importance_samples)
        self.a_max = accumulate_importance(self.a_max, {n: v.cpu() for n, v in new.items()})

    def state_dict(self) -> dict[str, Any]:
        """``{"a_max": name -> accumulated importance in [0, 1)}`` for the feature-extractor parameters."""
        return {"a_max": self.a_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accumulated importance."""
        self.a_max = dict(state.get("a_max", {}))
