"""Shared maths of the regularisation family (EWC, MAS, SI): per-sample gradient statistics and the quadratic
penalty ``sum_i Omega_i (theta_i - theta*_i)^2``.

Per-sample gradients are exact, computed with ``torch.func`` (``vmap`` over ``grad``) in chunks. Statistics are sums
over this worker's samples, all-reduced with the sample counts, so W workers give the mean over the union of their
shards: the same as one worker on the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call, grad, vmap

from strategies.base import Batch, StageContext

# (params, buffers, x [1, ...], y [1], t [1]) -> scalar objective of one sample
SampleObjective = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor,
                            torch.Tensor], torch.Tensor]


def per_worker(cap: int | None, world_size: int) -> int | None:
    """This worker's share ``ceil(cap / W)`` of a sample cap meant for all workers together (None: no cap)."""
    return None if cap is None else math.ceil(cap / world_size)


def capped_batches(ctx: StageContext, max_samples: int | None) -> Iterator[Batch]:
    """One pass over this worker's shard of the current domain, stopping after ``max_samples`` samples (the last
    batch truncated); the whole pass if ``max_samples`` is None."""
    count = 0
    for batch in ctx.iter_task_batches():
        if max_samples is not None:
            keep = max_samples - count
            batch = batch.select(slice(0, keep))
        count += len(batch)
        yield batch
        if max_samples is not None and count >= max_samples:
            return


def quadratic_penalty(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                      anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_i weights_i * (theta_i - anchor_i)^2`` over the parameters named in ``weights``.

    Args:
        params, weights, anchor: name -> tensor of the parameter's shape.
    Returns:
        scalar tensor, differentiable in ``params``.
    """
    total = torch.zeros(())
    for name, w in weights.items():
        p = params[name]
        total = total + (w.to(p.device) * (p - anchor[name].to(p.device)) ** 2).sum()
    return total


def per_sample_grad_stat(model: torch.nn.Module, objective: SampleObjective, batch: Batch,
                         stat: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sum_n stat(d objective_n / d theta)`` over the samples of ``batch``, per named parameter.

    Args:
        objective: per-sample scalar objective (see :data:`SampleObjective`).
        stat: element-wise map of a gradient, e.g. ``torch.square`` (Fisher) or ``torch.abs`` (MAS).
    Returns:
        name -> tensor shaped like the parameter.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return objective(p, buffers, x.unsqueeze(0), y.unsqueeze(0), t.unsqueeze(0))

    grads = vmap(grad(one), in_dims=(None, 0, 0, 0))(params, batch.x, batch.y, batch.t)
    return {n: stat(g).sum(0) for n, g in grads.items()}


def mean_grad_stat(ctx: StageContext, objective: SampleObjective, stat: Callable[[torch.Tensor], torch.Tensor],
                   chunk: int, max_samples: int | None) -> dict[str, torch.Tensor]:
    """Mean of ``stat(per-sample gradient)`` over the current domain's training data, across all workers.

    Args:
        chunk: samples per ``vmap`` call (memory: ``chunk x #params`` floats).
        max_samples: cap on samples from this worker (None = one full pass).
    Returns:
        name -> tensor shaped like the parameter, identical on every worker.
    """
    model = ctx.model
    was_training = model.training
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    count = 0
    for batch in capped_batches(ctx, max_samples):
        for start in range(0, len(batch), chunk):
            part = batch.select(slice(start, start + chunk))
            for n, g in per_sample_grad_stat(model, objective, part, stat).items():
                sums[n] += g
        count += len(batch)
    model.train(was_training)
    n_total = ctx.all_reduce_sum(torch.tensor([float(count)]))
    return {n: ctx.all_reduce_sum(s) / n_total.clamp(min=1.0) for n, s in sums.items()}


def nll_objective(model: torch.nn.Module, ctx: StageContext) -> SampleObjective:
    """Per-sample cross-entropy over the sample's own head (the log-likelihood used by the empirical Fisher)."""

    def objective(p: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
        return ctx.criterion(functional_call(model, (p, buffers), (x,)), Batch(x, y, t))

    return objective


def output_norm_objective(model: torch.nn.Module, ctx: StageContext) -> SampleObjective:
    """Per-sample squared L2 norm of the outputs of the sample's own head (MAS, Aljundi et al. 2018, Eq. 3)."""

    def objective(p: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  t: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x,))
        mask = ctx.head_mask.to(out.device)[t]
        return (out * mask).pow(2).sum()

    return objective
