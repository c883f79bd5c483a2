"""The run's own records: progress on the terminal, the event log, and the report (the accuracy matrix and CL
metrics as a terminal table, a JSON file and a PNG heatmap).

Three listeners of the stage engine (``orchestrator/engine.py``) live here:

- :class:`ProgressBar`: stage k/T, epoch, samples/s and ETA on the terminal;
- :class:`RunRecord`: ``events.jsonl`` (unix timestamps of every stage, epoch and evaluation cell, for overlap and
  timing audits) and each stage's ``_COMPLETED`` record on the run's storage;
- :class:`ReportBuilder`: the report's stages, R, b and the CL metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from orchestrator.engine import Cell, CurvePoint, Listener, RunInfo, StageResult
from orchestrator.metrics import cl_metrics, lm_metrics, lm_stability_gap, stability_gap
from orchestrator.plan import StageSpec
from orchestrator.stage import Progress
from orchestrator.storage import join, replace_file


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print the accuracy matrix R (rows: after stage i; columns: domain j), or for text domains the perplexity
    matrix P, the metrics and per-stage timings."""
    names = report["domains"]
    if report["R"]:
        _print_matrix(report, console)
    else:
        console.print(f"evaluation disabled: no accuracy matrix (wall {report['wall_seconds']:.1f} s, MLflow run "
                      f"{report['mlflow_run_id']})")
    stages = Table(title="Stages")
    for col in ("stage", "domain", "wall s", "train s", "overhead s", "samples/s", "final loss"):
        stages.add_column(col, justify="right")
    for s in report["stages"]:
        stages.add_row(str(s["stage"]), names[s["stage"]], f"{s['wall_seconds']:.1f}", f"{s['train_seconds']:.1f}",
                       f"{s['overhead_seconds']:.1f}", f"{s['samples_per_second']:.0f}", f"{s['epoch_loss'][-1]:.4f}")
    console.print(stages)
    if report.get("evaluation_actor_restarts"):
        console.print(f"evaluation: {report['evaluation_actor_restarts']} actor(s) died and were replaced; their cells "
                      "were computed again", highlight=False)
    if report.get("skipped_batches"):
        console.print(f"skipped {report['skipped_batches']} batch(es) with a NaN or infinite loss "
                      "(training.on_nonfinite: skip_batch; per stage in report.json)", highlight=False)
    gap = report.get("stability")
    if gap and "max_ppl" in gap:
        console.print(f"continual evaluation ({len(report['curve'])} points): task-end perplexity "
                      f"{gap['task_end_ppl']:.3f}, max perplexity {gap['max_ppl']:.3f} (stability gap "
                      f"{gap['gap']:.3f})", highlight=False)
    elif gap:
        console.print(f"continual evaluation ({len(report['curve'])} points): task-end ACC {gap['task_end_acc']:.4f}, "
                      f"min-ACC {gap['min_acc']:.4f} (stability gap {gap['gap']:.4f}), WC-ACC {gap['wc_acc']:.4f}, "
                      f"windowed forgetting {gap['windowed_forgetting']:.4f}", highlight=False)


