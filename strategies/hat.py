"""Hard Attention to the Task (HAT), task-IL.

Serrà et al., "Overcoming Catastrophic Forgetting with Hard Attention to the Task", ICML 2018, §2:

- every task t has a learnable embedding ``e^t_l`` per unit layer l (``strategies/units.py``); the layer's units are
  multiplied by the attention ``a^t_l = sigmoid(s * e^t_l)`` (Eq. 1);
- ``s`` is annealed within each epoch from ``1/s_max`` to ``s_max`` over its batches (Eq. 3) and is ``s_max`` at
  inference, which makes the masks near-binary;
- after task t, the cumulative attention is ``a^{<=t} = max(a^{<t}, a^t)`` (Eq. 2);
- while task t trains, the gradient of weight (i, j) of layer l is multiplied by ``1 - min(a^{<t}_{l,i},
  a^{<t}_{l-1,j})`` (Eq. 2; biases by ``1 - a^{<t}_{l,i}``), so units earlier tasks rely on stay put;
- the embedding gradient is compensated for the annealing (Eq. 4) and embeddings are clamped to ``[-6, 6]``;
- the loss gains ``c * sum a^t (1 - a^{<t}) / sum (1 - a^{<t})`` (Eq. 5), which keeps capacity for later tasks.

Hidden layers must be chained (each unit layer's input is the previous one's units), as in ``mlp`` and ``cnn``.
Distributed: embeddings are not DDP parameters, so their gradients are all-reduced (mean) in ``after_backward``;
everything else is computed from identical values on every worker.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig
from strategies.units import Unit, gated, model_units


class HATConfig(StrategyConfig):
    """Parameters of :class:`HAT`."""

    s_max: float = Field(400.0, gt=1.0, description="largest attention scale s")
    c: float = Field(0.75, ge=0.0, description="capacity regulariser strength")
    clamp: float = Field(6.0, gt=0.0, description="embedding clamp")


def anneal(batch_index: int, batches: int, s_max: float) -> float:
    """Eq. 3: ``1/s_max + (s_max - 1/s_max) * b / (B - 1)`` for batch ``b`` (0-based) of ``B``."""
    if batches <= 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * min(batch_index, batches - 1) / (batches - 1)


def capacity_reg(current: dict[str, torch.Tensor], previous: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 5 without ``c``: ``sum a^t (1 - a^{<t}) / sum (1 - a^{<t})`` over all units of all layers."""
    num = sum((a * (1 - previous[n])).sum() for n, a in current.items())
    den = sum((1 - previous[n]).sum() for n in current)
    return num / den.clamp_min(1e-12) if isinstance(den, torch.Tensor) else num


