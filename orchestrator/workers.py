"""Executors of stages: a persistent worker group (default) or one Ray Train fit for the whole pipeline.

``training.executor`` picks how stages run:

- ``group`` (default): :class:`WorkerGroup`, N long-lived Ray actors (one per worker) started once per pipeline,
  with one torch process group (gloo on CPU, NCCL on GPU) set up once. Every stage still starts from its parent
  checkpoint, reads its own equal part of the stage's shards (``orchestrator/ingest.py``), writes its own
  checkpoint and reports its own statistics; the group only keeps the processes. A stage whose resources differ
  from the group's gets a new group. If a worker process dies, the group is rebuilt and the stage restarts from its
  parent checkpoint, up to ``training.max_failures`` times (errors raised by the training itself, such as a NaN
  loss, are not retried: they would recur).
- ``ray_train``: one ``TorchTrainer`` fit for the whole pipeline (:class:`TrainerFit`), whose stages are phases of
  the fit. An empty fit costs about 19 s on 2 cores (controller, placement group, worker processes, process
  group), paid once. The driver posts each stage's description to a :class:`PhaseBoard` actor as the stage engine
  builds it; the fit's workers take it from there (:func:`pipeline_loop_per_worker`), train it, and report its
  checkpoint through ``ray.train.report``. Ray Train's experiment folder is the run's own storage root, so the
  checkpoint that rank 0 commits there is the one Ray Train registers (nothing is copied). A dead worker makes
  Ray Train restart the worker group (``FailureConfig(max_failures)``), which continues after the last reported
  stage; evaluation of committed stages goes on meanwhile, as with the group.

Both executors run a stage through the same :class:`StageWorker` and stage body
(:func:`orchestrator.stage.run_stage`), and stream the next stage's data while a stage trains
(:class:`orchestrator.stage.Prefetch`; with the group, stage 0's also while the driver validates the shards).
:meth:`StageRunner.start` returns a handle the driver polls (``wait``) while it shows progress and collects
evaluation cells, then asks for the ``result``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import ray
import torch

from orchestrator.checkpoint import InStageCheckpoints, read_lineage, write_checkpoint
from orchestrator.errors import TrainingError, one_line
from orchestrator.plan import Resources, StageData, StageSpec
from orchestrator.stage import Prefetch, Progress, make_stream, pins_memory, prefetch_batches, run_stage

GIL_SWITCH_SECONDS = 0.0005


class StageWorker:
    """One training process of a :class:`WorkerGroup` (created as a Ray actor with the group's resources).

    Stages run one at a time on the actor's default thread; :meth:`progress` runs on a thread of its own (Ray's
    concurrency group ``progress``), so that the driver can collect rank 0's progress reports while a stage trains
    without a separate queue process.

    Inside a Ray Train fit the same class runs each phase of :func:`pipeline_loop_per_worker`, as a plain object.

    Args:
        rank, world: this worker's rank and the group size.
        use_gpu: train on the GPU that Ray assigned to this actor (it sees only that one, as ``cuda:0``).
        device: the device to train on instead (Ray Train's ``get_device()``).
        report: where rank 0's progress reports go (default: kept for :meth:`progress`).
        wrap: wraps the model for data-parallel training (default: DDP on the group's process group; Ray Train's
            ``prepare_model`` in a fit).
    Raises:
        RuntimeError: if ``use_gpu`` and no GPU is visible.
    """

    def __init__(self, rank: int, world: int, use_gpu: bool, device: torch.device | None = None,
                 report: Callable[[Progress], Any] | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
        self.rank, self.world = rank, world
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"training worker {rank}: training.use_gpu is set but no GPU is visible to it")
        self.device = device or (torch.device("cuda", 0) if use_gpu else torch.device("cpu"))
        self.prefetched: Prefetch | None = None
        self.reports: collections.deque[Progress] = collections.deque(maxlen=10_000)
        self.report = report or self.reports.append
        self.wrap = wrap or self._wrap
        # The training thread needs the GIL for every operation it dispatches; while the next stage's data streams
        # in on other threads, a short switch interval hands it back sooner (the default is 5 ms).
        sys.setswitchinterval(GIL_SWITCH_SECONDS)

    def warm_up(self) -> float:
        """Pay torch's one-off lazy initialisation now, before the first stage waits on it: the first optimizer
        built in a process imports ``torch._dynamo`` (1.3 s on 2 cores), and the first backward pass sets up
        autograd's engine. Returns the unix time at which the worker is ready."""
        layer = torch.nn.Linear(2, 2).to(self.device)
        optimizer = torch.optim.Adam(layer.parameters())
        layer(torch.zeros(1, 2, device=self.device)).sum().backward()
        optimizer.step()
        return time.time()

    def rendezvous_address(self) -> str:
        """``tcp://<this node's IP>:<a free port>``, where rank 0 hosts the torch process group's store."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def init_process_group(self, address: str, backend: str, timeout_s: float) -> None:
        """Join the group's torch process group (``backend`` gloo or nccl); blocks until every rank has joined.

        Raises:
            RuntimeError (torch's DistStoreError): if the other ranks do not join within ``timeout_s`` seconds.
        """
        torch.distributed.init_process_group(backend, init_method=address, rank=self.rank, world_size=self.world,
                                             timeout=datetime.timedelta(seconds=timeout_s))

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def prefetch(self, data: StageData) -> None:
        """Start streaming the first pass of this worker's part of stage ``data.task_id``'s data into memory now, on
        a background thread (:class:`orchestrator.stage.Prefetch`). Replaces an earlier prefetch."""
        if self.prefetched is not None:
            self.prefetched.cancel()
        self.prefetched = Prefetch(data.task_id, make_stream(data, self.rank, self.world,
                                                             pins_memory(data, self.device)), prefetch_batches(data))

    @ray.method(concurrency_group="progress")
    def progress(self) -> list[Progress]:
        """The progress reports of the running stage (rank 0 only) since the last call, oldest first."""
        out = []
        while self.reports:
            out.append(self.reports.popleft())
        return out

    def run(self, stage: StageSpec, checkpoint_uri: str, next_stage: StageData | None = None) -> dict[str, Any]:
        """Train one stage on this worker's part of its data; rank 0 then writes the checkpoint at ``checkpoint_uri``.

        The first epoch takes the batches that :meth:`prefetch` is streaming for this stage, if it was called, and
        streams them itself otherwise.

        Args:
            stage: the stage's description.
            checkpoint_uri: where rank 0 writes the stage's checkpoint (path or URI; a restarted stage's differs
                from ``stage.checkpoint_uri``).
            next_stage: the next stage's data, prefetched once this stage's first epoch has streamed its own.
        Returns:
            the stage statistics of :func:`orchestrator.stage.run_stage` (rank 0's are the stage's).
        Raises:
            TrainingError, FileNotFoundError, ValueError: as :func:`orchestrator.stage.run_stage`.
            ShardError: if a shard cannot be read.
            FileExistsError: if a checkpoint already exists at ``checkpoint_uri`` (nothing is overwritten).
        """
        ahead, self.prefetched = self.prefetched, None
        first_pass = None
        if ahead is not None and ahead.task_id == stage.task_id:
            first_pass = ahead.batches()
        elif ahead is not None:
            ahead.cancel()
        start_next = None if next_stage is None else (lambda: self.prefetch(next_stage))
        stats, model, strategies = run_stage(stage, self.rank, self.world, self.device, self.wrap,
                                             first_pass=first_pass, after_first_pass=start_next,
                                             on_progress=self.report)
        if self.rank == 0:
            write_checkpoint(checkpoint_uri, {k: v.cpu() for k, v in model.state_dict().items()},
                             [s.state_dict() for s in strategies], dict(stage.lineage), stage.storage)
            if stage.pipeline.training.checkpoint_every_n_steps:  # the stage is committed: its partials are done
                InStageCheckpoints(checkpoint_uri.rsplit("/", 1)[0], stage.storage, dict(stage.lineage)).clear()
        if self.world > 1:
            torch.distributed.barrier()  # no rank returns before the checkpoint is committed
        return stats


class StageHandle(Protocol):
    """A running stage, polled by the driver."""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the stage has finished (successfully or not)."""

    def result(self) -> tuple[dict[str, Any], str]:
        """``(rank 0's statistics, checkpoint path or URI)``; raises the stage's error as :class:`TrainingError`."""


class WorkerGroup:
    """N :class:`StageWorker` actors kept for the stages that share their :class:`Resources`.

    Args:
        resources: what each worker reserves.
        timeout_s: seconds allowed for the workers to join the torch process group.
    Raises:
        RuntimeError: if the process group cannot be formed within ``timeout_s``.
    """

    def __init__(self, resources: Resources, timeout_s: float = 300.0) -> None:
        self.resources = resources
        world = resources.num_workers
        # Ray starts worker processes at niceness 15; the training workers are what every other step waits on, so they
        # run at the normal priority (orchestrator/cpu.py), as Ray Jobs runs its drivers.
        remote = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=1 if resources.use_gpu else 0,
                            resources=dict(resources.custom), max_restarts=0, concurrency_groups={"progress": 1},
                            runtime_env={"env_vars": {"RAY_worker_niceness": "0"}})(StageWorker)
        self.workers = [remote.remote(rank, world, resources.use_gpu) for rank in range(world)]
        if world > 1:
            address = ray.get(self.workers[0].rendezvous_address.remote())
            backend = "nccl" if resources.use_gpu else "gloo"
            ray.get([w.init_process_group.remote(address, backend, timeout_s) for w in self.workers])

    def prefetch(self, data: StageData) -> None:
        """Have every worker start streaming its part of stage ``data.task_id``'s data now."""
        for w in self.workers:
            w.prefetch.remote(data)

    def warm_up(self) -> list[ray.ObjectRef]:
        """Have the workers pay torch's one-off initialisation (:meth:`StageWorker.warm_up`) now; one reference per
        worker to the unix time it was ready."""
        return [w.warm_up.remote() for w in self.workers]

    def start(self, stage: StageSpec, checkpoint_uri: str, next_stage: StageData | None = None) -> list[ray.ObjectRef]:
        """Start a stage on every worker (each on its part of the stage's data, already streaming if it was
        prefetched); with ``next_stage``, the workers prefetch the next stage's data once this stage's first epoch
        has streamed.

        Returns:
            one Ray object reference per worker, for its stage statistics.
        """
        return [w.run.remote(stage, checkpoint_uri, next_stage) for w in self.workers]

    def shutdown(self) -> None:
        """Stop the worker processes."""
        for w in self.workers:
            ray.kill(w)
        self.workers = []


