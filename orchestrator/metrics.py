"""Continual-learning metrics from the accuracy matrix.

``R[i][j]`` is the accuracy on domain j's test split after stage i (``T x T``); ``b[j]`` is the accuracy of the
initial model on domain j. Definitions follow Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017, §5 (ACC, BWT, FWT), and Chaudhry et al., "Riemannian Walk for Incremental Learning",
ECCV 2018, §4 (forgetting).
"""

from __future__ import annotations

import numpy as np


def cl_metrics(R: list[list[float]], b: list[float]) -> dict[str, float | list[float]]:
    """Compute ACC, BWT, FWT and forgetting.

    Args:
        R: ``T x T`` accuracies in [0, 1]; ``R[i][j]`` after stage i on domain j.
        b: ``T`` accuracies of the initial (untrained) model.
    Returns:
        ``acc`` = mean_j R[T-1][j];
        ``bwt`` = mean_{j<T-1} (R[T-1][j] - R[j][j]);
        ``fwt`` = mean_{j>0} (R[j-1][j] - b[j]);
        ``forgetting`` = per domain j < T-1, max_{i<T-1} R[i][j] - R[T-1][j] (a list of T-1 values), and
        ``avg_forgetting`` its mean. BWT, FWT and forgetting are 0.0 when T = 1.
    Raises:
        ValueError: if R is not square or b has the wrong length.
    """
    r = np.asarray(R, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or len(b) != r.shape[0]:
        raise ValueError(f"R must be T x T and b of length T; got R {r.shape}, b {len(b)}")
    t = r.shape[0]
    acc = float(r[-1].mean())
    if t == 1:
        return {"acc": acc, "bwt": 0.0, "fwt": 0.0, "forgetting": [], "avg_forgetting": 0.0}
    bwt = float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))
    fwt = float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))
    forgetting = [float(r[: t - 1, j].max() - r[-1, j]) for j in range(t - 1)]
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting, "avg_forgetting": float(np.mean(forgetting))}