def weight_factor(unit: Unit, out_prev: torch.Tensor, in_prev: torch.Tensor | None) -> torch.Tensor:
    """``1 - min(a^{<t}_{l,i}, a^{<t}_{l-1,j})`` shaped like the layer's weight (no input gate: ``1 - a_{l,i}``)."""
    w = unit.module.weight
    out = out_prev.view(-1, *([1] * (w.dim() - 1)))
    if in_prev is None:
        return (1 - out).expand_as(w)
    inp = in_prev.view(1, -1, *([1] * (w.dim() - 2)))
    if w.shape[1] != in_prev.numel():  # e.g. a flatten between conv channels and a linear layer
        inp = in_prev.repeat_interleave(w.shape[1] // in_prev.numel()).view(1, -1)
    return 1 - torch.minimum(out.expand_as(w), inp.expand_as(w))


class HAT(Strategy):
    """HAT: per-task hard attention masks on units, learned with annealed sigmoid gates."""

    name = "hat"
    Config = HATConfig
    supports_text = False  # its masks are built for Linear and Conv2d units

    def __init__(self, config: HATConfig) -> None:
        super().__init__(config)
        self.config: HATConfig = config
        self.embeddings: dict[int, dict[str, torch.Tensor]] = {}  # task -> layer -> e [n_units]
        self.cumulative: dict[str, torch.Tensor] = {}  # a^{<t}
        self.current: dict[str, torch.nn.Parameter] = {}
        self.s = 1.0
        self.batch_in_epoch = 0
        self.epoch = -1
        self._gate_ctx: Any = None

    def _gates(self) -> dict[str, torch.Tensor]:
        return {n: torch.sigmoid(self.s * e) for n, e in self.current.items()}

    def before_task(self, ctx: StageContext) -> None:
        """Create this task's embeddings (same seed on every worker), add them to the optimizer, install the gates."""
        units = model_units(ctx.model)
        g = torch.Generator().manual_seed(ctx.seed * 7919 + ctx.task_id)
        self.current = {u.name: torch.nn.Parameter(torch.randn(u.size, generator=g).to(ctx.device)) for u in units}
        ctx.optimizer.add_param_group({"params": list(self.current.values())})
        self.cumulative = self.cumulative or {u.name: torch.zeros(u.size) for u in units}
        self.s, self.batch_in_epoch, self.epoch = 1.0 / self.config.s_max, 0, -1
        # The gates read the current attention at every forward pass, so annealing s between batches changes them.
        gates = {n: (lambda n=n: torch.sigmoid(self.s * self.current[n])) for n in self.current}
        self._gate_ctx = gated(units, gates)
        self._gate_ctx.__enter__()

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Advance the annealing of ``s`` for this batch."""
        if ctx.epoch != self.epoch:
            self.epoch, self.batch_in_epoch = ctx.epoch, 0
        self.s = anneal(self.batch_in_epoch, max(ctx.steps_per_epoch, 1), self.config.s_max)
        self.batch_in_epoch += 1
        return batch

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Add the term ``hat`` = ``c * capacity_reg(a^t, a^{<t})``."""
        previous = {n: v.to(ctx.device) for n, v in self.cumulative.items()}
        terms.add("hat", self.config.c * capacity_reg(self._gates(), previous))

    def after_backward(self, ctx: StageContext) -> None:
        """All-reduce the embedding gradients, compensate them (Eq. 4), and condition the weight gradients."""
        s, s_max = self.s, self.config.s_max
        for e in self.current.values():
            if e.grad is not None:
                ctx.all_reduce_sum(e.grad).div_(ctx.world_size)
                cosh = torch.cosh(torch.clamp(s * e.detach(), -50, 50))
                e.grad.mul_(s_max * (cosh + 1) / (s * (cosh + 2)))
        if not any(bool((v > 0).any()) for v in self.cumulative.values()):
            return
        previous_layer: torch.Tensor | None = None
        for unit in model_units(ctx.model):
            prev = self.cumulative[unit.name].to(ctx.device)
            if unit.module.weight.grad is not None:
                unit.module.weight.grad.mul_(weight_factor(unit, prev, previous_layer))
            bias = getattr(unit.module, "bias", None)
            if bias is not None and bias.grad is not None:
                bias.grad.mul_(1 - prev)
            previous_layer = prev

    def after_step(self, ctx: StageContext) -> None:
        """Clamp the embeddings to ``[-clamp, clamp]``."""
        with torch.no_grad():
            for e in self.current.values():
                e.clamp_(-self.config.clamp, self.config.clamp)

    def after_task(self, ctx: StageContext) -> None:
        """Store this task's embeddings, fold its s_max attention into the cumulative mask, remove the gates."""
        if self._gate_ctx is not None:
            self._gate_ctx.__exit__(None, None, None)
            self._gate_ctx = None
        self.embeddings[ctx.task_id] = {n: e.detach().cpu().clone() for n, e in self.current.items()}
        final = {n: torch.sigmoid(self.config.s_max * e) for n, e in self.embeddings[ctx.task_id].items()}
        self.cumulative = {n: torch.maximum(self.cumulative[n], a) for n, a in final.items()}
        self.current = {}

    def masks(self, task_id: int) -> dict[str, torch.Tensor]:
        """The inference masks ``sigmoid(s_max * e^t)`` of a trained task (layer -> ``[n_units]``)."""
        return {n: torch.sigmoid(self.config.s_max * e) for n, e in self.embeddings[task_id].items()}

    def inference_model(self, model: torch.nn.Module, task_id: int) -> torch.nn.Module:
        """A copy of ``model`` gated by task ``task_id``'s masks (unchanged for tasks not trained yet)."""
        if task_id not in self.embeddings:
            return model
        view = copy.deepcopy(model)
        ctx = gated(model_units(view), self.masks(task_id))
        ctx.__enter__()  # the hooks live as long as the copy
        return view

    def state_dict(self) -> dict[str, Any]:
        """``{"embeddings": task -> layer -> e, "cumulative": layer -> a^{<=t}}``."""
        return {"embeddings": self.embeddings, "cumulative": self.cumulative}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the embeddings of earlier tasks and the cumulative attention."""
        self.embeddings = dict(state.get("embeddings", {}))
        self.cumulative = dict(state.get("cumulative", {}))

