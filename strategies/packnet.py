"""PackNet: iterative pruning to pack several tasks into one network (task-IL).

Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR 2018, §3:

1. Task k trains only the weights that no earlier task owns ("free" weights); owned weights get no gradient and are
   restored after every optimizer step, so nothing an earlier task owns ever changes.
2. After training, the ``prune_ratio`` fraction of the free weights of each layer with the smallest magnitude is
   pruned (set to 0, left free for later tasks); the rest become owned by task k.
3. The kept weights are retrained for ``retrain_epochs`` epochs with the pruned ones held at 0.
4. Domain j is evaluated with the weights owned by tasks 0..j only (later tasks' and free weights masked to 0).

Prunable weights are the ``weight`` tensors of every ``nn.Linear``/``nn.Conv2d`` except the head (the last
``nn.Linear``, whose output slices are per task in task-IL). Biases of prunable layers train in the first task only
(the paper's fixed biases); the head trains in every task.

Distributed: the pruning decision depends only on the weights, identical on every worker; retraining runs through
the DDP model like the main loop.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field

from strategies.base import StageContext, Strategy, StrategyConfig
from strategies.units import head_name

FREE = -1


class PackNetConfig(StrategyConfig):
    """Parameters of :class:`PackNet`."""

    prune_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of each layer's free weights released")
    retrain_epochs: int = Field(1, ge=0, description="epochs of retraining after pruning")


def prunable(model: torch.nn.Module) -> list[str]:
    """Names of the prunable weight tensors: Linear/Conv2d weights except the last Linear (the head)."""
    head = head_name(model)
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name != head]


def prune_free(weight: torch.Tensor, owner: torch.Tensor, task_id: int, ratio: float) -> torch.Tensor:
    """Assign the free weights of one tensor: the ``ratio`` smallest in magnitude stay free, the rest go to
    ``task_id``.

    Args:
        weight: the layer's weights. owner: int tensor of the same shape, ``FREE`` (-1) or the owning task.
    Returns:
        the new owner tensor (the caller zeroes the weights that stay free).
    """
    free = owner == FREE
    n_free = int(free.sum())
    n_prune = int(round(n_free * ratio))
    new = owner.clone()
    if n_free == 0:
        return new
    magnitudes = weight.detach().abs()[free]
    if n_prune > 0:
        threshold = magnitudes.kthvalue(n_prune).values
        keep = free & (weight.detach().abs() > threshold)
    else:
        keep = free
    new[keep] = task_id
    return new


class PackNet(Strategy):
    """PackNet: prune after each task; owned weights are frozen; inference uses tasks 0..j's weights."""

    name = "packnet"
    Config = PackNetConfig

    def __init__(self, config: PackNetConfig) -> None:
        super().__init__(config)
        self.config: PackNetConfig = config
        self.owner: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.trainable_task: int | None = None  # during retraining: only weights owned by this task train

    def before_task(self, ctx: StageContext) -> None:
        """Create the ownership maps on the first task; remember the values of owned weights."""
        params = dict(ctx.model.named_parameters())
        for n in prunable(ctx.model):
            self.owner.setdefault(n, torch.full(params[n].shape, FREE, dtype=torch.int16))
        self.frozen = {n: params[n].detach().clone() for n in self.owner}
        self.trainable_task = None

    def _trainable(self, n: str) -> torch.Tensor:
        owner = self.owner[n]
        return owner == (FREE if self.trainable_task is None else self.trainable_task)

    def after_backward(self, ctx: StageContext) -> None:
        """Zero the gradients of owned weights (and of prunable layers' biases after the first task)."""
        params = dict(ctx.model.named_parameters())
        for n in self.owner:
            if params[n].grad is not None:
                params[n].grad.mul_(self._trainable(n).to(params[n].grad.device))
            bias = n[: -len("weight")] + "bias"
            if ctx.task_id > 0 and bias in params and params[bias].grad is not None:
                params[bias].grad.zero_()

    def after_step(self, ctx: StageContext) -> None:
        """Restore every weight that is not trainable now (the optimizer's momentum may have moved it)."""
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for n in self.owner:
                fixed = ~self._trainable(n).to(params[n].device)
                params[n][fixed] = self.frozen[n].to(params[n].device)[fixed]

    def extra_epochs(self, ctx: StageContext) -> int:
        """Once the stage's epochs are done: prune the free weights, give the rest to this task, and ask for
        ``retrain_epochs`` epochs in which only this task's weights train, with the pruned ones at 0 (Mallya &
        Lazebnik 2018, §3). They run through the stage loop, with every strategy's hooks and the loss checks."""
        params = dict(ctx.model.named_parameters())
        with torch.no_grad():
            for n in self.owner:
                self.owner[n] = prune_free(params[n].cpu(), self.owner[n], ctx.task_id, self.config.prune_ratio)
                params[n][(self.owner[n] == FREE).to(params[n].device)] = 0.0
        self.frozen = {n: params[n].detach().clone() for n in self.owner}
        self.trainable_task = ctx.task_id
        return self.config.retrain_epochs

    def after_task(self, ctx: StageContext) -> None:
        """End the retraining: the next task trains the weights that are still free."""
        self.trainable_task = None

    def inference_model(self, model: torch.nn.Module, task_id: int) -> torch.nn.Module:
        """A copy of ``model`` with only the weights owned by tasks ``0..task_id`` (others set to 0)."""
        if not self.owner:
            return model
        view = copy.deepcopy(model)
        params = dict(view.named_parameters())
        with torch.no_grad():
            for n, owner in self.owner.items():
                keep = (owner >= 0) & (owner <= task_id)
                params[n].mul_(keep.to(params[n].dtype))
        return view

    def state_dict(self) -> dict[str, Any]:
        """``{"owner": name -> int16 tensor (task id owning each weight, -1 = free)}``."""
        return {"owner": self.owner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ownership maps."""
        self.owner = dict(state.get("owner", {}))
