"""Learning without Forgetting (LwF) / knowledge distillation from the previous stage's model, with head growth.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, §3, Eq. 2-4: the teacher is the model as it was
when the stage started (the previous stage's checkpoint). On every batch the student keeps the teacher's outputs on
the *old* units through a temperature-T distillation term, while the new units learn from the labels:

    loss = beta * CE(new) + alpha * T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )   on old units

Old units are the output units of the labels of domains seen before the current one (task-IL: earlier heads;
class-IL: earlier classes; domain-IL: the shared head), from ``StageContext.units_of()``. ``T^2`` keeps gradient
magnitudes comparable across temperatures (Hinton et al. 2015, §2). ``weighting: tasks`` sets ``beta = 1/k`` and
``alpha = 1 - 1/k`` at the k-th domain (1-based), the weighting of van de Ven & Tolias 2019 ("Three scenarios for
continual learning", §4) whose LwF figures Hsu et al. 2018 report.

Head growth, ``head`` (Monaikul, Castellucci, Filice & Rokhlenko, "Continual Learning for Named Entity Recognition",
AAAI 2021, §3). A label may be the "other" class ``O`` (``other_label``), present in every domain: samples of old
classes in a new domain's data are labelled ``O`` there.

- ``shared`` (default): Li & Hoiem's LwF above; distillation on every sample.
- ``extend`` (ExtendNER, §3.2): one output layer that grows from the ``2n+1`` units of the n classes seen so far (plus
  O) to ``2n+2m+1`` when a domain brings m new ones. The pipeline's layout pre-sizes the layer for every domain; a unit
  takes part only from its domain's stage on (later units are masked out of the softmax in training and inference),
  which is the same function and the same gradients as appending freshly initialised rows at that stage. A sample
  labelled ``O`` or an old class gets the KL term over the old units (O included); a sample of a new class gets
  cross-entropy over the active units. Needs a class-IL layout.
- ``add`` (AddNER, §3.1): one head per domain over ``O`` and that domain's classes (the task-IL layout, with ``O``
  among each domain's labels). The new head learns from the labels (cross-entropy, every other label mapped to its O);
  every old head is distilled on every sample, each with its own softmax (one KL per old head, summed). The evaluation
  scores each head on its own domain (task-aware); :func:`merge_heads` is the paper's task-agnostic decision rule.

Distributed: the teacher is a frozen copy of the model on each worker; the loss is per batch, so DDP averages it like
the cross-entropy. The teacher is not stored: it is the parent checkpoint, which every stage loads anyway.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field

from strategies.base import Batch, LossTerms, StageContext, Strategy, StrategyConfig


class LwFConfig(StrategyConfig):
    """Parameters of :class:`LwF`."""

    alpha: float = Field(1.0, ge=0.0, description="weight of the distillation term (weighting: fixed)")
    beta: float = Field(1.0, ge=0.0, description="weight of the cross-entropy on the new labels (weighting: fixed)")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T")
    weighting: Literal["fixed", "tasks"] = Field(
        "fixed", description="fixed alpha/beta, or beta = 1/k and alpha = 1 - 1/k at the k-th domain")
    head: Literal["shared", "extend", "add"] = Field(
        "shared", description="head growth (Monaikul et al. 2021): shared output layer, extend it, or add a head")
    other_label: int | None = Field(None, ge=0, description="raw label of the 'other' (O) class, if there is one")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_n KL(softmax(teacher_n / T) || softmax(student_n / T))``.

    Args:
        student, teacher: logits ``[B, K]`` over the same (old) units.
    Returns:
        scalar tensor (0 for an empty batch or no units).
    """
    if student.numel() == 0:
        return student.sum()
    log_p_student = torch.log_softmax(student / temperature, dim=1)
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    kl = (p_teacher * (torch.log(p_teacher.clamp_min(1e-12)) - log_p_student)).sum(1)
    return temperature ** 2 * kl.mean()


def old_units(domain_units: torch.Tensor, task_id: int) -> torch.Tensor:
    """Bool ``[K]``: output units that belong to the labels of domains ``0..task_id-1`` (``domain_units``:
    ``[T, K]``)."""
    if task_id == 0:
        return torch.zeros(domain_units.shape[1], dtype=torch.bool)
    return domain_units[:task_id].any(0)