def _print_matrix(report: dict[str, Any], console: Console) -> None:
    """R (or, for text, P) with the initial model's row, then the summary of its metrics."""
    text = bool(report.get("P"))
    if text:
        title, matrix, b, fmt = "Perplexity matrix P[i][j]", report["P"], report["P_b"], "{:.2f}"
        summary = {"avg PPL": f"{report['avg_ppl']:.3f}", "PPL rise": f"{report['ppl_rise']:+.3f}",
                   "PPL forgetting": f"{report['avg_ppl_forgetting']:.3f}", "PPL FWT": f"{report['ppl_fwt']:+.3f}",
                   "bits/token": f"{report['bits_per_token']:.4f}"}
    else:
        title, matrix, b, fmt = "Accuracy matrix R[i][j]", report["R"], report["b"], "{:.3f}"
        summary = {"ACC": f"{report['acc']:.4f}", "BWT": f"{report['bwt']:+.4f}", "FWT": f"{report['fwt']:+.4f}",
                   "forgetting": f"{report['avg_forgetting']:.4f}"}
    names = report["domains"]
    table = Table(title=f"{title} ({report['pipeline']}, strategy {report['strategy']}"
                        + ("; lower is better)" if text else ")"))
    table.add_column("after stage")
    for n in names:
        table.add_column(n, justify="right")
    table.add_row("init (b)", *[fmt.format(v) for v in b], style="dim")
    for i, row in enumerate(matrix):
        table.add_row(f"{i}: {names[i]}", *[fmt.format(v) for v in row])
    console.print(table)
    summary.update({"wall s": f"{report['wall_seconds']:.1f}", "MLflow run": report["mlflow_run_id"]})
    table = Table(title="Summary")
    for col in summary:
        table.add_column(col, justify="right")
    table.add_row(*summary.values())
    console.print(table)


