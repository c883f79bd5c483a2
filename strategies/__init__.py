"""CL strategies as plugins.

Built-in strategies are listed in :data:`BUILTIN`. Third-party strategies are found, without any global registry to
mutate, through the ``lifelong.strategies`` entry-point group or an import path ``package.module:Class`` used as the
strategy name in the pipeline YAML.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig

BUILTIN: Mapping[str, str] = MappingProxyType({
    "finetune": "strategies.finetune:Finetune",
    "joint": "strategies.joint:Joint",
    "replay": "strategies.replay:Replay",
    "ewc": "strategies.ewc:EWC",
    "si": "strategies.si:SI",
    "mas": "strategies.mas:MAS",
    "lwf": "strategies.lwf:LwF",
    "derpp": "strategies.derpp:DERPP",
    "agem": "strategies.agem:AGEM",
    "gem": "strategies.gem:GEM",
    "spg": "strategies.spg:SPG",
    "packnet": "strategies.packnet:PackNet",
    "das": "strategies.das:DAS",
    "hat": "strategies.hat:HAT",
    "ncl": "strategies.ncl:NCL",
})


def _load(path: str) -> type[Strategy]:
    module_name, _, attr = path.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"'{path}' is not a subclass of strategies.Strategy")
    return cls


def known_strategies() -> list[str]:
    """Names of the built-in strategies and of those installed through the ``lifelong.strategies`` entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group="lifelong.strategies")})


def resolve_strategy(name: str) -> type[Strategy]:
    """Find the strategy class for a name: built-in key, entry point, or ``package.module:Class``.

    Raises:
        ValueError: naming the unknown strategy and listing the known ones.
    """
    if name in BUILTIN:
        return _load(BUILTIN[name])
    for ep in entry_points(group="lifelong.strategies"):
        if ep.name == name:
            return _load(ep.value)
    if ":" in name:
        try:
            return _load(name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import strategy '{name}': {e}") from None
    raise ValueError(f"unknown strategy '{name}' (known: {', '.join(known_strategies())})")


@dataclass(frozen=True)
class BoundStrategy:
    """A strategy class with its validated parameters: what crosses to the workers and evaluation actors, which
    build a fresh instance per stage without validating the parameters again.

    Attributes:
        cls: the strategy class (importable by the workers). config: its validated ``Config``.
    """

    cls: type[Strategy]
    config: StrategyConfig

    @property
    def name(self) -> str:
        """The strategy's registry key."""
        return self.cls.name

    def build(self) -> Strategy:
        """A fresh instance with no state."""
        return self.cls(self.config)


class StrategyParamError(ValueError):
    """A strategy of a pipeline cannot be resolved or its parameters are invalid.

    Attributes:
        index: the strategy's position in the pipeline's list. problem: what is wrong, in one line.
    """

    def __init__(self, index: int, problem: str) -> None:
        self.index, self.problem = index, problem
        super().__init__(f"strategy.{index}: {problem}")


def bind_strategies(specs: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[BoundStrategy, ...]:
    """Resolve each ``(name, params)`` pair and validate its parameters, once per run.

    Raises:
        StrategyParamError: naming the first strategy that is unknown or has invalid parameters, and every problem
            of its parameters (``buffer_size: Input should be greater than or equal to 1``).
    """
    from pydantic import ValidationError

    out = []
    for i, (name, params) in enumerate(specs):
        try:
            cls = resolve_strategy(name)
            out.append(BoundStrategy(cls, cls.Config.model_validate(dict(params))))
        except ValidationError as e:
            problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
            raise StrategyParamError(i, "; ".join(problems)) from None
        except ValueError as e:
            raise StrategyParamError(i, str(e)) from None
    return tuple(out)


def build_strategies(specs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Strategy]:
    """Instantiate strategies from ``(name, params)`` pairs, in hook order (tests and benchmarks; a run binds its
    strategies once with :func:`bind_strategies`).

    Raises:
        StrategyParamError: for an unknown strategy or bad parameters.
    """
    return [b.build() for b in bind_strategies(specs)]


def train_domains_of(strategies: list[Strategy], task_id: int) -> list[int]:
    """Domains streamed by stage ``task_id``: its own plus whatever each strategy asks for (joint: 0..task_id)."""
    wanted = {task_id}
    for s in strategies:
        wanted.update(s.train_domains(task_id))
    return sorted(wanted)


__all__ = ["BUILTIN", "Batch", "BoundStrategy", "LossTerms", "StageContext", "Strategy", "StrategyConfig",
           "StrategyParamError",
           "bind_strategies", "build_strategies", "known_strategies", "resolve_strategy", "train_domains_of"]
