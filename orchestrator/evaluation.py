"""Evaluation actors: fill cells of the accuracy matrix beside training.

Each :class:`Evaluator` actor holds the evaluation splits of the domains it has been asked about (loaded once from
the shards, cached) and the model of the last checkpoint it evaluated. :class:`EvaluationScheduler`, a listener of
the stage engine, sends row i (``(checkpoint, row i, domains j...)``, one call per actor with an equal share of the
domains) through a small pool of actors (:class:`ActorCalls`) once stage i is committed, so that row i is computed
while stage i+1 trains; the actors run at background CPU priority (``orchestrator/cpu.py``) and take only the cycles
training leaves idle. An actor that dies (its process killed, its node lost) is replaced, and the calls it had are
sent again to the new one, up to ``evaluation.max_actor_restarts`` times.

Continual evaluation (``evaluation.every_n_steps``, De Lange et al., "Continual evaluation for lifelong learning:
identifying the stability gap", ICLR 2023, §3): rank 0 of the training workers puts a snapshot of the weights in the
object store every N steps (and at the end of each stage's training) and reports it as progress; the scheduler sends
it to the same actors, which score a fixed subsample of every domain seen so far. Training never waits for it: a
snapshot is dropped (and counted) while ``evaluation.max_queued_snapshots`` are still queued.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from orchestrator.checkpoint import load_checkpoint
from orchestrator.cpu import background_priority
from orchestrator.engine import Cell, CurvePoint, Listener, RunInfo, StageResult
from orchestrator.errors import LifelongError, one_line
from orchestrator.models import HeadLayout, build_model, masked_logits
from orchestrator.plan import InputFormat, StagePlan, StageSpec
from orchestrator.shards import read_split
from orchestrator.stage import Progress
from orchestrator.spec import ModelSpec
from orchestrator.storage import Storage
from strategies import BoundStrategy


class Evaluator:
    """Computes the accuracy of a checkpoint on one domain's evaluation split.

    Args:
        domains: ``(uri, manifest)`` of every domain, in stream order.
        split: ``"test"`` or ``"val"``. layout: the pipeline's head layout.
        model: the model spec. form: the shards' input format (``[*shape]`` uint8 times ``scale``).
        batch_size: evaluation batch size in samples.
        strategies: the pipeline's bound strategies; their state is loaded from each checkpoint and their
            ``inference_model`` hook picks the model that scores each domain.
        storage: how to reach the shard URIs (S3 endpoint and credentials).
        use_gpu: score on the GPU (share) Ray assigned to this actor (``evaluation.gpus_per_actor``); the domains'
            evaluation splits then stay on it.
    Raises:
        RuntimeError: if ``use_gpu`` and no GPU is visible.
    """

    def __init__(self, domains: list[tuple[str, Any]], split: str, layout: HeadLayout, model: ModelSpec,
                 form: InputFormat, batch_size: int, strategies: tuple[BoundStrategy, ...],
                 storage: Storage | None = None, use_gpu: bool = False) -> None:
        background_priority()  # once booted; the threads torch starts below inherit it
        torch.set_num_threads(1)
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("evaluation actor: evaluation.gpus_per_actor is set but no GPU is visible to it")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.strategies = [b.build() for b in strategies]
        self.domains, self.split, self.layout, self.batch_size = domains, split, layout, batch_size
        self.storage, self.form = storage, form
        self.model = build_model(model, form.shape, layout.num_outputs).to(self.device).eval()
        self.loaded: str | None = None
        self.data: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.subsamples: dict[int, torch.Tensor] = {}  # continual evaluation's fixed subsample of each domain
        self.targets, self.mask = layout.target_table(), layout.head_mask()

    def _domain(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Domain j's evaluation split: inputs, targets and domain ids (text: the blocks' input and target ids)."""
        if j not in self.data:
            uri, manifest = self.domains[j]
            raw = read_split(uri, manifest, self.split, self.storage)
            n = len(raw.x)
            t = torch.full((n,), j, dtype=torch.long)
            if self.form.text:
                tokens = torch.from_numpy(raw.x.astype(np.int64))
                x, y = tokens[:, :-1], tokens[:, 1:]
            else:
                assert raw.y is not None
                x = torch.from_numpy(raw.x.reshape(n, *self.form.shape).astype(np.float32)) * self.form.scale
                y = self.targets[t, torch.from_numpy(raw.y)]
            self.data[j] = (x.to(self.device), y.to(self.device), t.to(self.device))
        return self.data[j]

    def evaluate(self, checkpoint: str, row: int, j: int) -> Cell:
        """Accuracy of ``checkpoint`` on domain j (task-IL: predictions restricted to domain j's head), as cell
        R[row][j]."""
        start = time.time()
        if self.loaded != checkpoint:
            model_state, strategy_states, _ = load_checkpoint(checkpoint, self.storage)
            self.model.load_state_dict(model_state)
            for s, state in zip(self.strategies, strategy_states):
                s.load_state_dict(state)
            self.loaded = checkpoint
        x, y, t = self._domain(j)
        correct, nll, n = self._score(j, x, y, t)
        return Cell(row, j, correct / max(n, 1), n, start, time.time(), ray.get_runtime_context().get_node_id(),
                    nll / max(n, 1))

    def _score(self, j: int, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[int, float, int]:
        """``(correct, summed negative log-likelihood in nats, count)`` of the loaded model, through the strategies'
        ``inference_model``, on domain j (``x`` ``[N, *shape]``, targets ``y`` and domain ids ``t`` ``[N]``): counted
        per sample, or per token for text (``x``, ``y`` ``[N, L]``; at most 65,536 tokens per forward pass)."""
        model = self.model
        for s in self.strategies:
            model = s.inference_model(model, j)
        correct, nll, count = 0, 0.0, 0
        rows = min(self.batch_size, max(1, 2**16 // x.shape[1])) if self.form.text else self.batch_size
        with torch.no_grad():
            for i in range(0, len(y), rows):
                logits = model(x[i:i + rows])
                if not self.form.text:
                    logits = masked_logits(logits, t[i:i + rows], self.mask)
                flat, target = logits.flatten(0, -2).float(), y[i:i + rows].flatten()
                correct += int((flat.argmax(-1) == target).sum())
                nll += float(torch.nn.functional.cross_entropy(flat, target, reduction="sum"))
                count += len(target)
        return correct, nll, count

    def evaluate_snapshot(self, weights: dict[str, torch.Tensor], stage: int, step: int, global_step: int,
                          end: bool, cols: list[int], limit: int, threads: int = 1) -> list[CurvePoint]:
        """Continual evaluation: the accuracy of ``weights`` (the model in training during ``stage``, after ``step``
        of its steps) on a fixed subsample of each domain in ``cols``: the first ``limit`` samples of a permutation
        of its evaluation split seeded by the domain's index, the same at every call.

        The strategies keep the state of the last checkpoint this actor loaded (what their ``inference_model``
        needs, such as masks, is that of a committed stage).
        """
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.model.load_state_dict(weights)
        self.loaded = None  # the next checkpoint is loaded again
        points = []
        for j in cols:
            x, y, t = self._domain(j)
            if j not in self.subsamples:
                order = torch.from_numpy(np.random.default_rng(j).permutation(len(y))[:limit]).to(y.device)
                self.subsamples[j] = order
            index = self.subsamples[j]
            correct, nll, n = self._score(j, x[index], y[index], t[index])
            points.append(CurvePoint(stage, step, global_step, j, correct / max(n, 1), n, end, nll / max(n, 1)))
        return points

    def evaluate_cells(self, checkpoint: str, row: int, cols: list[int], threads: int = 1) -> list[Cell]:
        """Cells R[row][j] of ``checkpoint`` for every domain j in ``cols`` (see :meth:`evaluate`), in that order,
        with ``threads`` torch threads (one while training runs beside it; more once it has ended)."""
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return [self.evaluate(checkpoint, row, j) for j in cols]


@dataclass
class _Call:
    """One queued actor call: ``method`` (``evaluate_cells`` or ``evaluate_snapshot``) with ``args``; ``threads``
    is appended when it is sent (the torch threads of that moment). ``tries``: actors that died running it."""

    method: str
    args: tuple[Any, ...]
    tries: int = 0


class ActorCalls:
    """A queue of calls spread over a set of evaluation actors, one call per actor at a time.

    Unlike ``ray.util.ActorPool``, it knows which call each actor was running: when an actor dies
    (``RayActorError``), a new actor replaces it and the call is sent again, up to ``max_restarts`` times in all.

    Args:
        new_actor: starts one actor. size: how many actors run. max_restarts: actors that may be replaced.
        threads: the torch threads a call gets, read when it is sent.
    """

    def __init__(self, new_actor: Callable[[], Any], size: int, max_restarts: int,
                 threads: Callable[[], int]) -> None:
        self.new_actor, self.max_restarts, self.threads = new_actor, max_restarts, threads
        self.actors = [new_actor() for _ in range(size)]
        self.idle = list(self.actors)
        self.queue: deque[_Call] = deque()
        self.running: dict[ray.ObjectRef, tuple[Any, _Call]] = {}
        self.restarts = 0

    def submit(self, method: str, args: tuple[Any, ...]) -> None:
        """Queue a call; it is sent as soon as an actor is idle."""
        self.queue.append(_Call(method, args))
        self._dispatch()

    def busy(self) -> bool:
        """Whether calls are queued or running."""
        return bool(self.queue or self.running)

    def next_result(self, timeout: float) -> tuple[_Call, Any] | None:
        """``(call, result)`` of the next call to finish within ``timeout`` seconds; None if none did, or if the one
        that did had lost its actor (the call is then sent again to a new actor).

        Raises:
            LifelongError: an actor died more than ``max_restarts`` times, or a call failed (naming why).
            ray.exceptions.ObjectLostError: the call's input is lost (a snapshot whose training worker died).
        """
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout) if self.running else ([], [])
        if not ready:
            return None
        actor, call = self.running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            self._replace(actor, call, e)
            return None
        except ray.exceptions.ObjectLostError:
            self.idle.append(actor)
            self._dispatch()
            raise
        except ray.exceptions.RayError as e:
            raise LifelongError(f"an evaluation actor failed: {one_line(str(e))}") from None
        self.idle.append(actor)
        self._dispatch()
        return call, result

    def _replace(self, actor: Any, call: _Call, error: Exception) -> None:
        """A new actor in place of a dead one, and its call queued first."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise LifelongError(f"evaluation actors died {self.restarts} times (evaluation.max_actor_restarts "
                                f"{self.max_restarts}); the last: {one_line(str(error))}")
        self.actors.remove(actor)
        fresh = self.new_actor()
        self.actors.append(fresh)
        self.idle.append(fresh)
        call.tries += 1
        self.queue.appendleft(call)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            actor, call = self.idle.pop(), self.queue.popleft()
            ref = getattr(actor, call.method).remote(*call.args, self.threads())
            self.running[ref] = (actor, call)

    def close(self) -> None:
        """Stop every actor."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.idle, self.running = [], [], {}
        self.queue.clear()


class EvaluationScheduler(Listener):
    """Fills the accuracy matrix: row -1 (the initial model, for FWT) and row k once stage k is committed.

    The actors start with stage 0, while its worker boots and streams its data, at Ray's default priority: booted at
    the lowest priority beside a training worker that fills the cores, an actor would get almost no CPU until the
    last stage ends, and every row would wait for the end of the run. Once booted, an actor drops to background
    priority (:class:`Evaluator`). Completed rows go to ``downstream`` (the other listeners).

    Args:
        downstream: receives ``row_evaluated`` for every complete row.
    """

    def __init__(self, downstream: Listener) -> None:
        self.downstream = downstream
        self.plan: StagePlan | None = None
        self.init_checkpoint = ""
        self.pool: ActorCalls | None = None
        self.rows: dict[int, dict[int, Cell]] = {}
        self.threads = 1  # torch threads per actor call; the training workers' share once the last stage is done
        self.offset = 0  # training steps of the committed stages (continual evaluation's global step)
        self.snapshots_queued = 0
        self.snapshots_dropped = 0

    def run_started(self, run: RunInfo) -> None:
        """Remember the plan, the initial checkpoint and the cells an earlier attempt of the run computed (a resumed
        or extended run: they are not computed again)."""
        self.plan, self.init_checkpoint = run.plan, run.init_checkpoint
        for cell in run.restored.cells:
            if cell.col < run.plan.num_stages:
                self.rows.setdefault(cell.row, {})[cell.col] = cell

    def stage_started(self, stage: StageSpec) -> None:
        """At stage 0: start the actors and send them row -1."""
        self._start()

    def _start(self) -> None:
        """Start the actors and send them row -1 (once)."""
        if self.pool is not None or self.plan is None:
            return
        plan, e = self.plan, self.plan.pipeline.evaluation
        remote = ray.remote(num_cpus=e.cpus_per_actor, num_gpus=e.gpus_per_actor,
                            resources=dict(e.resources))(Evaluator)
        args = ([(d.uri, d.manifest) for d in plan.domains], e.split, plan.layout, plan.pipeline.model, plan.input,
                e.batch_size, plan.strategies, plan.storage, e.gpus_per_actor > 0)
        # The pool reads the threads when it sends a call, so that a call queued during training gets the threads
        # of the moment it starts.
        self.pool = ActorCalls(lambda: remote.remote(*args), e.num_actors, e.max_actor_restarts,
                               lambda: self.threads)
        self._submit(-1, self.init_checkpoint)

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Send row k (stage k's checkpoint on every domain) to the actors; after the last stage, the rows still
        queued get the training workers' threads, shared among the actors (the evaluation is all that is left)."""
        assert self.plan is not None
        if stage.task_id == self.plan.num_stages - 1:
            r = self.plan.resources
            self.threads = max(1, r.threads * r.num_workers // max(1, self.plan.pipeline.evaluation.num_actors))
        self._submit(stage.task_id, result.checkpoint)
        self.offset += int(result.stats.get("steps", 0))

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """A stage committed by an earlier attempt: send only the cells of its row that are missing (all of them
        if the run stopped before its row was complete; the new domains' columns for ``extend``)."""
        if self._missing(-1) or self._missing(stage.task_id):
            self._start()
        self.stage_committed(stage, result)

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """Send a snapshot of the model in training to the actors (continual evaluation), unless
        ``evaluation.max_queued_snapshots`` are still queued (then it is dropped and counted)."""
        if report.kind not in ("snapshot", "snapshot_end") or report.weights is None or self.pool is None:
            return
        assert self.plan is not None
        if self.snapshots_queued >= self.plan.pipeline.evaluation.max_queued_snapshots:
            self.snapshots_dropped += 1
            return
        self.snapshots_queued += 1
        args = (report.weights, stage.task_id, report.step, self.offset + report.step, report.kind == "snapshot_end",
                list(range(stage.task_id + 1)), self.plan.pipeline.evaluation.subsample)
        self.pool.submit("evaluate_snapshot", args)

    def before_stage(self, k: int) -> None:
        """With ``evaluation.max_lag`` = L, wait until rows -1..k-1-L of R are complete (and reported downstream)."""
        assert self.plan is not None
        lag = self.plan.pipeline.evaluation.max_lag
        if lag is None:
            return
        needed = range(-1, k - lag)
        while self._busy() and not all(len(self.rows.get(r, {})) == self.plan.num_stages for r in needed):
            self._collect(timeout=1.0)

    def poll(self) -> None:
        """Collect the cells that are ready."""
        self._collect(timeout=0.0)

    def run_finished(self) -> None:
        """Wait for every outstanding cell, then stop the actors."""
        while self._busy():
            self._collect(timeout=5.0)
        self.close()

    def close(self) -> None:
        """Stop the actors (also after a failed run)."""
        if self.pool is not None:
            self.pool.close()

    def _busy(self) -> bool:
        return self.pool is not None and self.pool.busy()

    def _missing(self, row: int) -> list[int]:
        """The columns of row ``row`` not computed yet."""
        assert self.plan is not None
        done = self.rows.get(row, {})
        return [j for j in range(self.plan.num_stages) if j not in done]

    def _submit(self, row: int, checkpoint: str) -> None:
        """Send the missing cells of row ``row`` as one call per actor, each with an equal share of the columns: a
        call costs a round trip through the driver, several times a cell's own forward pass on a small model."""
        missing = self._missing(row)
        self.rows.setdefault(row, {})
        assert self.pool is not None or not missing
        parts = max(1, len(self.pool.actors) if self.pool is not None else 1)
        for first in range(min(parts, len(missing))):
            self.pool.submit("evaluate_cells", (checkpoint, row, missing[first::parts]))  # type: ignore[union-attr]

    def _collect(self, timeout: float) -> None:
        assert self.plan is not None
        while self._busy():
            assert self.pool is not None
            try:
                done = self.pool.next_result(timeout)
            except ray.exceptions.ObjectLostError:  # OwnerDiedError too
                # a snapshot whose training worker died (its stage restarts): lost, as a dropped one
                self.snapshots_queued -= 1
                self.snapshots_dropped += 1
                continue
            if done is None:  # nothing finished in time (or an actor died, and its call went to a new one)
                return
            call, cells = done
            if call.method == "evaluate_snapshot":
                self.snapshots_queued -= 1
                self.downstream.curve_evaluated(cells)
                continue
            for cell in cells:
                row = self.rows[cell.row]
                row[cell.col] = cell
                if len(row) == self.plan.num_stages:
                    self.downstream.row_evaluated(cell.row, [row[j] for j in range(self.plan.num_stages)])
