"""Natural Continual Learning (NCL).

Kao, Jensen, van de Ven, Bernacchia & Hennequin, "Natural continual learning: success is a journey, not (just) a
destination", NeurIPS 2021, §3. After tasks ``< k`` the posterior is approximated by a Gaussian with mean
``mu_{k-1}`` (the parameters after task k-1) and precision ``Lambda_{k-1}``. Task k minimises
``L_k(theta) + 1/2 (theta - mu)^T Lambda (theta - mu)`` with updates preconditioned by ``Lambda^{-1}``:

    delta = -eta * Lambda^{-1} (grad L_k + Lambda (theta - mu)) = -eta * (Lambda^{-1} grad L_k + (theta - mu))

so the step both pulls toward ``mu_{k-1}`` and moves least along directions earlier tasks are certain about. Any
step longer than the trust-region radius ``r`` is scaled down to length ``r``.

Precision: ``Lambda = strength * sum_k F_k + damping * I``, with ``F_k`` the Fisher of task k at its optimum:
Kronecker-factored (``A ⊗ G``, Martens & Grosse 2015) for ``nn.Linear`` weights with their bias, diagonal for every
other parameter. The sum over tasks of Kronecker products is approximated by one product of summed factors,
``(sum A_k) ⊗ (mean G_k)``, exact when the factors are equal. ``Lambda^{-1}`` of a damped Kronecker product is
applied exactly through the eigendecompositions of its factors.

NCL is a preconditioned SGD method: use ``optimizer: {name: sgd}`` (its ``lr`` is ``eta``); an adaptive optimizer
would rescale the preconditioned step. Distributed: factor sums and counts are all-reduced, so precision is the same
on every worker; the preconditioning runs on DDP's all-reduced gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from strategies.base import StageContext, Strategy, StrategyConfig
from strategies.importance import capped_batches, mean_grad_stat, nll_objective, per_worker


class NCLConfig(StrategyConfig):
    """Parameters of :class:`NCL`."""

    strength: float = Field(1.0, ge=0.0, description="scale of the accumulated Fisher in the precision")
    damping: float = Field(1.0, gt=0.0, description="prior precision added to every parameter")
    radius: float = Field(1.0, gt=0.0, description="trust-region radius r of one update (parameter-space L2)")
    kfac: bool = Field(True, description="Kronecker-factored precision for Linear layers (else diagonal)")
    fisher_samples: int | None = Field(1024, ge=1, description="samples (all workers) for the Fisher")


def kron_inverse_apply(grad: torch.Tensor, A: torch.Tensor, G: torch.Tensor, strength: float,
                       damping: float) -> torch.Tensor:
    """``(strength * A ⊗ G + damping * I)^{-1} vec(grad)`` for a weight gradient ``[out, in]``.

    Args:
        grad: ``[out, in]``; A: ``[in, in]`` input factor; G: ``[out, out]`` output-gradient factor.
    """
    return kron_inverse_apply_eig(grad, eigen(A, G), strength, damping)


Eigen = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def eigen(A: torch.Tensor, G: torch.Tensor) -> Eigen:
    """``(dA, QA, dG, QG)``: eigenvalues (clamped at 0) and eigenvectors of the two symmetric factors."""
    dA, QA = torch.linalg.eigh(A)
    dG, QG = torch.linalg.eigh(G)
    return dA.clamp_min(0), QA, dG.clamp_min(0), QG


def kron_inverse_apply_eig(grad: torch.Tensor, eig: Eigen, strength: float, damping: float) -> torch.Tensor:
    """:func:`kron_inverse_apply` from precomputed eigendecompositions (cached once per stage)."""
    dA, QA, dG, QG = eig
    return QG @ ((QG.T @ grad @ QA) / (strength * torch.outer(dG, dA) + damping)) @ QA.T


def trust_region(step: list[torch.Tensor], radius: float) -> list[torch.Tensor]:
    """Scale a step (list of tensors) down to L2 length ``radius`` if it is longer; unchanged otherwise."""
    norm = math.sqrt(sum(float((s ** 2).sum()) for s in step))
    if norm <= radius:
        return step
    return [s * (radius / norm) for s in step]


def kfac_factors(ctx: StageContext, max_samples: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per ``nn.Linear`` (by module name): ``A = E[a a^T]`` over inputs with a bias 1 appended ``[in+1, in+1]`` and
    ``G = E[g g^T]`` over per-sample gradients of the log-likelihood w.r.t. the outputs ``[out, out]``."""
    model = ctx.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for n, m in linears.items():
        def fwd(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, n: str = n) -> None:
            inputs[n] = inp[0].detach()
            out.retain_grad()
            outputs[n] = out
        handles.append(m.register_forward_hook(fwd))
    sums = {n: (torch.zeros(m.in_features + 1, m.in_features + 1), torch.zeros(m.out_features, m.out_features))
            for n, m in linears.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in capped_batches(ctx, max_samples):
            loss = ctx.criterion(model(batch.x.to(ctx.device)), batch, reduction="none").sum()
            loss.backward()
            for n in linears:
                a = inputs[n].reshape(-1, linears[n].in_features).cpu()
                a = torch.cat([a, torch.ones(len(a), 1)], dim=1)
                g = outputs[n].grad.reshape(-1, linears[n].out_features).cpu()
                sums[n][0].add_(a.T @ a)
                sums[n][1].add_(g.T @ g)
            model.zero_grad(set_to_none=True)
            count += len(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n_total = float(ctx.all_reduce_sum(torch.tensor([float(count)]))[0])
    return {n: (ctx.all_reduce_sum(A) / max(n_total, 1.0), ctx.all_reduce_sum(G) / max(n_total, 1.0))
            for n, (A, G) in sums.items()}


class NCL(Strategy):
    """NCL: Fisher-preconditioned updates pulled toward the previous optimum, inside a trust region."""

    name = "ncl"
    Config = NCLConfig

    def __init__(self, config: NCLConfig) -> None:
        super().__init__(config)
        self.config: NCLConfig = config
        self.mu: dict[str, torch.Tensor] = {}
        self.diag: dict[str, torch.Tensor] = {}  # summed diagonal Fisher of non-KFAC parameters
        self.kron: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # Linear module -> (sum A, mean G)
        self.tasks = 0
        self.eig: dict[str, Eigen] = {}  # eigendecompositions of the Kronecker factors, computed once per stage

    def _lr(self, ctx: StageContext) -> float:
        return float(ctx.optimizer.param_groups[0]["lr"])

    def after_backward(self, ctx: StageContext) -> None:
        """Replace the gradient by ``Lambda^{-1} grad + (theta - mu)``, then cap the step ``lr * that`` at r."""
        params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad and p.grad is not None}
        direction = {n: p.grad.clone() for n, p in params.items()}
        if self.tasks:
            s, d = self.config.strength, self.config.damping
            done = set()
            for mod_name, (A, G) in self.kron.items():
                w, b = f"{mod_name}.weight" if mod_name else "weight", f"{mod_name}.bias" if mod_name else "bias"
                if w not in params:
                    continue
                full = torch.cat([params[w].grad, params[b].grad[:, None] if b in params else
                                  torch.zeros(len(params[w].grad), 1, device=params[w].grad.device)], dim=1)
                if mod_name not in self.eig:
                    self.eig[mod_name] = eigen(A, G)
                pre = kron_inverse_apply_eig(full.cpu(), self.eig[mod_name], s, d).to(full.device)
                direction[w] = pre[:, :-1]
                done.add(w)
                if b in params:
                    direction[b] = pre[:, -1]
                    done.add(b)
            for n in params:
                if n not in done:
                    direction[n] = params[n].grad / (s * self.diag.get(n, torch.zeros(())).to(params[n].device) + d)
                direction[n] = direction[n] + (params[n].detach() - self.mu[n].to(params[n].device))
        lr = self._lr(ctx)
        step = trust_region([lr * direction[n] for n in params], self.config.radius)
        for (n, p), st in zip(params.items(), step):
            p.grad.copy_(st / lr)

    def after_task(self, ctx: StageContext) -> None:
        """Add this task's Fisher to the precision and set ``mu`` to the current parameters."""
        cap = per_worker(self.config.fisher_samples, ctx.world_size)
        kron_modules = set()
        if self.config.kfac:
            factors = kfac_factors(ctx, cap)
            k = self.tasks + 1
            for n, (A, G) in factors.items():
                if n in self.kron:
                    A_sum, G_mean = self.kron[n]
                    self.kron[n] = (A_sum + A, G_mean + (G - G_mean) / k)
                else:
                    self.kron[n] = (A, G)
                kron_modules.update({f"{n}.weight" if n else "weight", f"{n}.bias" if n else "bias"})
        diag = mean_grad_stat(ctx, nll_objective(ctx.model, ctx), torch.square, 16, cap)
        for n, f in diag.items():
            if n not in kron_modules:
                self.diag[n] = self.diag.get(n, torch.zeros_like(f.cpu())) + f.cpu()
        self.mu = {n: p.detach().cpu().clone() for n, p in ctx.model.named_parameters()}
        self.tasks += 1
        self.eig = {}

    def state_dict(self) -> dict[str, Any]:
        """``mu``, the diagonal Fisher sums, the Kronecker factors per Linear module, and the task count."""
        return {"mu": self.mu, "diag": self.diag, "kron": self.kron, "tasks": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the posterior approximation of earlier tasks."""
        self.mu = dict(state.get("mu", {}))
        self.diag = dict(state.get("diag", {}))
        self.kron = dict(state.get("kron", {}))
        self.tasks = int(state.get("tasks", 0))
        self.eig = {}
