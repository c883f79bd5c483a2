"""Learning without Forgetting (LwF) / knowledge distillation from the previous stage's model.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017, §3, Eq. 2-4: the teacher is the model as it was
when the stage started (the previous stage's checkpoint). On every batch the student keeps the teacher's outputs on
the *old* units through a temperature-T distillation term, while the new units learn from the labels:

    loss = beta * CE(new) + alpha * T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )   on old units

Old units are the output units of the labels of domains seen before the current one (task-IL: earlier heads;
class-IL: earlier classes; domain-IL: the shared head), from ``StageContext.units_of()``. ``T^2`` keeps gradient magnitudes comparable across
temperatures (Hinton et al. 2015, §2).

Distributed: the teacher is a frozen copy of the model on each worker; the loss is per batch, so DDP averages it like
the cross-entropy. The teacher is not stored: it is the parent checkpoint, which every stage loads anyway.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from strategies.base import Batch, StageContext, Strategy, StrategyConfig


class LwFConfig(StrategyConfig):
    """Parameters of :class:`LwF`."""

    alpha: float = Field(1.0, ge=0.0, description="weight of the distillation term")
    beta: float = Field(1.0, ge=0.0, description="weight of the cross-entropy on the new labels")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature T")


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


class LwF(Strategy):
    """Distil the previous stage's outputs on old units while learning the new domain."""

    name = "lwf"
    Config = LwFConfig

    def __init__(self, config: LwFConfig) -> None:
        super().__init__(config)
        self.config: LwFConfig = config
        self.teacher: torch.nn.Module | None = None
        self.units = torch.zeros(0, dtype=torch.bool)

    def before_task(self, ctx: StageContext) -> None:
        """Freeze a copy of the model as it starts this stage (the previous stage's model) as the teacher."""
        self.units = old_units(ctx.units_of(), ctx.task_id).to(ctx.device)
        self.teacher = None
        if bool(self.units.any()):
            self.teacher = copy.deepcopy(ctx.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``beta * loss + alpha * kd_loss(student[:, old], teacher[:, old], T)``."""
        if self.teacher is None:
            return self.config.beta * loss
        with torch.no_grad():
            teacher = self.teacher(batch.x)
        kd = kd_loss(outputs[:, self.units], teacher[:, self.units], self.config.temperature)
        return self.config.beta * loss + self.config.alpha * kd

    def after_task(self, ctx: StageContext) -> None:
        """Drop the teacher; the next stage's teacher is this stage's checkpoint."""
        self.teacher = None
