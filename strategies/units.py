"""Units: the neurons, channels or attention heads that unit-level methods (DAS, HAT) gate and mask.

A model exposes its units either by defining ``cl_units() -> list[Unit]`` (a transformer lists its attention heads
and MLP neurons this way) or, by default, every hidden ``nn.Linear`` / ``nn.Conv2d`` (all but the last
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
        module: the module whose output holds the units (output features of a Linear, channels of a Conv2d).
        size: number of units.
    """

    name: str
    module: torch.nn.Module
    size: int


def head_name(model: torch.nn.Module) -> str | None:
    """Name of the classification head: the model's last ``nn.Linear`` (None if it has none)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def model_units(model: torch.nn.Module) -> list[Unit]:
    """The model's unit layers: ``model.cl_units()`` if defined, else every Linear/Conv2d but the last Linear."""
    if hasattr(model, "cl_units"):
        return list(model.cl_units())
    head = head_name(model)
    return [Unit(name, m, m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels)
            for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name != head]


def _shape_for(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    # Linear output [B, n]; Conv2d output [B, n, H, W]
    return gate.view(1, -1, *([1] * (out.dim() - 2)))


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

            def hook(_m: torch.nn.Module, _inp: Any, out: torch.Tensor, g: Gate = gate) -> torch.Tensor:
                value = g() if callable(g) else g
                return out * _shape_for(out, value).to(out.device)

            handles.append(u.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def scale_unit_grads(units: list[Unit], factors: dict[str, torch.Tensor]) -> None:
    """Multiply the gradient of every parameter row/channel producing unit j by ``factors[layer][j]`` in place."""
    for u in units:
        if u.name not in factors:
            continue
        f = factors[u.name]
        for p in u.module.parameters(recurse=False):
            if p.grad is not None:
                p.grad.mul_(f.to(p.grad.device).view(-1, *([1] * (p.grad.dim() - 1))))
