"""Models and output heads.

Built-in models are ``mlp`` (flatten, hidden ReLU layers, linear output) and a small ``cnn`` for classification, and
the language models ``gpt`` and ``hf`` of ``orchestrator/gpt.py`` for text domains; users plug their own in with an
import path ``package.module:factory``. A classifier maps ``[B, *input_shape]`` floats to ``[B, num_outputs]``
logits; a language model maps ``[B, L]`` token ids to ``[B, L, vocab]`` logits.

Heads follow the scenario (see :class:`HeadLayout`):

- class-IL: one head over the union of all domains' labels;
- domain-IL: one head of ``max_j |labels_j|`` outputs, each domain's labels mapped onto it in sorted order;
- task-IL (multi-head): domain j owns the output slice ``[offset_j, offset_j + |labels_j|)``; logits outside the
  sample's own head are masked, which is the same as a separate linear head per task;
- language modelling (``lm``, text domains): one output per token id, shared by every domain.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orchestrator.errors import LifelongError
from orchestrator.spec import BUILT_IN_MODELS, ModelSpec
from strategies.base import head_cross_entropy as criterion
from strategies.base import masked_logits

__all__ = ["CNN", "MLP", "HeadLayout", "build_model", "criterion", "masked_logits"]


@dataclass(frozen=True)
class HeadLayout:
    """How raw labels of each domain map to output units.

    Attributes:
        scenario: ``class_il``, ``task_il``, ``domain_il``, or ``lm`` (text domains: next-token prediction).
        label_sets: sorted label set of each domain, in stream order (empty for text domains).
        num_outputs: width of the model's output layer.
        offsets: first output unit of each domain's head (all 0 unless task-IL).
    """

    scenario: str
    label_sets: tuple[tuple[int, ...], ...]
    num_outputs: int
    offsets: tuple[int, ...]

    @classmethod
    def language(cls, vocab_size: int, num_domains: int) -> HeadLayout:
        """The layout of a stream of text domains: ``vocab_size`` outputs (token ids), the same for every domain."""
        return cls("lm", tuple(() for _ in range(num_domains)), vocab_size, tuple(0 for _ in range(num_domains)))

    @classmethod
    def build(cls, scenario: str, label_sets: list[list[int]]) -> HeadLayout:
        """Build the layout for a scenario from each domain's label set."""
        sets = tuple(tuple(sorted(set(s))) for s in label_sets)
        if scenario == "class_il":
            union = sorted({label for s in sets for label in s})
            return cls(scenario, sets, len(union), tuple(0 for _ in sets))
        if scenario == "domain_il":
            return cls(scenario, sets, max(len(s) for s in sets), tuple(0 for _ in sets))
        offsets, total = [], 0
        for s in sets:
            offsets.append(total)
            total += len(s)
        return cls(scenario, sets, total, tuple(offsets))

    def target_table(self) -> torch.Tensor:
        """Long tensor ``[T, max_label + 1]``: ``table[j, label]`` is the output unit of ``label`` in domain j.

        Unknown labels map to -1.
        """
        max_label = max((label for s in self.label_sets for label in s), default=0)
        table = torch.full((len(self.label_sets), max_label + 1), -1, dtype=torch.long)
        union = sorted({label for s in self.label_sets for label in s})
        for j, labels in enumerate(self.label_sets):
            for pos, label in enumerate(labels):
                unit = union.index(label) if self.scenario == "class_il" else self.offsets[j] + pos
                table[j, label] = unit
        return table

    def head_mask(self) -> torch.Tensor:
        """Bool tensor ``[T, num_outputs]``: True where domain j's head may predict (all True unless task-IL)."""
        mask = torch.ones(len(self.label_sets), self.num_outputs, dtype=torch.bool)
        if self.scenario == "task_il":
            mask[:] = False
            for j, labels in enumerate(self.label_sets):
                mask[j, self.offsets[j]:self.offsets[j] + len(labels)] = True
        return mask

    def domain_units(self) -> torch.Tensor:
        """Bool tensor ``[T, num_outputs]``: the output units of domain j's own labels (its classes in class-IL,
        its head in task-IL, every unit in domain-IL)."""
        if self.scenario != "class_il":
            return self.head_mask()
        table = self.target_table()
        units = torch.zeros(len(self.label_sets), self.num_outputs, dtype=torch.bool)
        for j, labels in enumerate(self.label_sets):
            units[j, table[j, list(labels)]] = True
        return units


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden size, then a linear output layer.

    Input ``[B, *input_shape]``, output ``[B, num_outputs]``. Split-MNIST in Hsu et al. 2018 uses hidden [400, 400].
    """

    def __init__(self, in_features: int, hidden: list[int], num_outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *input_shape]`` -> ``[B, num_outputs]`` logits."""
        return self.net(x)


class CNN(nn.Module):
    """Small CNN: per channel count ``Conv3x3 -> ReLU -> MaxPool2``, then a 128-unit hidden layer and the output.

    Input ``[B, C, H, W]`` (a flat ``[B, C*H*W]`` input is reshaped), output ``[B, num_outputs]``.
    """

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], num_outputs: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise LifelongError(f"model 'cnn' needs image inputs (C, H, W); the shards have shape {input_shape}")
        self.input_shape = input_shape
        c, h, w = input_shape
        convs: list[nn.Module] = []
        for out in channels:
            convs += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*convs, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c * h * w, 128), nn.ReLU(), nn.Linear(128, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` or ``[B, C*H*W]`` -> ``[B, num_outputs]`` logits."""
        return self.head(self.features(x.reshape(x.shape[0], *self.input_shape)))


def model_factory(spec: ModelSpec) -> Callable[..., Any] | None:
    """The user factory that ``spec.name`` names as ``package.module:factory`` (imported from that explicit path
    only), or None for a built-in model. A run calls it before it writes anything, so that a path that does not
    import is refused first.

    Raises:
        LifelongError: if the module or the attribute cannot be imported (naming ``model.name`` and the path).
    """
    if spec.name in BUILT_IN_MODELS:
        return None
    module_name, _, attr = spec.name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LifelongError(f"model.name: cannot import model factory '{spec.name}': {e}") from None


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Build the model named by ``spec`` for inputs ``[B, *input_shape]`` and ``num_outputs`` logits (a language
    model: token blocks of ``input_shape = (context + 1,)`` and a vocabulary of ``num_outputs``).

    Raises:
        LifelongError: if a user factory cannot be imported or does not return an ``nn.Module``.
    """
    if spec.name == "mlp":
        return MLP(math.prod(input_shape), spec.hidden, num_outputs)
    if spec.name == "cnn":
        return CNN(input_shape, spec.channels, num_outputs)
    if spec.name == "gpt":
        from orchestrator.gpt import GPT

        return GPT(num_outputs, spec.context or input_shape[0] - 1, spec.layers, spec.heads, spec.width, spec.dropout)
    if spec.name == "hf":
        from orchestrator.gpt import HFCausalLM

        assert spec.hf is not None
        return HFCausalLM(num_outputs, spec.hf.config, spec.hf.path)
    factory = model_factory(spec)
    assert factory is not None
    model = factory(input_shape=input_shape, num_outputs=num_outputs, **spec.params)
    if not isinstance(model, nn.Module):
        raise LifelongError(f"model.name: factory '{spec.name}' returned {type(model).__name__}, not nn.Module")
    return model