class _GroupStage:
    """A stage running on a :class:`WorkerGroup`; rebuilds the group and restarts the stage when a worker dies."""

    def __init__(self, runner: StageRunner, stage: StageSpec, next_stage: StageData | None) -> None:
        self.runner, self.stage = runner, stage
        self.failures_left, self.attempt = runner.max_failures, 0
        self.error: str | None = None
        self._submit(next_stage)

    def _submit(self, next_stage: StageData | None = None) -> None:
        # A restarted stage writes a checkpoint of its own: nothing of the failed attempt is overwritten. It runs on
        # a fresh group, which streams the next stage's data when that stage starts (no prefetch).
        base = self.stage.checkpoint_uri
        self.uri = base if self.attempt == 0 else f"{base}-retry{self.attempt}"
        group = self.runner.group(self.stage.resources)
        self.refs = group.start(self.stage, self.uri, next_stage)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the stage has finished (successfully or not)."""
        if self.error is not None:
            return True
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout)
        for ref in ready:  # one failed worker ends the stage: the others may wait on it in a collective
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the training itself raised: it would recur, so no retry
                self.error = one_line(str(e.as_instanceof_cause()))
            except ray.exceptions.RayError as e:  # a worker process died: restart the stage on a fresh group
                self.runner.drop_group()
                if self.failures_left <= 0:
                    self.error = f"a training worker died: {str(e).strip().splitlines()[0]}"
                else:
                    self.failures_left -= 1
                    self.attempt += 1
                    self._submit()
                    return False
            if self.error is not None:
                self.runner.drop_group()
                return True
        return len(ready) == len(self.refs)

    def result(self) -> tuple[dict[str, Any], str]:
        """``(rank 0's statistics, checkpoint path or URI)``; raises the stage's error as :class:`TrainingError`."""
        while not self.wait(1.0):
            pass
        if self.error is not None:
            raise TrainingError(self.error)
        return ray.get(self.refs[0]), self.uri


@ray.remote(num_cpus=0)
class PhaseBoard:
    """The driver's side of a Ray Train fit that runs a whole pipeline (an async Ray actor, no CPU): the driver
    posts each stage's description as the stage engine builds it; the fit's workers wait for it; rank 0 posts the
    committed stage's statistics and checkpoint back, and its progress reports."""

    def __init__(self) -> None:
        self.posted: dict[int, tuple[StageSpec, StageData | None]] = {}
        self.results: dict[int, tuple[dict[str, Any], str]] = {}
        self.reports: list[Progress] = []
        self.closed = False
        self.changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def post(self, k: int, stage: StageSpec, next_stage: StageData | None) -> None:
        """Make stage k available to the workers (with the next stage's data, to stream ahead)."""
        async with self._condition():
            self.posted[k] = (stage, next_stage)
            self._condition().notify_all()

    async def stage(self, k: int) -> tuple[StageSpec, StageData | None] | None:
        """Stage k once posted; None once the run is over (the workers then return)."""
        async with self._condition():
            await self._condition().wait_for(lambda: k in self.posted or self.closed)
            return None if self.closed else self.posted[k]

    async def finish(self, k: int, stats: dict[str, Any], checkpoint: str) -> None:
        """Rank 0 has committed and reported stage k."""
        async with self._condition():
            self.results[k] = (stats, checkpoint)
            self._condition().notify_all()

    async def result(self, k: int) -> tuple[dict[str, Any], str]:
        """Stage k's ``(statistics, checkpoint)``, once rank 0 has posted them."""
        async with self._condition():
            await self._condition().wait_for(lambda: k in self.results)
            return self.results[k]

    async def close(self) -> None:
        """End the run: waiting workers return from :func:`pipeline_loop_per_worker`."""
        async with self._condition():
            self.closed = True
            self._condition().notify_all()

    async def report(self, progress: Progress) -> None:
        """Keep one of rank 0's progress reports."""
        self.reports.append(progress)

    async def drain(self) -> list[Progress]:
        """The progress reports since the last call, oldest first."""
        out, self.reports = self.reports, []
        return out


def _next_stage_after(checkpoint: Any) -> int:
    """The stage to continue with after Ray Train restarted the fit from ``checkpoint`` (None: from stage 0)."""
    if checkpoint is None:
        return 0
    found = re.findall(r"stage-(\d+)", checkpoint.path)
    return int(found[-1]) + 1 if found else 0


def _free_checkpoint_uri(stage: StageSpec) -> str:
    """The stage's checkpoint folder, or ``<folder>-retryN`` if an earlier attempt already committed one there
    (nothing committed is overwritten)."""
    uri, attempt = stage.checkpoint_uri, 0
    while True:
        candidate = uri if attempt == 0 else f"{uri}-retry{attempt}"
        try:
            read_lineage(candidate, stage.storage)
        except FileNotFoundError:
            return candidate
        attempt += 1


def _in_place(checkpoint: Any, dir_name: str) -> Any:
    """Ray Train's upload of a stage checkpoint: none, as rank 0 committed it in the experiment folder already."""
    return checkpoint


def pipeline_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of a whole pipeline (``training.executor: ray_train``; runs on every worker).

    ``config`` is ``{"board": PhaseBoard handle, "use_gpu": bool}`` (Ray Train passes a dict). For each stage the
    driver posts, in order: train it (:meth:`StageWorker.run`, rank 0 committing the checkpoint into the fit's
    experiment folder, which is the run's storage root), report it with ``ray.train.report`` (rank 0 attaches the
    checkpoint, registered where it is), and post the result to the board. After a restart the loop continues
    with the stage after the last reported one.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint, CheckpointUploadMode

    board = config["board"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage = context.get_storage()
    root = storage.experiment_fs_path.rstrip("/")
    worker = StageWorker(rank, world, config["use_gpu"], ray.train.torch.get_device(),
                         board.report.remote if rank == 0 else None, ray.train.torch.prepare_model)
    k = _next_stage_after(ray.train.get_checkpoint())
    while (posted := ray.get(board.stage.remote(k))) is not None:
        stage, next_stage = posted
        uri = _free_checkpoint_uri(stage) if rank == 0 else stage.checkpoint_uri
        stats = worker.run(stage, uri, next_stage)
        checkpoint = None
        if rank == 0:  # committed: the driver may go on while the stage is reported
            board.finish.remote(k, stats, uri)
            relative = uri[len(stage.checkpoint_uri.rsplit("/", 2)[0]):].lstrip("/")  # as Ray Train's filesystem
            checkpoint = Checkpoint(f"{root}/{relative}", filesystem=storage.storage_filesystem)  # names it
        ray.train.report({"task_id": k, "final_loss": stats["epoch_loss"][-1]}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=_in_place,
                         delete_local_checkpoint_after_upload=False)
        k += 1


class TrainerFit:
    """One Ray Train ``TorchTrainer.fit()`` for a whole pipeline, in a driver thread (see the module docstring).

    Args:
        resources: what each worker reserves. root: the run's storage root (path or URI), Ray Train's experiment
            folder. storage: how to reach it. max_failures: Ray Train's ``FailureConfig.max_failures``.
    """

    def __init__(self, resources: Resources, root: str, storage: Any, max_failures: int) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        parent, name = root.rstrip("/").rsplit("/", 1)
        filesystem, path = (None, parent)
        if storage.ray_filesystem(parent) is not None:
            filesystem, path = storage.arrow(parent)
        self.board = PhaseBoard.remote()
        self.trainer = TorchTrainer(
            pipeline_loop_per_worker, train_loop_config={"board": self.board, "use_gpu": resources.use_gpu},
            scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                         resources_per_worker={"CPU": resources.cpus_per_worker,
                                                               **dict(resources.custom)}),
            run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=max_failures)))
        self.resources, self.outcome = resources, {}
        self.thread = threading.Thread(target=self._fit, name="ray-train-fit", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.outcome["result"] = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised on the driver's main thread by a stage's result()
            self.outcome["error"] = e

    def start(self, stage: StageSpec, next_stage: StageData | None) -> _FitPhase:
        """Post stage ``stage.task_id`` to the fit's workers."""
        ray.get(self.board.post.remote(stage.task_id, stage, next_stage))
        return _FitPhase(self, stage.task_id)

    def progress(self) -> list[Progress]:
        """Rank 0's progress reports since the last call."""
        try:
            return ray.get(self.board.drain.remote(), timeout=30)
        except ray.exceptions.RayError:
            return []

    def close(self, timeout_s: float = 60.0) -> None:
        """End the fit (its workers return after the last stage) and wait up to ``timeout_s`` seconds for it."""
        try:
            ray.get(self.board.close.remote(), timeout=timeout_s)
        except ray.exceptions.RayError:
            pass
        self.thread.join(timeout_s)
        ray.kill(self.board)


class _FitPhase:
    """One stage (phase) of a :class:`TrainerFit`, as a :class:`StageHandle`."""

    def __init__(self, fit: TrainerFit, k: int) -> None:
        self.fit, self.k = fit, k
        self.ref = fit.board.result.remote(k)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the stage is committed or the fit has ended."""
        ready, _ = ray.wait([self.ref], timeout=timeout)
        return bool(ready) or not self.fit.thread.is_alive()

    def result(self) -> tuple[dict[str, Any], str]:
        """``(rank 0's statistics, checkpoint path or URI)``; raises the fit's error as :class:`TrainingError`."""
        while not self.wait(1.0):
            pass
        if ray.wait([self.ref], timeout=0)[0]:
            return ray.get(self.ref)
        error = self.fit.outcome.get("error")
        raise TrainingError(one_line(str(error)) if error is not None else
                            f"the Ray Train fit ended before stage {self.k} was reported")


class StageRunner:
    """Starts the stages of one pipeline run with ``training.executor`` (see the module docstring), owns the
    persistent worker group or the Ray Train fit, and collects rank 0's progress reports (from the group's rank 0;
    with ``ray_train``, through the fit's :class:`PhaseBoard`).

    Args:
        executor: ``"group"`` or ``"ray_train"``. max_failures: restarts allowed per stage after a worker dies.
    """

    def __init__(self, executor: str, max_failures: int) -> None:
        self.executor, self.max_failures = executor, max_failures
        self._group: WorkerGroup | None = None
        self._fit: TrainerFit | None = None  # ray_train only: started with the first stage
        self._pending: ray.ObjectRef | None = None  # a progress call to the group's rank 0 not yet collected
        self._ready: list[ray.ObjectRef] = []

    def prestart(self, resources: Resources, first_stage: StageData | None = None) -> None:
        """Start the worker group now (its processes boot while the driver does other work), have it stream
        ``first_stage``'s data ahead if given, and pay torch's one-off initialisation."""
        if self.executor == "group":
            group = self.group(resources)
            if first_stage is not None:
                group.prefetch(first_stage)
            self._ready = group.warm_up()

    def ready_at(self) -> float | None:
        """Unix time at which the last prestarted worker was ready; waits for it. None if no worker was prestarted
        or one of them has died since."""
        try:
            return max(ray.get(self._ready)) if self._ready else None
        except ray.exceptions.RayError:
            return None

    def group(self, resources: Resources) -> WorkerGroup:
        """The worker group for ``resources``, started (or replaced, if the resources differ) on demand."""
        if self._group is not None and self._group.resources != resources:
            self.drop_group()
        if self._group is None:
            self._group = WorkerGroup(resources)
        return self._group

    def drop_group(self) -> None:
        """Stop the worker group, if any (the next stage starts a fresh one)."""
        if self._group is not None:
            self._group.shutdown()
            self._group, self._pending = None, None

    def close(self) -> None:
        """Stop the worker group, or end the Ray Train fit, if any."""
        self.drop_group()
        if self._fit is not None:
            self._fit.close()
            self._fit = None

    def start(self, stage: StageSpec, next_stage: StageData | None = None) -> StageHandle:
        """Start one stage; ``next_stage``'s data is streamed ahead by the worker group while this stage trains."""
        if self.executor == "group":
            return _GroupStage(self, stage, next_stage)
        if self._fit is None:  # its experiment folder is the run's storage root: <root>/stage-k/checkpoint
            self._fit = TrainerFit(stage.resources, stage.checkpoint_uri.rsplit("/", 2)[0], stage.storage,
                                   self.max_failures)
        return self._fit.start(stage, next_stage)

    def progress(self, final: bool = False) -> list[Progress]:
        """The progress reports that have arrived since the last call, oldest first, without blocking; with
        ``final`` (the stage has ended), every report of the stage, waiting for them. None from a worker that has
        died (the stage's handle reports that).
        """
        if self._fit is not None:
            return self._fit.progress()
        if self._group is None:
            return []
        out: list[Progress] = []
        try:
            if self._pending is not None and (final or ray.wait([self._pending], timeout=0)[0]):
                out, self._pending = ray.get(self._pending), None
            if final:
                return out + ray.get(self._group.workers[0].progress.remote())
            if self._pending is None:
                self._pending = self._group.workers[0].progress.remote()
        except ray.exceptions.RayError:
            self._pending = None
        return out
