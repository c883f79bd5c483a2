"""Continual-learning metrics from the accuracy matrix (or, for language models, the perplexity matrix), and the
stability-gap metrics of continual evaluation.

``R[i][j]`` is the accuracy on domain j's test split after stage i (``T x T``); ``b[j]`` is the accuracy of the
initial model on domain j. Definitions follow Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
Learning", NeurIPS 2017, §5 (ACC, BWT, FWT), and Chaudhry et al., "Riemannian Walk for Incremental Learning",
ECCV 2018, §4 (forgetting).
"""

from __future__ import annotations

import numpy as np


def _square(matrix: list[list[float]], b: list[float], name: str) -> np.ndarray:
    """``matrix`` as a ``T x T`` float array.

    Raises:
        ValueError: if it is not square or ``b`` is not of length T (naming the matrix).
    """
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or len(b) != m.shape[0]:
        raise ValueError(f"{name} must be T x T and b of length T; got {name} {m.shape}, b {len(b)}")
    return m


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
    r = _square(R, b, "R")
    t = r.shape[0]
    acc = float(r[-1].mean())
    if t == 1:
        return {"acc": acc, "bwt": 0.0, "fwt": 0.0, "forgetting": [], "avg_forgetting": 0.0}
    bwt = float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))
    fwt = float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))
    forgetting = [float(r[: t - 1, j].max() - r[-1, j]) for j in range(t - 1)]
    return {"acc": acc, "bwt": bwt, "fwt": fwt, "forgetting": forgetting, "avg_forgetting": float(np.mean(forgetting))}


def seen_metrics(rows: list[list[float]]) -> dict[str, float]:
    """ACC, BWT and mean forgetting over the domains seen so far: rows ``R[0..k]`` (each over all T domains) give
    the metrics of :func:`cl_metrics` on the leading ``(k+1) x (k+1)`` block, i.e. after stage k on domains 0..k.

    Args:
        rows: ``k+1`` rows of R, each of length T ≥ k+1, accuracies in [0, 1].
    Returns:
        ``acc`` = mean_{j≤k} R[k][j]; ``bwt`` and ``forgetting`` (the mean of :func:`cl_metrics`'s per-domain
        forgetting) over domains j < k; both 0.0 when k = 0.
    Raises:
        ValueError: if there are no rows or a row is shorter than the number of rows.
    """
    k = len(rows) - 1
    if k < 0 or any(len(r) <= k for r in rows):
        raise ValueError(f"need k+1 rows of at least k+1 accuracies; got {len(rows)} rows")
    m = cl_metrics([list(r[:k + 1]) for r in rows], [0.0] * (k + 1))
    return {"acc": float(m["acc"]), "bwt": float(m["bwt"]), "forgetting": float(m["avg_forgetting"])}


class SeenSoFar:
    """Rows of R, given as they complete (in any order); each call to :meth:`add` returns the metrics of
    :func:`seen_metrics` for every stage k whose rows ``R[0..k]`` have all arrived since, in order of k."""

    def __init__(self) -> None:
        self.rows: dict[int, list[float]] = {}
        self.done = 0  # stages whose metrics have been returned

    def add(self, row: int, accs: list[float]) -> list[tuple[int, dict[str, float]]]:
        """Record row ``row`` (accuracies in [0, 1] over all T domains; row -1, the initial model, is ignored)."""
        if row >= 0:
            self.rows[row] = list(accs)
        out = []
        while self.done in self.rows:
            out.append((self.done, seen_metrics([self.rows[i] for i in range(self.done + 1)])))
            self.done += 1
        return out


