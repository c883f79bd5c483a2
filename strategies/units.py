"""Units: the neurons, channels or attention heads that unit-level methods (DAS, HAT) gate and mask.

A model exposes its units either by defining ``cl_units() -> list[Unit]`` (a transformer lists its attention heads
and MLP neurons this way: see ``orchestrator/gpt.py``) or, by default, every hidden ``nn.Linear`` / ``nn.Conv2d`` (all but the last
``nn.Linear``, the head) is a layer of units, one per output feature or channel.

:func:`gated` runs a forward pass with a gate multiplied onto each layer's units (``[n_units]`` per layer,
broadcast over the batch and, for convolutions, the spatial axes); gradients of a loss with respect to the gates
measure each unit's importance. :func:`scale_unit_grads` multiplies the gradients of the parameters that produce
each unit (its weight row or output channel, and its bias) by a per-unit factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Unit:
    """One layer of units.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module whose output holds the units (output features of a Linear, channels of a Conv2d, the
            concatenated heads of an attention layer).
        size: number of units.
        axis: the output axis that holds them (-1: features, for Linear outputs ``[B, n]`` or ``[B, L, n]``; 1:
            channels of ``[B, n, H, W]``).
        span: consecutive output features per unit (an attention head's dimension; 1 for a neuron or channel).
        producers: ``(parameter, axis)`` pairs: the parameters that produce the units, along that axis (an attention
            layer's query, key and value weights and biases along axis 0; a Hugging Face ``Conv1D`` weight, stored
            transposed, along axis 1). The axis may hold the ``size x span`` features several times over (a fused
            query-key-value projection: 3 times); each copy is masked alike. Empty means every parameter of
            ``module`` along axis 0.
    """

    name: str
    module: torch.nn.Module
    size: int
    axis: int = -1
    span: int = 1
    producers: tuple[tuple[torch.Tensor, int], ...] = ()

    def parameters(self) -> list[tuple[torch.Tensor, int]]:
        """``(parameter, axis)`` of everything that produces the units (see ``producers``)."""
        return list(self.producers) or [(p, 0) for p in self.module.parameters(recurse=False)]


def head_name(model: torch.nn.Module) -> str | None:
    """Name of the classification head: the model's last ``nn.Linear`` (None if it has none)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def model_units(model: torch.nn.Module) -> list[Unit]:
    """The model's unit layers: ``model.cl_units()`` if defined, else every Linear/Conv2d but the last Linear."""
    if hasattr(model, "cl_units"):
        return list(model.cl_units())
    head = head_name(model)
    return [Unit(name, m, m.out_features, -1) if isinstance(m, torch.nn.Linear) else Unit(name, m, m.out_channels, 1)
            for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name != head]


def _shape_for(out: torch.Tensor, gate: torch.Tensor, unit: Unit) -> torch.Tensor:
    """``gate`` ``[n_units]`` expanded to each unit's ``span`` features and shaped to broadcast over ``out`` along
    the unit's axis (Linear ``[B, n]`` or ``[B, L, n]``; Conv2d ``[B, n, H, W]``)."""
    if unit.span > 1:
        gate = gate.repeat_interleave(unit.span)
    shape = [1] * out.dim()
    shape[unit.axis] = -1
    return gate.view(shape)


Gate = torch.Tensor | Callable[[], torch.Tensor]


@contextmanager
def gated(units: list[Unit], gates: dict[str, Gate]) -> Iterator[None]:
    """Multiply each unit layer's output by its gate (``[n_units]``) during forward passes inside the block.

    A gate may be a callable, read at every forward pass (HAT anneals its gates between batches).
    """
    handles = []
    for u in units:
        if u.name in gates:
            gate = gates[u.name]

            def hook(_m: torch.nn.Module, _inp: Any, out: torch.Tensor, g: Gate = gate, unit: Unit = u) -> torch.Tensor:
                value = g() if callable(g) else g
                return out * _shape_for(out, value, unit).to(out.device)

            handles.append(u.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def unit_factors(units: list[Unit], factors: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, factor)`` for every parameter producing the units in ``factors`` (layer name -> ``[n_units]``):
    the factor expanded to each unit's ``span`` rows (or columns, tiled over a fused projection's copies) and shaped
    to broadcast over the parameter."""
    out = []
    for u in units:
        if u.name not in factors:
            continue
        f = factors[u.name].repeat_interleave(u.span) if u.span > 1 else factors[u.name]
        for p, axis in u.parameters():
            shape = [1] * p.dim()
            shape[axis] = -1
            out.append((p, f.repeat(p.shape[axis] // f.numel()).to(p.device).view(shape)))
    return out


def scale_unit_grads(units: list[Unit], factors: dict[str, torch.Tensor]) -> None:
    """Multiply the gradient of every parameter row/channel producing unit j (``span`` rows per unit, in each of the
    unit's ``producers``) by ``factors[layer][j]`` (``[n_units]``) in place."""
    for p, f in unit_factors(units, factors):
        if p.grad is not None:
            p.grad.mul_(f)
