"""CL strategies as plugins.

Built-in strategies are listed in :data:`BUILTIN`. Third-party strategies are found, without any global registry to
mutate, through the ``lifelong.strategies`` entry-point group or an import path ``package.module:Class`` used as the
strategy name in the pipeline YAML.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType

from strategies.base import Batch, StageContext, Strategy, StrategyConfig

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


def build_strategies(specs: list[tuple[str, dict]]) -> list[Strategy]:
    """Instantiate strategies from ``(name, params)`` pairs, in hook order.

    Raises:
        ValueError: for an unknown strategy; pydantic.ValidationError for bad parameters.
    """
    out = []
    for name, params in specs:
        cls = resolve_strategy(name)
        out.append(cls(cls.Config.model_validate(params)))
    return out


def train_domains_of(strategies: list[Strategy], task_id: int) -> list[int]:
    """Domains streamed by stage ``task_id``: its own plus whatever each strategy asks for (joint: 0..task_id)."""
    wanted = {task_id}
    for s in strategies:
        wanted.update(s.train_domains(task_id))
    return sorted(wanted)


__all__ = ["BUILTIN", "Batch", "StageContext", "Strategy", "StrategyConfig", "build_strategies",
           "known_strategies", "resolve_strategy", "train_domains_of"]