def extend_loss(student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor, old: torch.Tensor,
                active: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ExtendNER's two terms (Monaikul et al. 2021, §3.2): cross-entropy on new-class samples, KL on the others.

    Args:
        student: ``[B, K]`` logits. teacher: ``[B, K]`` logits of the previous stage's model (None at the first
            domain). y: ``[B]`` target units. old: ``[K]`` bool, units of earlier domains' labels (O included).
        active: ``[K]`` bool, old units plus the current domain's (the widened layer).
    Returns:
        ``(ce, kd)``: mean cross-entropy over the active units of the samples whose target is not an old unit, and
        :func:`kd_loss` over the old units of the samples whose target is one (O or an old class); each is weighted
        by its share of the batch, so that ``ce + kd`` is a per-sample mean.
    """
    routed = old[y] if teacher is not None else torch.zeros_like(y, dtype=torch.bool)
    logits = student.masked_fill(~active, float("-inf"))
    ce = torch.nn.functional.cross_entropy(logits[~routed], y[~routed], reduction="sum") / max(len(y), 1)
    if teacher is None or not bool(routed.any()):
        return ce, student.sum() * 0.0
    share = float(routed.sum()) / len(y)
    return ce, share * kd_loss(student[routed][:, old], teacher[routed][:, old], temperature)


def add_kd_loss(student: torch.Tensor, teacher: torch.Tensor, heads: torch.Tensor, temperature: float) -> torch.Tensor:
    """AddNER's distillation (Monaikul et al. 2021, §3.1): one KL per old head, each over its own softmax, summed.

    Args:
        student, teacher: ``[B, K]`` logits. heads: ``[H, K]`` bool, the units of each old head.
    """
    total = student.sum() * 0.0
    for units in heads:
        total = total + kd_loss(student[:, units], teacher[:, units], temperature)
    return total


def merge_heads(logits: torch.Tensor, heads: torch.Tensor, other_units: torch.Tensor) -> torch.Tensor:
    """AddNER's task-agnostic decision (Monaikul et al. 2021, §3.1): O unless some head predicts one of its classes,
    then the class with the highest probability among the heads that do.

    Args:
        logits: ``[B, K]`` outputs of all heads. heads: ``[H, K]`` bool, each head's units.
        other_units: ``[H]`` long, the O unit of each head.
    Returns:
        ``[B]`` long: the chosen unit; ``other_units[0]`` (the first head's O) where every head says O.
    """
    best = torch.full((len(logits),), -1.0, device=logits.device)
    choice = torch.full((len(logits),), int(other_units[0]), dtype=torch.long, device=logits.device)
    for units, o in zip(heads, other_units):
        idx = units.nonzero().flatten()
        prob = torch.softmax(logits[:, idx], dim=1)
        p, arg = prob.max(1)
        unit = idx[arg]
        wins = (unit != o) & (p > best)
        best = torch.where(wins, p, best)
        choice = torch.where(wins, unit, choice)
    return choice


class _ActiveUnits(torch.nn.Module):
    """Inference wrapper for ``head: extend``: logits ``[B, K]`` with units not yet grown set to -inf."""

    def __init__(self, model: torch.nn.Module, active: torch.Tensor) -> None:
        super().__init__()
        self.model, self.active = model, active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *input_shape]`` -> ``[B, K]`` masked logits."""
        out = self.model(x)
        return out.masked_fill(~self.active.to(out.device), float("-inf"))


class LwF(Strategy):
    """Distil the previous stage's outputs on old units while learning the new domain; optional head growth."""

    name = "lwf"
    Config = LwFConfig
    supports_text = False  # its distillation and head growth work on class heads

    def __init__(self, config: LwFConfig) -> None:
        super().__init__(config)
        self.config: LwFConfig = config
        self.teacher: torch.nn.Module | None = None
        self.units = torch.zeros(0, dtype=torch.bool)  # old units of this stage
        self.active = torch.zeros(0, dtype=torch.bool)  # extend: units grown so far (saved for inference)
        self.heads = torch.zeros(0, 0, dtype=torch.bool)  # add: units of each old head
        self.weights = (config.alpha, config.beta)

    def before_task(self, ctx: StageContext) -> None:
        """Freeze a copy of the model as it starts this stage (the previous stage's model) as the teacher, and
        work out the old units, the grown layer (extend) or the old heads (add).

        Raises:
            ValueError: ``extend`` without a class-IL layout, or ``add`` without a task-IL one; or ``other_label``
                set but missing from a domain.
        """
        units = ctx.units_of()
        k = ctx.task_id
        task_il = not bool(ctx.head_mask.all())
        if self.config.head == "extend" and task_il:
            raise ValueError("lwf head 'extend' grows one shared output layer: it needs a class-IL pipeline")
        if self.config.head == "add" and not task_il:
            raise ValueError("lwf head 'add' gives each domain its own head: it needs a task-IL pipeline")
        if self.config.other_label is not None:
            table = ctx.target_table
            if table is None or self.config.other_label >= table.shape[1] or bool(
                    (table[: k + 1, self.config.other_label] < 0).any()):
                raise ValueError(f"lwf other_label {self.config.other_label} is not a label of every domain so far")
        self.units = old_units(units, k).to(ctx.device)
        self.active = units[: k + 1].any(0).to(ctx.device)
        self.heads = ctx.head_mask[:k].to(ctx.device)
        if self.config.weighting == "tasks":
            self.weights = (1.0 - 1.0 / (k + 1), 1.0 / (k + 1))
        self.teacher = None
        if bool(self.units.any()):
            self.teacher = copy.deepcopy(ctx.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """``beta * CE + alpha * KD`` with the terms chosen by ``head`` (see the module docstring): scale ``ce`` by
        beta (``extend`` first replaces it by ExtendNER's cross-entropy on new-class samples) and add ``lwf.kd`` =
        ``alpha * KD``. Terms other strategies add keep their own weights."""
        alpha, beta = self.weights
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(batch.x)
        if self.config.head == "extend":
            ce, kd = extend_loss(outputs, teacher, batch.y, self.units, self.active, self.config.temperature)
            terms.replace("ce", ce)
        elif teacher is None:
            kd = outputs.sum() * 0.0
        elif self.config.head == "add":
            kd = add_kd_loss(outputs, teacher, self.heads, self.config.temperature)
        else:
            kd = kd_loss(outputs[:, self.units], teacher[:, self.units], self.config.temperature)
        terms.scale("ce", beta)
        terms.add("lwf.kd", alpha * kd)

    def after_task(self, ctx: StageContext) -> None:
        """Drop the teacher; the next stage's teacher is this stage's checkpoint."""
        self.teacher = None

    def inference_model(self, model: torch.nn.Module, task_id: int) -> torch.nn.Module:
        """``extend``: mask the units of domains not trained yet (a layer that has not grown them); else unchanged."""
        if self.config.head == "extend" and self.active.numel():
            return _ActiveUnits(model, self.active.cpu())
        return model

    def state_dict(self) -> dict[str, Any]:
        """``active``: the units grown so far (``extend``), which inference needs."""
        return {"active": self.active.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the grown units."""
        self.active = state.get("active", torch.zeros(0, dtype=torch.bool))
