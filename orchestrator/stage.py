"""One stage: training the model on one domain, on every worker of the stage's executor.

The story of a stage, on every worker (:func:`run_stage`, given the driver's :class:`~orchestrator.plan.StageSpec`):

1. build the model and the bound strategies, and load the previous stage's checkpoint (weights and strategy state);
2. wrap the model in DDP when there are several workers;
3. for each epoch, stream this worker's part of the domain's training data (``orchestrator/ingest.py``; kept
   in memory after the first epoch when it fits, see :class:`EpochCache`) and run the strategy hooks around forward,
   backward and the optimizer step (see ``strategies/base.py``);
4. ``after_task``: the strategies consolidate their state across workers;
5. rank 0 writes the checkpoint (model, strategy state, ``lineage.json``) straight to the run's storage, with either
   executor (``orchestrator/workers.py``).

``fit_task`` is the plain training loop, free of Ray, so that tests and benchmarks can drive it in-process.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from orchestrator.checkpoint import InStageCheckpoints, load_checkpoint
from orchestrator.errors import TrainingError
from orchestrator.ingest import WorkerShard
from orchestrator.shards import feature_matrix
from orchestrator.models import build_model
from orchestrator.plan import StageData, StageSpec
from orchestrator.schedules import lr_factor
from orchestrator.spec import Pipeline
from strategies import Batch, StageContext, Strategy
from strategies.base import LossTerms



@dataclass(frozen=True)
class Progress:
    """A training worker's progress report, sent to the driver (rank 0 only).

    Attributes:
        stage: the stage. kind: ``step`` (every ``training.progress_every`` steps), ``epoch`` (once per epoch),
            ``snapshot`` (every ``evaluation.every_n_steps`` steps: the weights in training, for continual
            evaluation) or ``snapshot_end`` (the same, when the stage's training ends). epoch: 0-based. step:
            optimizer steps so far in the stage.
        samples: new-domain samples seen by this worker. loss: the last step's loss (``step``, ``snapshot``) or the
            epoch's mean loss (``epoch``). seconds: since training began. weights: a snapshot's state_dict (CPU
            tensors) or a Ray object reference to it; None otherwise.
    """

    stage: int
    kind: str
    epoch: int
    step: int
    samples: int
    loss: float
    seconds: float
    weights: Any = None


ProgressFn = Callable[[Progress], None]


class ToBatch:
    """Collate an Arrow table of shard rows into a :class:`Batch`.

    Features (uint8 or float32, flattened) are scaled to float32 with numpy (one pass, off the GIL, so that a
    prefetching thread leaves the training thread alone) and reshaped to ``[B, *input_shape]``; labels are mapped to
    output units through the head layout's target table ``[T, max_label + 1]`` using the ``t`` column. With ``pin``
    (training on a GPU), the batch is built in page-locked memory, on the streaming thread, for an asynchronous copy.

    Raises:
        TrainingError: (when called) a label is outside its domain's label set (naming the label and the domain).
    """

    def __init__(self, features: str, label: str, input_shape: tuple[int, ...], scale: float,
                 targets: torch.Tensor, pin: bool = False, dtype: str = "uint8") -> None:
        self.features, self.label, self.input_shape, self.pin, self.dtype = features, label, input_shape, pin, dtype
        self.scale, self.targets, self.width = np.float32(scale), targets, math.prod(input_shape)

    def __call__(self, table: pa.Table) -> Batch:
        """Arrow table of ``[N]`` rows with the feature, label and ``t`` columns -> :class:`Batch`."""
        n = table.num_rows
        raw = feature_matrix(table.column(self.features), self.width, self.dtype)
        x = torch.from_numpy(np.multiply(raw.reshape(n, *self.input_shape), self.scale, dtype=np.float32))
        labels = torch.from_numpy(table.column(self.label).to_numpy().astype(np.int64))
        t = torch.from_numpy(table.column("t").to_numpy().astype(np.int64))
        y = self.targets[t, labels.clamp(0, self.targets.shape[1] - 1)]
        bad = (labels >= self.targets.shape[1]) | (labels < 0) | (y < 0)
        if bool(bad.any()):
            raise TrainingError(f"label {int(labels[bad][0])} of domain {int(t[bad][0])} is not in its label set")
        return Batch(x, y, t).pin_memory() if self.pin else Batch(x, y, t)


class ToTokenBatch:
    """Collate an Arrow table of token blocks (a text domain's shard rows) into a :class:`Batch` for next-token
    prediction: ``x`` the first ``context`` ids of each block and ``y`` the last ``context`` (``[B, context]`` int64
    each), ``t`` the domain ids. With ``pin``, in page-locked memory (see :class:`ToBatch`)."""

    def __init__(self, features: str, width: int, dtype: str, pin: bool = False) -> None:
        self.features, self.width, self.dtype, self.pin = features, width, dtype, pin

    def __call__(self, table: pa.Table) -> Batch:
        """Arrow table of ``[N]`` blocks of ``context + 1`` ids with the ``t`` column -> :class:`Batch`."""
        tokens = torch.from_numpy(feature_matrix(table.column(self.features), self.width, self.dtype).astype(np.int64))
        t = torch.from_numpy(table.column("t").to_numpy().astype(np.int64))
        batch = Batch(tokens[:, :-1], tokens[:, 1:], t)
        return batch.pin_memory() if self.pin else batch


def local_shuffle(tables: Iterator[pa.Table], rows: int, seed: int) -> Iterator[pa.Table]:
    """Mix a stream of Arrow tables through a shuffle buffer of ``rows`` rows (seeded by ``seed``).

    Once the buffer holds ``2 rows`` rows, it is permuted and all but ``rows`` random rows leave (rounded down to
    whole input tables' lengths); at the end, the rest leaves permuted. A row can travel up to the whole stream's
    length. It works on the shards' raw columns (uint8 features), before collation: each row is copied about twice,
    at a quarter of the bytes of float32 features.
    """
    rng = np.random.default_rng(seed)
    pool: list[pa.Table] = []
    size = block = 0
    for table in tables:
        block = block or table.num_rows
        pool.append(table)
        size += table.num_rows
        if size >= 2 * rows:
            mixed = pa.concat_tables(pool).take(pa.array(rng.permutation(size)))
            out = max(block, (size - rows) // block * block)
            yield mixed.slice(0, out)
            pool, size = [mixed.slice(out)], size - out
    if size:
        yield pa.concat_tables(pool).take(pa.array(rng.permutation(size)))


def stream_batches(shard: WorkerShard, collate: Callable[[pa.Table], Batch], batch_size: int, shuffle_rows: int = 0,
                   seed: int = 0) -> Iterator[Batch]:
    """One streaming pass over a worker's ``shard`` as training batches of ``batch_size`` samples (the last one
    possibly smaller).

    The shard is read in blocks of about 2048 rows (a whole number of batches), mixed through :func:`local_shuffle`
    when ``shuffle_rows`` > 0 (seeded by ``seed``), collated once per block and cut into training batches, so that
    the per-block cost is paid 16 times less often than per batch.
    """
    chunk = batch_size * max(1, 2048 // batch_size)
    tables = shard.tables(chunk)
    if shuffle_rows:
        tables = local_shuffle(tables, shuffle_rows, seed)
    for table in tables:
        block = collate(table)
        for i in range(0, len(block), batch_size):
            yield block.select(slice(i, i + batch_size))


class EpochCache:
    """A worker's pass over its shard that keeps the shard in memory after the first complete pass, when it fits.

    The first call streams from ``first_pass`` (batches streamed ahead by a :class:`Prefetch`), or else from
    ``stream()``, and copies the batches aside; once a pass ends with at most ``limit_bytes`` copied (inputs, targets
    and domain ids), later calls iterate the copy instead: in a fresh random order each time when ``shuffle`` (a full
    shuffle of this worker's shard), else in the streamed order. A pass abandoned half-way (a strategy reading only a
    few batches) caches nothing. ``after_first_pass()`` is called once, when the first complete pass has ended.

    Args:
        stream: a fresh streaming pass (``[B, ...]`` batches). limit_bytes: the cache's budget in bytes (0: never
            cache). batch_size: samples per cached batch. shuffle: re-shuffle cached epochs. seed: of that shuffle.
        first_pass: the batches of the first pass, already streaming (used once, by the first call).
        after_first_pass: called when the first complete pass ends (e.g. to start streaming the next stage's data).
        device: keep the copy there (a GPU: later epochs then read no host memory at all); None: host memory.
    """

    def __init__(self, stream: Callable[[], Iterator[Batch]], limit_bytes: int, batch_size: int, shuffle: bool,
                 seed: int, first_pass: Iterator[Batch] | None = None,
                 after_first_pass: Callable[[], None] | None = None, device: torch.device | None = None) -> None:
        self.stream, self.limit, self.batch_size, self.shuffle = stream, limit_bytes, batch_size, shuffle
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.cached: Batch | None = None
        self.first_pass, self.after_first_pass = first_pass, after_first_pass

    def __call__(self) -> Iterator[Batch]:
        """One pass over the shard (``[B, ...]`` batches of ``batch_size`` samples, the last one possibly smaller)."""
        if self.cached is not None:
            yield from self._replay(self.cached)
            return
        source, self.first_pass = (self.first_pass or self.stream()), None
        parts: list[Batch] | None = [] if self.limit > 0 else None
        size = 0
        for batch in source:
            if parts is not None:
                size += sum(v.element_size() * v.nelement() for v in (batch.x, batch.y, batch.t))
                if size <= self.limit:
                    parts.append(batch)
                else:
                    parts = None  # too large: stream every epoch
            yield batch
        # reached only when the pass was complete
        if parts:
            self.cached = Batch(torch.cat([b.x for b in parts]), torch.cat([b.y for b in parts]),
                                torch.cat([b.t for b in parts]))
            if self.device is not None:
                self.cached = self.cached.to(self.device)
        if self.after_first_pass is not None:
            self.after_first_pass, callback = None, self.after_first_pass
            callback()

    def _replay(self, data: Batch) -> Iterator[Batch]:
        n = len(data)
        order = (torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)).to(data.x.device)
        for i in range(0, n, self.batch_size):
            yield data.select(order[i:i + self.batch_size])


class Prefetch:
    """A stage's first pass over a worker's shard, streamed into memory ahead of the stage on a background thread.

    The persistent worker group streams stage k+1's data while stage k trains (and stage 0's while the driver
    validates the shards and the model is built), so that a stage's first epoch does not wait on the first reads
    (opening the shards, a round trip each on object storage). The batches are the ones the stage would have
    streamed itself, in the same order.

    Args:
        task_id: the stage whose data this is. stream: the streaming pass (``[B, ...]`` batches).
        max_batches: how many batches may wait in memory before the stage consumes them (the thread then blocks).
    """

    _END = object()

    def __init__(self, task_id: int, stream: Callable[[], Iterator[Batch]], max_batches: int) -> None:
        self.task_id = task_id
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_batches))
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(stream,), name=f"prefetch-stage-{task_id}",
                                       daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.cancelled.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, stream: Callable[[], Iterator[Batch]]) -> None:
        try:
            for batch in stream():
                if not self._put(batch):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the stage's own thread by batches()
            self._put(e)
            return
        self._put(self._END)

    def batches(self) -> Iterator[Batch]:
        """The prefetched pass, in stream order (blocks until each batch has arrived; usable once).

        Raises:
            whatever the streaming pass raised (a bad label, a failed read), in the caller's thread.
        """
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop streaming and let go of the batches (a stage that will not run)."""
        self.cancelled.set()
        self.thread.join(timeout=5.0)


def make_optimizer(pipeline: Pipeline, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the stage's optimizer from ``training.optimizer``."""
    o = pipeline.training.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


@dataclass(frozen=True)
class Position:
    """Where a stage's training stood when an in-stage checkpoint was written (``training.checkpoint_every_n_steps``).

    Attributes:
        epoch: the epoch in progress. batches: batches of it consumed (trained on or skipped). step: optimizer
            steps of the stage so far. planned: epochs planned (strategies' extra epochs included once asked).
        samples: new-domain samples trained on. skipped: batches skipped (non-finite loss). total, count: the
            epoch's running loss sum (per sample) and samples. epoch_loss, epoch_seconds: the finished epochs'.
    """

    epoch: int
    batches: int
    step: int
    planned: int
    samples: int
    skipped: int
    total: float
    count: int
    epoch_loss: tuple[float, ...]
    epoch_seconds: tuple[float, ...]


@dataclass(frozen=True)
class InStage:
    """In-stage checkpoints of one stage (``training.checkpoint_every_n_steps``), as :func:`fit_task` uses them.

    Attributes:
        every: optimizer steps between checkpoints. save: writes one at a :class:`Position` (rank 0 writes; the
            others do nothing). restore: loads the latest one of the stage into the model, optimizer and strategies
            and returns its position, or returns None if there is none (the stage starts from its parent).
    """

    every: int
    save: Callable[[Position], None]
    restore: Callable[[], Position | None]


@dataclass
class _Loop:
    """What every epoch of :func:`fit_task` shares."""

    emit: ProgressFn
    progress_every: int
    start: float
    snapshot_every: int
    snap: Callable[..., None] | None
    skip_nonfinite: bool
    in_stage: InStage | None
    stats: dict[str, Any]
    planned: int  # epochs, the strategies' extra ones included once asked


def fit_task(ctx: StageContext, strategies: list[Strategy], epochs: int,
             on_progress: ProgressFn | None = None, progress_every: int = 20, snapshot_every: int | None = None,
             snapshot: Callable[[], Any] | None = None, skip_nonfinite: bool = False,
             in_stage: InStage | None = None) -> dict[str, Any]:
    """Train ``ctx.train_model`` on the current domain for ``epochs`` epochs with the strategies' hooks, then for as
    many more as the strategies ask for (``extra_epochs``: PackNet's retraining after pruning), through the same loop.

    Each epoch is one pass over ``ctx.iter_task_batches()``. ``on_progress`` receives a :class:`Progress` of kind
    ``step`` every ``progress_every`` steps and one of kind ``epoch`` per epoch, with the epoch's mean loss; with
    ``snapshot_every`` and ``snapshot`` (which returns the weights in training, or a reference to them), one of kind
    ``snapshot`` every ``snapshot_every`` steps and one of kind ``snapshot_end`` when training ends (before
    ``after_task``). ``skip_nonfinite`` (``training.on_nonfinite: skip_batch``): a batch whose loss is NaN or
    infinite is skipped (see :func:`train_step`) and counted instead of failing the stage.

    With ``in_stage``, a checkpoint is saved every ``in_stage.every`` optimizer steps, and a stage that finds one
    (restarted after a worker died, or resumed after the driver did) continues from it: after ``before_task``, the
    model, optimizer and strategy state are those of the checkpoint, and the batches it had consumed are read again
    without training, so that the rest of the stage sees the batches in the same order.

    Returns:
        ``{"epoch_loss": [float], "epoch_seconds": [float], "samples": int (new-domain samples seen),
        "train_seconds": float, "first_batch_at": unix seconds when the first batch arrived, "skipped_batches":
        int, "resumed_at_step": int (0 unless continued from an in-stage checkpoint)}`` (every epoch, extra ones
        included; seconds of ``after_task`` count in ``train_seconds`` only; the epoch's loss is the mean over the
        batches that were not skipped).
    Raises:
        TrainingError: if the loss becomes NaN or infinite (naming the domain, epoch and step), or with
            ``skip_nonfinite`` if every batch of an epoch was skipped.
    """
    emit = on_progress or (lambda event: None)
    every = snapshot_every if (snapshot_every and snapshot is not None and on_progress is not None) else 0

    def snap(loss: float, kind: str = "snapshot") -> None:
        assert snapshot is not None
        emit(Progress(ctx.task_id, kind, ctx.epoch, ctx.step, stats["samples"], loss, time.perf_counter() - start,
                      snapshot()))

    for s in strategies:
        s.before_task(ctx)
    ctx.train_model.train()
    at = in_stage.restore() if in_stage is not None else None
    start = time.perf_counter()
    stats = _fresh_stats()
    planned, epoch = (epochs, 0) if at is None else _continue_from(ctx, at, stats)
    loop = _Loop(emit, progress_every, start, every, snap, skip_nonfinite, in_stage, stats, planned)
    while epoch < loop.planned:
        ctx.epoch = epoch
        loss = _train_epoch(ctx, strategies, loop, at if at is not None and at.epoch == epoch else None)
        stats["epoch_loss"].append(loss)
        stats["epoch_seconds"].append(time.perf_counter() - start - sum(stats["epoch_seconds"]))
        emit(Progress(ctx.task_id, "epoch", epoch, ctx.step, stats["samples"], loss, time.perf_counter() - start))
        epoch += 1
        if epoch == epochs == loop.planned:  # the planned epochs are done: the strategies may ask for more
            loop.planned += max([s.extra_epochs(ctx) for s in strategies], default=0)
    if every:  # the task's end (the accuracy the stability gap is measured against)
        snap(stats["epoch_loss"][-1] if stats["epoch_loss"] else float("nan"), "snapshot_end")
    for s in strategies:
        s.after_task(ctx)
    stats["train_seconds"] = time.perf_counter() - start
    return stats


def _fresh_stats() -> dict[str, Any]:
    """:func:`fit_task`'s statistics before its first batch."""
    return {"epoch_loss": [], "epoch_seconds": [], "samples": 0, "first_batch_at": float("nan"),
            "skipped_batches": 0, "resumed_at_step": 0}


def _continue_from(ctx: StageContext, at: Position, stats: dict[str, Any]) -> tuple[int, int]:
    """Set the step and ``stats`` to those of an in-stage checkpoint and read the batches of the epochs it had
    finished again without training (the data order stays the same); returns ``(planned epochs, epoch)``."""
    ctx.step = at.step
    stats.update(epoch_loss=list(at.epoch_loss), epoch_seconds=list(at.epoch_seconds), samples=at.samples,
                 skipped_batches=at.skipped, resumed_at_step=at.step)
    for _ in range(at.epoch):
        for _batch in ctx.iter_task_batches():
            pass
    return at.planned, at.epoch


def _train_epoch(ctx: StageContext, strategies: list[Strategy], loop: _Loop, at: Position | None = None) -> float:
    """One pass over ``ctx.iter_task_batches()`` (from ``at``, an in-stage checkpoint inside this epoch: its
    batches are read again without training); adds the new-domain samples and skipped batches to ``loop.stats``,
    saves in-stage checkpoints, and returns the epoch's mean loss per new sample."""
    stats = loop.stats
    total, count, skipped, consumed = (at.total, at.count, 0, 0) if at is not None else (0.0, 0, 0, 0)
    for batch in ctx.iter_task_batches():
        consumed += 1
        if at is not None and consumed <= at.batches:
            continue
        if ctx.step == 0:
            stats["first_batch_at"] = time.time()
        new = len(batch)
        loss = train_step(ctx, strategies, batch.to(ctx.device, non_blocking=True), loop.skip_nonfinite)
        if loss is None:  # a non-finite loss, skipped
            skipped += 1
            stats["skipped_batches"] += 1
            continue
        ctx.step += 1
        stats["samples"] += new
        value = loss.item()
        total, count = total + value * new, count + new
        if ctx.step % loop.progress_every == 0:
            loop.emit(Progress(ctx.task_id, "step", ctx.epoch, ctx.step, stats["samples"], value,
                               time.perf_counter() - loop.start))
        if loop.snapshot_every and loop.snap is not None and ctx.step % loop.snapshot_every == 0:
            loop.snap(value)
        if loop.in_stage is not None and ctx.step % loop.in_stage.every == 0:
            loop.in_stage.save(Position(ctx.epoch, consumed, ctx.step, loop.planned, stats["samples"],
                                        stats["skipped_batches"], total, count, tuple(stats["epoch_loss"]),
                                        tuple(stats["epoch_seconds"])))
    if skipped and not count:
        raise TrainingError(f"domain {ctx.task_id}: every batch of epoch {ctx.epoch} ({skipped}) had a NaN or "
                            "infinite loss and was skipped (training.on_nonfinite: skip_batch)")
    return total / max(count, 1)


def train_step(ctx: StageContext, strategies: list[Strategy], batch: Batch,
               skip_nonfinite: bool = False) -> torch.Tensor | None:
    """One optimizer step on ``batch`` with every strategy's hooks (see ``strategies/base.py``); returns the loss
    (``LossTerms.total()``, a scalar tensor).

    With ``skip_nonfinite``, a NaN or infinite loss skips the batch instead: no backward pass, no hook after the loss,
    no optimizer step, and None is returned. With several workers they agree first (one all-reduce of a flag), so
    that all of them skip the batch that any of them could not use and DDP's gradient all-reduce stays in step.

    Raises:
        TrainingError: if the loss is NaN or infinite (naming the domain, epoch and step), unless skipped.
    """
    for s in strategies:
        batch = s.train_batch(ctx, batch)
    with ctx.autocast():  # bf16 under training.precision: bf16; the backward pass runs outside it, as torch advises
        outputs = ctx.train_model(batch.x)
        terms = LossTerms(ce=ctx.criterion(outputs, batch))
        for s in strategies:
            s.loss(ctx, batch, outputs, terms)
        loss = terms.total()
    finite = bool(torch.isfinite(loss))
    if skip_nonfinite and ctx.world_size > 1:  # every worker skips the batch that any of them could not use
        finite = float(ctx.all_reduce_sum(torch.tensor([0.0 if finite else 1.0], device=ctx.device))) == 0.0
    if not finite and skip_nonfinite:
        return None
    if not finite:
        raise TrainingError(f"domain {ctx.task_id}: loss is {loss.item()} at epoch {ctx.epoch}, step {ctx.step}")
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for s in strategies:
        s.after_backward(ctx)
    if ctx.lr_factor is not None:
        factor = ctx.lr_factor(ctx.step)
        for group in ctx.optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
    ctx.optimizer.step()
    for s in strategies:
        s.after_step(ctx)
    return loss


def make_stream(data: StageData, rank: int, world: int, pin: bool = False) -> Callable[[], Iterator[Batch]]:
    """The streaming pass of stage ``data.task_id`` over worker ``rank`` of ``world``'s part of its data
    (:meth:`StageData.shard`): training batches (``[B, *input_shape]`` floats, targets, domain ids; for text,
    ``[B, context]`` input and target ids) of ``data.batch_size`` samples.

    Only the stage's data description is needed, so the pass can start before the stage's parent checkpoint exists
    (:class:`Prefetch`). ``pin``: batches in page-locked memory (see :class:`ToBatch`).
    """
    form = data.input
    collate: Callable[[pa.Table], Batch]
    if form.text:
        collate = ToTokenBatch(form.features, form.shape[0], form.dtype, pin)
    else:
        assert form.label is not None
        collate = ToBatch(form.features, form.label, form.shape, form.scale, data.layout.target_table(), pin,
                          form.dtype)
    shard = data.shard(rank, world)
    return lambda: stream_batches(shard, collate, data.batch_size, data.shuffle_rows, data.seed + data.task_id)


def pins_memory(data: StageData, device: torch.device) -> bool:
    """True if batches go to ``device`` from page-locked memory: training on a GPU with ``training.pin_memory``."""
    return device.type == "cuda" and data.pin_memory


def prefetch_batches(data: StageData) -> int:
    """How many training batches of a stage fit in its cache budget (at least 2)."""
    batch_bytes = data.batch_size * (4 * math.prod(data.input.shape) + 16)
    return max(2, data.cache_bytes // batch_bytes)


def stage_context(stage: StageSpec, rank: int, world: int, model: torch.nn.Module, train_model: torch.nn.Module,
                  device: torch.device, batches: EpochCache) -> StageContext:
    """What the strategies see during ``stage`` on this worker (see :class:`strategies.StageContext`)."""
    layout, training = stage.data.layout, stage.pipeline.training
    steps_per_epoch = math.ceil(stage.train_rows / world / training.batch_size)
    schedule = training.lr_schedule
    planned = steps_per_epoch * training.epochs
    return StageContext(model=model, train_model=train_model, optimizer=make_optimizer(stage.pipeline, train_model),
                        task_id=stage.task_id, num_tasks=len(layout.label_sets), head_mask=layout.head_mask(),
                        world_size=world, rank=rank, device=device, seed=stage.pipeline.seed,
                        iter_task_batches=batches, log=lambda message: print(message, file=sys.stderr),
                        steps_per_epoch=steps_per_epoch,
                        rows_per_epoch=stage.train_rows, domain_units=layout.domain_units(),
                        target_table=layout.target_table(), state_uri=stage.state_uri, store=stage.storage,
                        autocast_dtype=torch.bfloat16 if training.precision == "bf16" else None,
                        lr_factor=None if schedule.name == "constant" else
                        (lambda step: lr_factor(schedule, stage.task_id, step, planned)))


def in_stage_checkpoints(stage: StageSpec, rank: int, ctx: StageContext, strategies: list[Strategy],
                         every: int) -> InStage:
    """The :class:`InStage` of ``stage`` on this worker: rank 0 saves the model, the optimizer and the strategies'
    state every ``every`` steps under the stage's folder (:class:`orchestrator.checkpoint.InStageCheckpoints`);
    every rank restores the newest one when the stage starts again. A strategy's state is its ``state_dict`` and
    its ``stage_state_dict`` (what it gathered inside the stage: a replay reservoir and its random state, SI's path
    integral); a strategy that keeps in-stage state elsewhere starts that part again from the checkpoint."""
    store = InStageCheckpoints(stage.checkpoint_uri.rsplit("/", 1)[0], stage.storage, dict(stage.lineage))

    def save(at: Position) -> None:
        if rank == 0:
            store.save(at.step, {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()},
                       [{"state": s.state_dict(), "stage": s.stage_state_dict()} for s in strategies],
                       ctx.optimizer.state_dict(), dataclasses.asdict(at))

    def restore() -> Position | None:
        found = store.latest()
        if found is None:
            return None
        model_state, strategy_states, optimizer_state, position = found
        ctx.model.load_state_dict(model_state)
        ctx.optimizer.load_state_dict(optimizer_state)
        for s, state in zip(strategies, strategy_states):
            s.load_state_dict(state["state"])
            s.load_stage_state_dict(state["stage"])
        return Position(**{**position, "epoch_loss": tuple(position["epoch_loss"]),
                           "epoch_seconds": tuple(position["epoch_seconds"])})

    return InStage(every, save, restore)


def run_stage(stage: StageSpec, rank: int, world: int, device: torch.device,
              wrap_model: Callable[[torch.nn.Module], torch.nn.Module], first_pass: Iterator[Batch] | None = None,
              after_first_pass: Callable[[], None] | None = None, on_progress: ProgressFn | None = None
              ) -> tuple[dict[str, Any], torch.nn.Module, list[Strategy]]:
    """Train one stage on this worker: the common body of both executors (see ``orchestrator/workers.py``).

    Args:
        stage: the driver's description of the stage. rank, world: this worker's rank and the number of workers.
        device: where the model trains. wrap_model: wraps the model for data parallelism (DDP) or returns it.
        first_pass: the first epoch's batches, already streaming (:class:`Prefetch`), if any.
        after_first_pass: called once the first epoch's pass over this worker's data is complete.
        on_progress: receives rank 0's :class:`Progress` reports.
    Returns:
        ``(stats, model, strategies)``: :func:`fit_task`'s statistics plus ``setup_seconds``,
        ``samples_per_second`` (all workers) and ``node_id`` (this worker's Ray node), the trained (unwrapped) model
        and the strategies after ``after_task``.
    Raises:
        TrainingError: on a NaN/infinite loss or a label outside the domain's label set.
        FileNotFoundError, ValueError: if the parent checkpoint is missing, incomplete or corrupt.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(stage.resources.threads)
    pipeline = stage.pipeline
    torch.manual_seed(pipeline.seed * 1000 + stage.task_id)
    model = build_model(pipeline.model, stage.data.input.shape, stage.data.layout.num_outputs)
    model_state, strategy_states, _ = load_checkpoint(stage.parent, stage.storage)
    model.load_state_dict(model_state)
    model.to(device)
    strategies = [b.build() for b in stage.strategies]
    for s, state in zip(strategies, strategy_states):
        s.load_state_dict(state)
    train_model = wrap_model(model) if world > 1 else model
    batches = EpochCache(make_stream(stage.data, rank, world, pins_memory(stage.data, device)),
                         stage.data.cache_bytes, stage.data.batch_size, shuffle=stage.data.shuffle != "files",
                         seed=hash((pipeline.seed, stage.task_id, rank)) & 0x7FFF_FFFF,
                         first_pass=first_pass, after_first_pass=after_first_pass,
                         device=device if device.type == "cuda" else None)
    ctx = stage_context(stage, rank, world, model, train_model, device, batches)
    setup_seconds = time.perf_counter() - t0
    import ray  # run_stage runs in a Ray worker; fit_task alone (the strategy benchmark) needs no Ray

    def snapshot() -> Any:  # the weights in training, in the object store for the evaluation actors
        return ray.put({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    every = pipeline.training.checkpoint_every_n_steps
    stats = fit_task(ctx, strategies, pipeline.training.epochs, on_progress if rank == 0 else None,
                     pipeline.training.progress_every, pipeline.evaluation.every_n_steps
                     if pipeline.evaluation.enabled else None, snapshot,
                     pipeline.training.on_nonfinite == "skip_batch",
                     in_stage_checkpoints(stage, rank, ctx, strategies, every) if every else None)
    stats["setup_seconds"] = setup_seconds
    stats["samples_per_second"] = stats["samples"] * world / max(stats["train_seconds"], 1e-9)
    stats["steps"] = ctx.step
    stats["node_id"] = ray.get_runtime_context().get_node_id()
    return stats, model, strategies
