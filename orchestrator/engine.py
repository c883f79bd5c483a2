"""The stage engine: a short loop over the domains that emits events to listeners.

For each domain k the engine builds stage k's description from stage k-1's checkpoint, starts it on the executor
(``orchestrator/workers.py``) with stage k+1's data streamed ahead, forwards the workers' progress while it trains,
and commits it. Every other concern is a :class:`Listener` in its own module, and none of them copies this loop:

- evaluation scheduling (``evaluation.py``): sends row k of R to the evaluation actors once stage k is committed;
- MLflow stage runs (``lineage.py``): one child run per stage, with its dataset inputs, metrics and lineage;
- the model registry (``registry.py``): a LoggedModel and a registered version per stage, tagged with its parent;
- progress, the event log and the report (``report.py``);
- the Tune reporter (``tuning.py``), which reports each domain's val metrics to Ray Tune and ends the run with
  :class:`RunStopped` when the trial's scheduler stops it;
- committed work (``resume.py``): records the cells of R beside the run, so that ``lifelong resume`` and
  ``lifelong extend`` can hand the engine what a run has already done (:class:`Restored`).

A resumed or extended run's :class:`RunInfo` carries its committed work: the engine does not run a committed stage
again but announces it with ``stage_restored``, and each listener takes the restored stages and cells its own way
(the evaluation computes only the cells that are missing, MLflow reuses the stage runs, the report includes them).

Events, in order: ``run_started``; per stage ``before_stage``, then ``stage_restored`` for a committed stage, or
``stage_started``, ``progress`` (many), then ``stage_committed`` or ``stage_failed``; ``row_evaluated`` whenever a
row of R is complete; ``curve_evaluated`` whenever a snapshot of the model in training has been scored
(continual evaluation, ``evaluation.every_n_steps``); ``run_finished`` after the last stage (listeners finish
their own work there: the evaluation waits for the last row); ``run_stopped`` instead if a listener ended the run
early on purpose, or the process was interrupted (Ctrl+C, or SIGINT from `lifelong stop`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint import read_lineage
from orchestrator.errors import TrainingError
from orchestrator.plan import StagePlan, StageSpec
from orchestrator.stage import Progress
from orchestrator.workers import StageRunner

POLL_SECONDS = 0.5  # how often the driver forwards progress and lets listeners work while a stage trains


class RunStopped(Exception):
    """Raised by a listener to end the run early on purpose (a Tune trial stopped by its scheduler): not an error of
    the run, which ends with its MLflow runs marked KILLED."""


@dataclass(frozen=True)
class StageResult:
    """A committed stage.

    Attributes:
        checkpoint: its checkpoint (path or URI). stats: rank 0's statistics (``epoch_loss``, ``epoch_seconds``,
            ``train_seconds``, ``samples_per_second``, ``setup_seconds``). start, end: unix seconds on the driver.
    """

    checkpoint: str
    stats: Mapping[str, Any]
    start: float
    end: float


@dataclass(frozen=True)
class Cell:
    """One cell R[row][col] of the accuracy matrix (row -1: the initial model).

    Attributes:
        acc: accuracy in [0, 1] (text domains: next-token accuracy). n: samples scored (text: tokens). start, end:
            unix seconds on the evaluation actor. node_id: the Ray node of that actor ("" when unknown).
        nll: mean negative log-likelihood per sample (text: per token), in nats; ``exp(nll)`` is the perplexity
            P[row][col] of a text domain.
    """

    row: int
    col: int
    acc: float
    n: int
    start: float
    end: float
    node_id: str = ""
    nll: float = float("nan")


@dataclass(frozen=True)
class CurvePoint:
    """One point of the continual-evaluation curve: the model in training during stage ``stage``, after ``step``
    steps of it (``global_step`` steps of the whole run), scored on a fixed subsample of domain ``col``.

    Attributes:
        acc: accuracy in [0, 1]. n: samples scored. end: whether this is the snapshot at the end of the stage's
            training. nll: mean negative log-likelihood per sample (text: per token), in nats.
    """

    stage: int
    step: int
    global_step: int
    col: int
    acc: float
    n: int
    end: bool = False
    nll: float = float("nan")


@dataclass(frozen=True)
class Restored:
    """What a run had committed before it was interrupted (or finished, for ``extend``), read back from its storage
    by ``orchestrator/resume.py``.

    Attributes:
        stages: stage index -> its committed result (the checkpoint, and the statistics its ``_COMPLETED`` record
            kept). Only a prefix 0..k of the stream: a stage is committed only if its parent is.
        cells: the cells of R already computed (row -1: the initial model), at most one per (row, col).
        curve: the continual-evaluation points already scored.
    """

    stages: Mapping[int, StageResult] = field(default_factory=dict)
    cells: tuple[Cell, ...] = ()
    curve: tuple[CurvePoint, ...] = ()


@dataclass(frozen=True)
class RunInfo:
    """The run the engine drives.

    Attributes:
        run_id: the run's id. plan: its stage plan. init_checkpoint: the initial model's checkpoint (the lineage
            root, evaluated as row -1 for FWT). code: the code version recorded in every lineage record.
        flush: waits until every record the run has queued so far (MLflow) is written; a listener that hands
            control to something that may end the process (a Tune report) calls it first.
        restored: the committed work of a resumed or extended run (empty for a new run). resumed: whether the run
            continues an earlier attempt (``lifelong resume`` or ``extend``), even one that committed nothing.
    """

    run_id: str
    plan: StagePlan
    init_checkpoint: str
    code: Mapping[str, str]
    flush: Callable[[], None] = field(default=lambda: None)
    restored: Restored = field(default_factory=lambda: Restored())
    resumed: bool = False


class Listener:
    """A concern plugged into the stage engine. Every method is optional; the defaults do nothing."""

    def run_started(self, run: RunInfo) -> None:
        """Before stage 0 starts."""

    def before_stage(self, k: int) -> None:
        """Stage k is about to be submitted; a listener may wait here (the evaluation, when ``evaluation.max_lag``
        bounds how far training may run ahead of it)."""

    def stage_started(self, stage: StageSpec) -> None:
        """Stage ``stage.task_id`` has been submitted to the workers."""

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """Stage ``stage.task_id`` was committed by an earlier attempt of the run (``run.restored``); it is not run
        again."""

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """Rank 0 reported progress (every ``training.progress_every`` steps, and at the end of each epoch)."""

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """The stage's checkpoint is committed (its ``lineage.json`` written)."""

    def stage_failed(self, stage: StageSpec, error: str) -> None:
        """The stage failed with ``error`` (one line); the run stops."""

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Row ``row`` of R is complete (``cells`` in column order)."""

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """A snapshot of the model in training has been scored on every domain seen so far (``evaluation.
        every_n_steps``), ``points`` in column order."""

    def poll(self) -> None:
        """Called about every 0.5 s while a stage trains: do pending work, raise a pending error."""

    def should_stop(self) -> bool:
        """True to end the run after the stage just committed (e.g. a Tune trial stopped by its scheduler)."""
        return False

    def run_finished(self) -> None:
        """After the last stage: finish outstanding work (the evaluation waits for its last row here)."""

    def run_stopped(self, stage: StageSpec | None, reason: str) -> None:
        """A listener raised :class:`RunStopped` while ``stage`` was running (None: before the first stage)."""


@dataclass
class Listeners(Listener):
    """Several listeners as one: each event goes to every listener, in list order."""

    members: list[Listener] = field(default_factory=list)

    def run_started(self, run: RunInfo) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.run_started(run)

    def before_stage(self, k: int) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.before_stage(k)

    def stage_started(self, stage: StageSpec) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.stage_started(stage)

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.progress(stage, report)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.stage_restored(stage, result)

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.stage_committed(stage, result)

    def stage_failed(self, stage: StageSpec, error: str) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.stage_failed(stage, error)

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.row_evaluated(row, cells)

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.curve_evaluated(points)

    def poll(self) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.poll()

    def should_stop(self) -> bool:
        """True if any listener asks to stop (every listener is asked)."""
        return any([m.should_stop() for m in self.members])

    def run_finished(self) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.run_finished()

    def run_stopped(self, stage: StageSpec | None, reason: str) -> None:
        """Forward to every listener."""
        for m in self.members:
            m.run_stopped(stage, reason)


def run_stages(run: RunInfo, runner: StageRunner, listener: Listener) -> list[StageResult]:
    """Run the stages of ``run.plan`` in order on ``runner``, each from the previous one's checkpoint; a stage in
    ``run.restored`` is not run again (``stage_restored``), and the next one starts from its checkpoint.

    Returns the committed stages, restored ones included (fewer than T if a listener stopped the run through
    :meth:`Listener.should_stop`).

    Raises:
        TrainingError: ``stage k (<domain>) failed: <why>``, after ``stage_failed`` reached the listeners.
        RunStopped: a listener ended the run early, after ``run_stopped`` reached the listeners.
        KeyboardInterrupt, SystemExit: the process was interrupted (Ctrl+C, or the SIGINT that `lifelong stop`
            has Ray send to a job's driver) or told to exit, after ``run_stopped``.
    """
    plan = run.plan
    listener.run_started(run)
    parent, results, stage = run.init_checkpoint, [], None
    try:
        for k in range(plan.num_stages):
            listener.before_stage(k)
            stage = plan.stage(k, parent, read_lineage(parent, plan.storage), run.run_id, run.code)
            if k in run.restored.stages:
                results.append(run.restored.stages[k])
                listener.stage_restored(stage, results[-1])
            else:
                results.append(_run_stage(stage, plan, runner, listener))
            parent = results[-1].checkpoint
            if listener.should_stop():
                break
        listener.run_finished()
    except RunStopped as e:
        listener.run_stopped(stage, str(e))
        raise
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl+C, `lifelong stop` (SIGINT), sys.exit
        code = f" {e.code}" if isinstance(e, SystemExit) else ""
        listener.run_stopped(stage, f"interrupted ({type(e).__name__}{code})")
        raise
    return results


def _run_stage(stage: StageSpec, plan: StagePlan, runner: StageRunner, listener: Listener) -> StageResult:
    """Start one stage with the next stage's data streamed ahead, forward its progress, and commit it."""
    k, start = stage.task_id, time.time()
    handle = runner.start(stage, plan.data(k + 1) if k + 1 < plan.num_stages else None)
    listener.stage_started(stage)
    while not handle.wait(POLL_SECONDS):
        _forward_progress(runner, stage, listener)
        listener.poll()
    _forward_progress(runner, stage, listener, final=True)
    try:
        stats, checkpoint = handle.result()
    except TrainingError as e:
        listener.stage_failed(stage, str(e))
        raise TrainingError(f"stage {k} ({stage.domain}) failed: {e}") from None
    result = StageResult(checkpoint, stats, start, time.time())
    listener.stage_committed(stage, result)
    return result


def _forward_progress(runner: StageRunner, stage: StageSpec, listener: Listener, final: bool = False) -> None:
    for report in runner.progress(final):
        listener.progress(stage, report)

