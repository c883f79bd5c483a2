"""Executors of stages: a persistent worker group (default) or one Ray Train fit per stage.

An empty Ray Train ``fit()`` costs about 19 s on a 2-core machine (controller actor, placement group, worker
processes, torch import, process group, storage sync), so one fit per stage makes a small pipeline mostly overhead.
``training.executor`` picks how stages run:

- ``group`` (default): :class:`WorkerGroup`, N long-lived Ray actors (one per worker) started once per pipeline,
  with one torch process group (gloo on CPU, NCCL on GPU) set up once. Every stage still starts from its parent
  checkpoint, reads its own equal part of the stage's shards (``orchestrator/ingest.py``), writes its own
  checkpoint and reports its own statistics; the group only keeps the processes. A stage whose resources differ
  from the group's gets a new group. If a worker process dies, the group is rebuilt and the stage restarts from its
  parent checkpoint, up to ``training.max_failures`` times (errors raised by the training itself, such as a NaN
  loss, are not retried: they would recur).
- ``ray_train``: one ``TorchTrainer`` fit per stage (``orchestrator.stage.train_loop_per_worker``), with Ray Train's
  worker-level fault tolerance (``FailureConfig``) and its checkpoint persistence under the run's storage path.

With ``group``, each worker streams the next stage's data into memory while the current stage trains
(and stage 0's while the driver validates the shards), so that no stage waits on its first reads
(:class:`orchestrator.stage.Prefetch`). With ``ray_train``, each worker streams its part when its stage starts.

Both run the same stage body, :func:`orchestrator.stage.run_stage`. :meth:`StageRunner.start` returns a handle the
driver polls (``wait``) while it shows progress and collects evaluation cells, then asks for the ``result``.
"""

from __future__ import annotations

import collections
import datetime
import socket
import sys
import threading
import time
from typing import Any, Protocol

import ray
import torch

from orchestrator.checkpoint import write_checkpoint
from orchestrator.errors import TrainingError, one_line
from orchestrator.plan import Resources, StageData, StageSpec
from orchestrator.stage import Prefetch, Progress, make_stream, prefetch_batches, run_stage, train_loop_per_worker

GIL_SWITCH_SECONDS = 0.0005


class StageWorker:
    """One training process of a :class:`WorkerGroup` (created as a Ray actor with the group's resources).

    Stages run one at a time on the actor's default thread; :meth:`progress` runs on a thread of its own (Ray's
    concurrency group ``progress``), so that the driver can collect rank 0's progress reports while a stage trains
    without a separate queue process.

    Args:
        rank, world: this worker's rank and the group size.
        use_gpu: train on the GPU that Ray assigned to this actor (it sees only that one, as ``cuda:0``).
    Raises:
        RuntimeError: if ``use_gpu`` and no GPU is visible.
    """

    def __init__(self, rank: int, world: int, use_gpu: bool) -> None:
        self.rank, self.world = rank, world
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"training worker {rank}: training.use_gpu is set but no GPU is visible to it")
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.prefetched: Prefetch | None = None
        self.reports: collections.deque[Progress] = collections.deque(maxlen=10_000)
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
        self.prefetched = Prefetch(data.task_id, make_stream(data, self.rank, self.world), prefetch_batches(data))

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
        stats, model, strategies = run_stage(stage, self.rank, self.world, self.device, self._wrap,
                                             first_pass=first_pass, after_first_pass=start_next,
                                             on_progress=self.reports.append)
        if self.rank == 0:
            write_checkpoint(checkpoint_uri, {k: v.cpu() for k, v in model.state_dict().items()},
                             [s.state_dict() for s in strategies], dict(stage.lineage), stage.storage)
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


class _TrainerStage:
    """A stage running as one Ray Train ``TorchTrainer.fit()`` in a driver thread."""

    def __init__(self, runner: StageRunner, stage: StageSpec) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        res, storage = stage.resources, stage.storage
        storage_path = stage.checkpoint_uri.rsplit("/", 2)[0]  # <root>/stage-k/checkpoint -> <root>
        filesystem, path = (None, storage_path)
        if storage.ray_filesystem(storage_path) is not None:
            filesystem, path = storage.arrow(storage_path)
        self.trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"stage": stage, "progress": runner.trainer_queue()},
            scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                         resources_per_worker={"CPU": res.cpus_per_worker, **dict(res.custom)}),
            run_config=RunConfig(name=f"stage-{stage.task_id}", storage_path=path, storage_filesystem=filesystem,
                                 failure_config=FailureConfig(max_failures=runner.max_failures)))
        self.scheme = storage_path.split("://", 1)[0] + "://" if filesystem is not None else ""
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._fit, name=f"fit-stage-{stage.task_id}", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.outcome["result"] = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the driver's main thread by result()
            self.outcome["error"] = e

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once the fit has ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def result(self) -> tuple[dict[str, Any], str]:
        """``(rank 0's statistics, checkpoint URI)``; raises the fit's error as :class:`TrainingError`."""
        self.thread.join()
        if "error" in self.outcome:
            raise TrainingError(one_line(str(self.outcome["error"])))
        result = self.outcome["result"]
        return result.return_value or {}, self.scheme + result.checkpoint.path


class StageRunner:
    """Starts the stages of one pipeline run with ``training.executor`` (see the module docstring), owns the
    persistent worker group, if any, and collects rank 0's progress reports (from the group's rank 0; with
    ``ray_train``, through a queue actor).

    Args:
        executor: ``"group"`` or ``"ray_train"``. max_failures: restarts allowed per stage after a worker dies.
    """

    def __init__(self, executor: str, max_failures: int) -> None:
        self.executor, self.max_failures = executor, max_failures
        self._group: WorkerGroup | None = None
        self._queue: Any = None  # ray.util.queue.Queue, for ray_train only
        self._pending: ray.ObjectRef | None = None  # a progress call to the group's rank 0 not yet collected
        self._ready: list[ray.ObjectRef] = []

    def trainer_queue(self) -> Any:
        """The ``ray.util.queue.Queue`` to which Ray Train's rank 0 reports progress (started on first use)."""
        if self._queue is None:
            from ray.util.queue import Queue

            self._queue = Queue(actor_options={"num_cpus": 0})
        return self._queue

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
        """Stop the worker group and the progress queue, if any."""
        self.drop_group()
        if self._queue is not None:
            ray.kill(self._queue.actor)

    def start(self, stage: StageSpec, next_stage: StageData | None = None) -> StageHandle:
        """Start one stage; ``next_stage``'s data is streamed ahead by the worker group while this stage trains."""
        if self.executor == "group":
            return _GroupStage(self, stage, next_stage)
        return _TrainerStage(self, stage)

    def progress(self, final: bool = False) -> list[Progress]:
        """The progress reports that have arrived since the last call, oldest first, without blocking; with
        ``final`` (the stage has ended), every report of the stage, waiting for them. None from a worker that has
        died (the stage's handle reports that).
        """
        if self._queue is not None:
            n = self._queue.qsize()
            return list(self._queue.get_nowait_batch(n)) if n else []
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