def stability_gap(points: list[dict[str, float]], num_domains: int, window_steps: int) -> dict[str, float]:
    """The continual-evaluation metrics of De Lange et al., "Continual evaluation for lifelong learning: identifying
    the stability gap", ICLR 2023, §3, from the curve of a run (``evaluation.every_n_steps``).

    Let a(i, n) be the accuracy on domain i's fixed subsample at global training step n, and t_i the step at which
    stage i's training ended (its ``end`` point).

    Args:
        points: ``{"stage", "global_step", "col", "acc", "end"}`` per curve point, any order.
        num_domains: T. window_steps: w, the window of the windowed forgetting, in steps.
    Returns:
        ``task_end_acc`` = mean_{i<T-1} a(i, t_i); ``min_acc`` = mean_{i<T-1} min_{n>t_i} a(i, n) (min-ACC);
        ``wc_acc`` = a(T-1, t_{T-1}) / T + (1 - 1/T) min-ACC (WC-ACC); ``windowed_forgetting`` = mean_{i<T-1}
        max_{t_i <= n1 < n2 <= n1 + w} (a(i, n1) - a(i, n2)) (WF^w); ``gap`` = task_end_acc - min_acc. Domains
        with no point after their stage are left out of the means; NaN where no domain is left (e.g. T = 1).
    """
    nan = float("nan")
    end_step: dict[int, float] = {}
    end_acc: dict[int, float] = {}
    for p in points:
        if p["end"] and p["col"] == p["stage"]:
            end_step[int(p["stage"])] = p["global_step"]
            end_acc[int(p["stage"])] = p["acc"]
    mins, ends, drops = [], [], []
    for i in range(num_domains - 1):
        if i not in end_step:
            continue
        curve = sorted((p["global_step"], p["acc"]) for p in points if p["col"] == i and p["stage"] > i)
        if not curve:
            continue
        mins.append(min(acc for _, acc in curve))
        ends.append(end_acc[i])
        series = [(end_step[i], end_acc[i]), *curve]
        drops.append(max(0.0, max((a1 - a2 for k, (n1, a1) in enumerate(series) for n2, a2 in series[k + 1:]
                                   if n2 - n1 <= window_steps), default=0.0)))
    if not mins:
        return {"task_end_acc": nan, "min_acc": nan, "wc_acc": nan, "windowed_forgetting": nan, "gap": nan}
    min_acc, task_end = float(np.mean(mins)), float(np.mean(ends))
    last = end_acc.get(num_domains - 1, nan)
    return {"task_end_acc": task_end, "min_acc": min_acc,
            "wc_acc": last / num_domains + (1 - 1 / num_domains) * min_acc,
            "windowed_forgetting": float(np.mean(drops)), "gap": task_end - min_acc}


def lm_metrics(P: list[list[float]], b: list[float]) -> dict[str, float | list[float]]:
    """Continual-learning metrics of a language model from its perplexity matrix (lower is better), the analogues
    of :func:`cl_metrics` as in continual pre-training (Ke et al., "Continual Pre-training of Language Models",
    ICLR 2023, §4; Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
    Models", TMLR 2024, §5).

    Args:
        P: ``T x T`` validation perplexities; ``P[i][j]`` after stage i on domain j.
        b: ``T`` perplexities of the initial model.
    Returns:
        ``avg_ppl`` = mean_j P[T-1][j]; ``ppl_rise`` = mean_{j<T-1} (P[T-1][j] - P[j][j]), the mean rise in
        perplexity on the earlier domains (forgetting; negative is backward transfer); ``ppl_forgetting`` = per
        domain j < T-1, P[T-1][j] - min_{i<T-1} P[i][j] (a list), and ``avg_ppl_forgetting`` its mean; ``ppl_fwt`` =
        mean_{j>0} (b[j] - P[j-1][j]), how much lower than the initial model's the perplexity on domain j is before
        it is trained on. The rise, forgetting and FWT are 0.0 when T = 1.
    Raises:
        ValueError: if P is not square or b has the wrong length.
    """
    p = _square(P, b, "P")
    t = p.shape[0]
    avg = float(p[-1].mean())
    if t == 1:
        return {"avg_ppl": avg, "ppl_rise": 0.0, "ppl_forgetting": [], "avg_ppl_forgetting": 0.0, "ppl_fwt": 0.0}
    forgetting = [float(p[-1, j] - p[: t - 1, j].min()) for j in range(t - 1)]
    return {"avg_ppl": avg, "ppl_rise": float(np.mean([p[-1, j] - p[j, j] for j in range(t - 1)])),
            "ppl_forgetting": forgetting, "avg_ppl_forgetting": float(np.mean(forgetting)),
            "ppl_fwt": float(np.mean([b[j] - p[j - 1, j] for j in range(1, t)]))}


def lm_stability_gap(points: list[dict[str, float]], num_domains: int) -> dict[str, float]:
    """The stability gap of a language model, the analogue of :func:`stability_gap` on perplexity (lower is better):
    with p(i, n) = exp(nll) on domain i's fixed subsample at global step n and t_i the end of stage i's training,

    Args:
        points: ``{"stage", "global_step", "col", "nll", "end"}`` per curve point (nll in nats per token).
        num_domains: T.
    Returns:
        ``task_end_ppl`` = mean_{i<T-1} p(i, t_i); ``max_ppl`` = mean_{i<T-1} max_{n>t_i} p(i, n); ``gap`` =
        max_ppl - task_end_ppl (how far perplexity on earlier domains climbs while later ones train). NaN where no
        domain has points after its stage (e.g. T = 1).
    """
    nan = float("nan")
    ends = {int(p["stage"]): float(np.exp(p["nll"])) for p in points if p["end"] and p["col"] == p["stage"]}
    peaks, at_end = [], []
    for i in range(num_domains - 1):
        later = [float(np.exp(p["nll"])) for p in points if p["col"] == i and p["stage"] > i]
        if i in ends and later:
            peaks.append(max(later))
            at_end.append(ends[i])
    if not peaks:
        return {"task_end_ppl": nan, "max_ppl": nan, "gap": nan}
    return {"task_end_ppl": float(np.mean(at_end)), "max_ppl": float(np.mean(peaks)),
            "gap": float(np.mean(peaks) - np.mean(at_end))}
