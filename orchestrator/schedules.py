"""Learning-rate schedules across the stages of a stream (``training.lr_schedule``).

Each stage builds a fresh optimizer at ``training.optimizer.lr`` (η_max); the schedule multiplies it by a factor per
optimizer step, from the stage's index k, its step s and its planned steps S (epochs x steps per epoch; the extra
epochs some strategies ask for keep the last factor):

- ``constant``: 1 throughout (the default).
- ``cosine``: re-warming and re-decaying at every domain (Ibrahim et al., "Simple and Scalable Strategies to
  Continually Pre-train Large Language Models", TMLR 2024, §5.1 and §6): a linear warm-up from ``min_ratio`` to 1
  over the first ``warmup_fraction`` of each stage, then a cosine decay to ``min_ratio`` at its end.
- ``infinite``: the infinite schedule of the same paper, §7.2: a linear warm-up (the first ``warmup_fraction`` of
  stage 0) and a cosine cool-down to ``constant_ratio`` (the next ``cooldown_fraction`` of stage 0), then a constant
  rate carried across the domains with no re-warming, and an annealing phase at the end of every stage (its last
  ``anneal_fraction``), an exponential decay from ``constant_ratio`` to ``min_ratio``: each stage's checkpoint is an
  annealed model, and the next stage goes on at the constant rate.

The schedule is plotted into the run's artifacts (``lr_schedule.png``, :func:`save_schedule_plot`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec import ScheduleSpec


def lr_factor(spec: ScheduleSpec, stage: int, step: int, steps: int) -> float:
    """The factor on η_max at optimizer step ``step`` (0-based) of stage ``stage``, which plans ``steps`` steps.

    Returns:
        a float in ``[min_ratio, 1]`` (``constant``: 1.0).
    """
    if spec.name == "constant" or steps <= 0:
        return 1.0
    s = min(step, steps)
    warm = max(1, round(spec.warmup_fraction * steps))
    if spec.name == "cosine":
        if s < warm:
            return spec.min_ratio + (1 - spec.min_ratio) * (s + 1) / warm
        progress = (s - warm) / max(1, steps - warm)
        return spec.min_ratio + (1 - spec.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    anneal = max(1, round(spec.anneal_fraction * steps))
    if s >= steps - anneal:  # annealing: exponential decay from the constant rate to min_ratio
        progress = (s - (steps - anneal) + 1) / anneal
        return spec.constant_ratio * (spec.min_ratio / spec.constant_ratio) ** progress
    if stage > 0:
        return spec.constant_ratio
    cool = max(1, round(spec.cooldown_fraction * steps))
    if s < warm:
        return (s + 1) / warm
    if s < warm + cool:
        progress = (s - warm) / cool
        return spec.constant_ratio + (1 - spec.constant_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return spec.constant_ratio


def save_schedule_plot(spec: ScheduleSpec, lr: float, steps: Sequence[int], names: Sequence[str], path: Path) -> Path:
    """Plot the learning rate against the run's optimizer steps (stage boundaries dashed, each stage named) as a
    PNG at ``path``; ``steps``: the planned steps of each stage; ``lr``: η_max. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    offset = 0
    for k, (n, name) in enumerate(zip(steps, names)):
        xs = range(offset, offset + n)
        ax.plot(list(xs), [lr * lr_factor(spec, k, s, n) for s in range(n)], color="C0", linewidth=1.2)
        ax.axvline(offset, color="grey", linestyle="--", linewidth=0.7)
        ax.text(offset + n / 2, lr * 1.04, name, ha="center", va="bottom", fontsize=8)
        offset += n
    ax.set_ylim(0, lr * 1.15)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"training.lr_schedule: {spec.name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
