"""Gradient Episodic Memory (GEM).

Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, §3, Eq. 10-13: with one
gradient ``g_t`` per earlier task t computed on that task's episodic memory (rows of ``G``, ``[k, P]``), a proposed
gradient ``g`` that violates any constraint ``g . g_t >= 0`` is replaced by its projection ``g~ = G^T v + g``,
where ``v`` solves the dual quadratic programme

    min_v  1/2 v^T G G^T v + g^T G^T v    subject to  v >= margin

(``margin`` = the authors' "memory strength"; ``eps`` regularises ``G G^T``). The QP is solved with ``quadprog``,
as in the authors' code. Memory: as A-GEM (``buffer_size // k`` samples per earlier task).

Distributed: ``g`` is DDP's all-reduced gradient, the memory is identical on every worker, and the QP is
deterministic, so every worker applies the same projected gradient.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from pydantic import Field

from strategies.agem import AGEM, AGEMConfig, write_flat_grad
from strategies.base import Batch, StageContext


class GEMConfig(AGEMConfig):
    """Parameters of :class:`GEM` (the memory parameters are A-GEM's)."""

    margin: float = Field(0.5, ge=0.0, description="memory strength: lower bound on the dual variables")
    eps: float = Field(1e-3, ge=0.0, description="ridge added to G G^T")


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float) -> torch.Tensor:
    """Project ``g`` (``[P]``) against the task gradients ``G`` (``[k, P]``) when any ``G g < 0`` (Eq. 13).

    Returns ``g`` itself when no constraint is violated.
    """
    if bool((G @ g >= 0).all()):
        return g
    mem = G.double().cpu().numpy()
    grad = g.double().cpu().numpy()
    P = mem @ mem.T
    P = 0.5 * (P + P.T) + eps * np.eye(len(mem))
    a = -(mem @ grad)  # quadprog minimises 1/2 v^T P v - a^T v subject to C^T v >= b
    v = quadprog.solve_qp(P, a, np.eye(len(mem)), np.full(len(mem), margin))[0]
    return torch.from_numpy(mem.T @ v + grad).to(g.dtype).to(g.device)


class GEM(AGEM):
    """GEM: one constraint per earlier task, resolved by a small QP at every step."""

    name = "gem"
    Config = GEMConfig

    def after_backward(self, ctx: StageContext) -> None:
        """Project the all-reduced gradient onto the feasible set of the earlier tasks' memory gradients."""
        if not self.memory:
            return
        params = [p for p in ctx.model.parameters() if p.requires_grad and p.grad is not None]
        rows = []
        for task in sorted(set(self.memory["t"].tolist())):
            idx = (self.memory["t"] == task).nonzero().flatten()
            ref = Batch.from_fields(self.memory).select(idx).to(ctx.device)
            grads = torch.autograd.grad(ctx.criterion(ctx.model(ref.x), ref), params, allow_unused=True,
                                        materialize_grads=True)
            rows.append(torch.cat([r.flatten() for r in grads]))
        flat = torch.cat([p.grad.flatten() for p in params])
        new = gem_project(flat, torch.stack(rows), self.config.margin, self.config.eps)
        if new is not flat:
            self.projected += 1
            write_flat_grad(params, new)