def save_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Save R as a PNG heatmap (rows: after stage i, columns: domain j, values in [0, 1]), or for text domains the
    perplexity matrix P (colours on a log scale), and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names, text = report["domains"], bool(report.get("P"))
    t = len(names)
    matrix = report["P"] if text else report["R"]
    fig, ax = plt.subplots(figsize=(1.2 * t + 2.5, 1.0 * t + 1.8))
    if text:
        im = ax.imshow(matrix, norm=LogNorm(), cmap="viridis_r")
        middle = float(np.sqrt(np.min(matrix) * np.max(matrix)))
    else:
        im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(t):
            v = matrix[i][j]
            dark = v > middle if text else v < 0.6
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated on domain j")
    if text:
        ax.set_title(f"{report['pipeline']} / {report['strategy']}: perplexity; avg {report['avg_ppl']:.2f}, rise "
                     f"{report['ppl_rise']:+.2f}", fontsize=10)
    else:
        ax.set_title(f"{report['pipeline']} / {report['strategy']}: ACC {report['acc']:.3f}, BWT "
                     f"{report['bwt']:+.3f}")
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    if text:  # plain numbers on the log scale's ticks
        from matplotlib.ticker import FormatStrFormatter

        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        bar.ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curve(report: dict[str, Any], path: Path) -> Path:
    """Save the continual-evaluation curves as a PNG (accuracy, or for text perplexity on a log scale, on each
    domain's subsample against the global training step, one line per domain, the stage boundaries dashed) and return
    the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, points, text = report["domains"], report["curve"], bool(report.get("P"))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for j, name in enumerate(names):
        mine = sorted((p["global_step"], math.exp(p["nll"]) if text else p["acc"]) for p in points if p["col"] == j)
        if mine:
            ax.plot([s for s, _ in mine], [a for _, a in mine], marker=".", markersize=3, linewidth=1, label=name)
    for p in points:
        if p["end"] and p["col"] == p["stage"]:
            ax.axvline(p["global_step"], color="grey", linestyle="--", linewidth=0.7)
    gap = report.get("stability") or {}
    ax.set_xlabel("training step (all stages)")
    if text:
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (fixed subsample)")
        summary = (f"max perplexity {gap.get('max_ppl', float('nan')):.3f}, task-end "
                   f"{gap.get('task_end_ppl', float('nan')):.3f}")
    else:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy (fixed subsample)")
        summary = (f"min-ACC {gap.get('min_acc', float('nan')):.3f}, task-end "
                   f"{gap.get('task_end_acc', float('nan')):.3f}, WC-ACC {gap.get('wc_acc', float('nan')):.3f}")
    ax.set_title(f"{report['pipeline']} / {report['strategy']}: continual evaluation; {summary}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right" if text else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(report: dict[str, Any], path: Path) -> Path:
    """Write the report as indented JSON, in one step (:func:`orchestrator.storage.replace_file`), and return the
    path."""
    replace_file(path, json.dumps(report, indent=1).encode())
    return path


def stage_summary(stage: StageSpec, result: StageResult) -> dict[str, Any]:
    """One stage of the report: ``stage``, ``domain``, ``checkpoint``, ``start``/``end`` (unix seconds), ``steps``
    (rank 0's optimizer steps), ``wall_seconds``, ``train_seconds`` (the training loop), ``overhead_seconds`` (the
    rest), ``samples_per_second`` (all workers), ``epoch_loss``, ``epoch_seconds``, ``first_batch_at`` (unix
    seconds, rank 0), ``node_id`` (rank 0's Ray node), ``skipped_batches`` (batches with a non-finite loss,
    ``training.on_nonfinite: skip_batch``) and ``resumed_at_step`` (the in-stage checkpoint a restarted stage
    continued from; 0 if none). It is also the stage's ``_COMPLETED`` record, from which a resumed run
    restores it (so that ``stage_summary`` of a result whose stats are this record gives it back)."""
    stats, wall = result.stats, result.end - result.start
    train = stats.get("train_seconds", float("nan"))
    return {"stage": stage.task_id, "domain": stage.domain, "checkpoint": result.checkpoint, "start": result.start,
            "steps": int(stats.get("steps", 0)),
            "end": result.end, "wall_seconds": wall, "train_seconds": train, "overhead_seconds": wall - train,
            "samples_per_second": stats.get("samples_per_second", float("nan")),
            "epoch_loss": list(stats.get("epoch_loss", [float("nan")])),
            "epoch_seconds": list(stats.get("epoch_seconds", [])),
            "first_batch_at": stats.get("first_batch_at", float("nan")), "node_id": stats.get("node_id", ""),
            "skipped_batches": int(stats.get("skipped_batches", 0)),
            "resumed_at_step": int(stats.get("resumed_at_step", 0))}


class EventLog(Listener):
    """Append-only JSON-lines event log (``events.jsonl``) with unix timestamps, and each committed stage's
    ``_COMPLETED`` record (its :func:`stage_summary`) beside its checkpoint on the run's storage.

    Args:
        path: the ``events.jsonl`` file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.restored: frozenset[Cell] = frozenset()

    def run_started(self, run: RunInfo) -> None:
        """Remember the cells an earlier attempt of the run logged already (a resumed or extended run)."""
        self.restored = frozenset(run.restored.cells)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """``stage_restored``: a stage committed by an earlier attempt, not run again."""
        self.write("stage_restored", stage=stage.task_id, domain=stage.domain, checkpoint=result.checkpoint)

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"t": <unix seconds>, "event": event, **fields}``."""
        record = {"t": fields.pop("t", time.time()), "event": event, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def stage_started(self, stage: StageSpec) -> None:
        """``stage_start``."""
        self.write("stage_start", stage=stage.task_id, domain=stage.domain)

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """``epoch_end`` for every epoch."""
        if report.kind == "epoch":
            self.write("epoch_end", stage=stage.task_id, epoch=report.epoch, loss=report.loss,
                       seconds=report.seconds)

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """``stage_end`` (with rank 0's Ray node), and the stage's ``_COMPLETED`` record."""
        self.write("stage_end", t=result.end, stage=stage.task_id, domain=stage.domain, checkpoint=result.checkpoint,
                   node_id=result.stats.get("node_id", ""))
        summary = json.dumps(stage_summary(stage, result), indent=1).encode()
        stage.storage.write_bytes(join(stage.checkpoint_uri.rsplit("/", 1)[0], "_COMPLETED"), summary)

    def stage_failed(self, stage: StageSpec, error: str) -> None:
        """``stage_failed`` with the error."""
        self.write("stage_failed", stage=stage.task_id, error=error)

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """One ``eval_cell`` per cell, stamped with the time it was computed and the Ray node of its actor (a cell
        that an earlier attempt of the run logged is not logged again)."""
        for c in cells:
            if c in self.restored:
                continue
            self.write("eval_cell", t=c.end, row=row, col=c.col, start=c.start, end=c.end, acc=c.acc,
                       node_id=c.node_id)

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """One ``curve_point`` per point of the continual evaluation."""
        for p in points:
            self.write("curve_point", stage=p.stage, step=p.step, global_step=p.global_step, col=p.col, acc=p.acc,
                       n=p.n, end=p.end)


class ReportBuilder(Listener):
    """Collects the committed stages and the rows of R into the report (see :meth:`report`).

    Args:
        evaluate: whether evaluation runs (else the report has no accuracy matrix).
    """

    def __init__(self, evaluate: bool) -> None:
        self.evaluate = evaluate
        self.curve: list[dict[str, Any]] = []
        self.window = 100
        self.stages: list[dict[str, Any]] = []
        self.rows: dict[int, list[float]] = {}
        self.nll: dict[int, list[float]] = {}
        self.text = False
        self.names: list[str] = []
        self.header: dict[str, Any] = {}

    def run_started(self, run: RunInfo) -> None:
        """Remember the pipeline's names."""
        p = run.plan.pipeline
        self.names = [d.name for d in run.plan.domains]
        self.window = p.evaluation.window_steps
        self.text = run.plan.input.text
        self.header = {"pipeline": p.name, "strategy": p.strategy_label(),
                       "scenario": "lm" if run.plan.input.text else p.scenario,
                       "domains": self.names}
        rows: dict[int, dict[int, Cell]] = {}
        for c in run.restored.cells:  # rows an earlier attempt of the run completed
            rows.setdefault(c.row, {})[c.col] = c
        for row, cells in rows.items():
            if all(j in cells for j in range(len(self.names))):
                self.row_evaluated(row, [cells[j] for j in range(len(self.names))])
        self.curve.extend(dataclasses.asdict(p) for p in run.restored.curve)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """Add the summary of a stage committed by an earlier attempt of the run."""
        self.stage_committed(stage, result)

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Add the stage's summary."""
        self.stages.append(stage_summary(stage, result))

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Keep row ``row`` of R (row -1: b) and of the mean negative log-likelihoods."""
        self.rows[row] = [c.acc for c in cells]
        self.nll[row] = [c.nll for c in cells]

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """Keep the continual-evaluation points."""
        self.curve.extend(dataclasses.asdict(p) for p in points)

    def report(self) -> dict[str, Any]:
        """``pipeline``, ``strategy``, ``scenario``, ``domains``, ``stages``, ``R`` (T x T), ``b`` (T), and
        :func:`orchestrator.metrics.cl_metrics`'s ``acc``, ``bwt``, ``fwt``, ``forgetting``, ``avg_forgetting``
        (None and empty lists for a training-only run), ``skipped_batches`` (all stages); with continual
        evaluation, ``curve`` (its points, by global step) and ``stability``
        (:func:`orchestrator.metrics.stability_gap`). For text domains, R holds next-token
        accuracies and the report adds ``P`` (T x T perplexities), ``P_b``, ``bits_per_token`` (the last row's mean
        negative log-likelihood in bits) and :func:`orchestrator.metrics.lm_metrics`."""
        report = {**self.header, "stages": self.stages,
                  "skipped_batches": sum(s.get("skipped_batches", 0) for s in self.stages)}
        if self.curve:
            curve = sorted(self.curve, key=lambda p: (p["global_step"], p["col"]))
            report.update(curve=curve, stability=lm_stability_gap(curve, len(self.names)) if self.text else
                          stability_gap(curve, len(self.names), self.window))
        if not self.evaluate:
            return {**report, "R": [], "b": [], "acc": None, "bwt": None, "fwt": None, "forgetting": [],
                    "avg_forgetting": None}
        R = [self.rows[i] for i in range(len(self.stages))]
        report = {**report, "R": R, "b": self.rows[-1], **cl_metrics(R, self.rows[-1])}
        if self.text:
            P = [[math.exp(v) for v in self.nll[i]] for i in range(len(self.stages))]
            b = [math.exp(v) for v in self.nll[-1]]
            report.update(P=P, P_b=b, bits_per_token=float(np.mean(self.nll[len(P) - 1])) / math.log(2),
                          **lm_metrics(P, b))
        return report


class ProgressBar(Listener):
    """Stage k/T, the epoch, samples/s (all workers) and an ETA from the mean wall time of the finished stages.

    Args:
        console: where to draw. enabled: False draws no bar, and prints one line when a stage starts and one when
            it is committed instead (for logs: a submitted job's, a file's).
    """

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console, self.enabled = console, enabled
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console,
                                disable=not enabled, transient=False)
        self.task = self.bar.add_task("starting", total=None, rate="", eta="?")
        self.done, self.total, self.epochs, self.stages, self.started = 0, 1, 1, 1, 0.0
        self.walls: list[float] = []

    def run_started(self, run: RunInfo) -> None:
        """Show the bar, sized by the samples of every stage and epoch."""
        plan = run.plan
        self.epochs, self.stages = plan.pipeline.training.epochs, plan.num_stages
        self.total = sum(plan.train_rows(k) for k in range(plan.num_stages)) * self.epochs
        self.bar.update(self.task, total=self.total)
        self.bar.start()

    def stage_started(self, stage: StageSpec) -> None:
        """``stage k/T <domain>: starting`` (or print ``stage k/T <domain>: started``)."""
        self.started = time.time()
        self.bar.update(self.task, description=f"stage {stage.task_id + 1}/{self.stages} {stage.domain}: starting")
        if not self.enabled:
            self.console.print(f"stage {stage.task_id + 1}/{self.stages} {stage.domain}: started", highlight=False)

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """Advance by the samples all workers have seen."""
        seen = report.samples * stage.resources.num_workers
        rate = f"{seen / max(report.seconds, 1e-9):,.0f} samples/s"
        self.bar.update(self.task, completed=self.done + seen, rate=rate,
                        description=f"stage {stage.task_id + 1}/{self.stages} {stage.domain}: epoch "
                                    f"{report.epoch + 1}/{self.epochs}")

    def poll(self) -> None:
        """Refresh the ETA."""
        if self.walls:
            mean = sum(self.walls) / len(self.walls)
            left = mean * (self.stages - len(self.walls)) - (time.time() - self.started)
            self.bar.update(self.task, eta=f"{max(0.0, left):.0f}s")

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Count the stage's samples as done (or print ``stage k/T <domain>: committed in S s``)."""
        self.walls.append(result.end - result.start)
        self.done += stage.train_rows * self.epochs
        self.bar.update(self.task, completed=self.done)
        if not self.enabled:
            stats = result.stats
            resumed = (f"; continued from its in-stage checkpoint at step {stats['resumed_at_step']}"
                       if stats.get("resumed_at_step") else "")
            self.console.print(f"stage {stage.task_id + 1}/{self.stages} {stage.domain}: committed in "
                               f"{self.walls[-1]:.1f} s (training {stats.get('train_seconds', float('nan')):.1f} s, "
                               f"{stats.get('samples_per_second', float('nan')):,.0f} samples/s{resumed})",
                               highlight=False)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """Count a stage committed by an earlier attempt as done (or print ``stage k/T <domain>: restored``)."""
        self.done += stage.train_rows * self.epochs
        self.bar.update(self.task, completed=self.done)
        if not self.enabled:
            self.console.print(f"stage {stage.task_id + 1}/{self.stages} {stage.domain}: restored (committed by an "
                               f"earlier attempt: {result.checkpoint})", highlight=False)

    def run_finished(self) -> None:
        """``evaluating the last stage``; the bar stops at :meth:`close`."""
        self.bar.update(self.task, description=f"evaluating the last stage ({self.stages}/{self.stages})")

    def close(self) -> None:
        """Stop drawing."""
        self.bar.stop()
