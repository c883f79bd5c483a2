"""One stage: training the model on one domain, as a Ray Train worker function.

The story of a stage, on every worker:

1. build the model and strategies, and load the previous stage's checkpoint (weights and strategy state);
2. wrap the model in DDP when there are several workers;
3. for each epoch, stream this worker's shard of the domain's training data (Ray Data ``iter_torch_batches``) and
   run the strategy hooks around forward, backward and the optimizer step (see ``strategies/base.py``);
4. ``after_task``: the strategies consolidate their state across workers;
5. rank 0 writes the checkpoint (model, strategy state, ``lineage.json``) and every worker reports it.

``fit_task`` is the plain training loop, free of Ray, so that tests and benchmarks can drive it in-process.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from orchestrator.checkpoint import load_checkpoint, write_checkpoint
from orchestrator.errors import TrainingError
from orchestrator.models import HeadLayout, build_model
from orchestrator.spec import Pipeline
from orchestrator.storage import Storage
from strategies import Batch, StageContext, Strategy, build_strategies, train_domains_of

ProgressFn = Callable[[dict[str, Any]], None]


class ToBatch(ArrowBatchCollateFn):
    """Collate an Arrow batch of shard rows into a :class:`Batch`.

    Features (uint8, flattened) are scaled to floats and reshaped to ``[B, *input_shape]``; labels are mapped to
    output units through the head layout's target table ``[T, max_label + 1]`` using the ``t`` column.
    """

    def __init__(self, features: str, label: str, input_shape: tuple[int, ...], scale: float,
                 targets: torch.Tensor) -> None:
        super().__init__()
        self.features, self.label, self.input_shape = features, label, input_shape
        self.scale, self.targets = scale, targets

    def __call__(self, table: pa.Table) -> Batch:
        """Arrow table with the feature, label and ``t`` columns -> :class:`Batch`."""
        n = table.num_rows
        raw = table.column(self.features).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        x = torch.from_numpy(raw.reshape(n, *self.input_shape).astype(np.float32)) * self.scale
        labels = torch.from_numpy(table.column(self.label).to_numpy().astype(np.int64))
        t = torch.from_numpy(table.column("t").to_numpy().astype(np.int64))
        y = self.targets[t, labels.clamp(0, self.targets.shape[1] - 1)]
        bad = (labels >= self.targets.shape[1]) | (y < 0)
        if bool(bad.any()):
            raise TrainingError(f"label {int(labels[bad][0])} of domain {int(t[bad][0])} is not in its label set")
        return Batch(x, y, t)


def make_optimizer(pipeline: Pipeline, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the stage's optimizer from ``training.optimizer``."""
    o = pipeline.training.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def fit_task(ctx: StageContext, strategies: list[Strategy], epochs: int,
             on_progress: ProgressFn | None = None, progress_every: int = 20) -> dict[str, Any]:
    """Train ``ctx.train_model`` on the current domain for ``epochs`` epochs with the strategies' hooks.

    Each epoch is one pass over ``ctx.iter_task_batches()``. ``on_progress`` receives step events
    (``{"kind": "step", "epoch", "step", "samples", "loss", "seconds"}``) every ``progress_every`` steps and one
    ``{"kind": "epoch", ...}`` event per epoch with the epoch's mean loss.

    Returns:
        ``{"epoch_loss": [float], "samples": int (new-domain samples seen), "train_seconds": float}``.
    Raises:
        TrainingError: if the loss becomes NaN or infinite (naming the domain, epoch and step).
    """
    emit = on_progress or (lambda event: None)
    for s in strategies:
        s.before_task(ctx)
    ctx.train_model.train()
    start = time.perf_counter()
    epoch_losses, samples = [], 0
    for epoch in range(epochs):
        ctx.epoch = epoch
        total, count = 0.0, 0
        for batch in ctx.iter_task_batches():
            new = len(batch)
            batch = batch.to(ctx.device)
            for s in strategies:
                batch = s.train_batch(ctx, batch)
            outputs = ctx.train_model(batch.x)
            loss = ctx.criterion(outputs, batch)
            for s in strategies:
                loss = s.loss(ctx, batch, outputs, loss)
            if not torch.isfinite(loss):
                raise TrainingError(f"domain {ctx.task_id}: loss is {loss.item()} at epoch {epoch}, step {ctx.step}")
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for s in strategies:
                s.after_backward(ctx)
            ctx.optimizer.step()
            for s in strategies:
                s.after_step(ctx)
            ctx.step += 1
            samples += new
            total += loss.item() * new
            count += new
            if ctx.step % progress_every == 0:
                emit({"kind": "step", "epoch": epoch, "step": ctx.step, "samples": samples,
                      "loss": loss.item(), "seconds": time.perf_counter() - start})
        epoch_losses.append(total / max(count, 1))
        emit({"kind": "epoch", "epoch": epoch, "step": ctx.step, "samples": samples, "loss": epoch_losses[-1],
              "seconds": time.perf_counter() - start})
    for s in strategies:
        s.after_task(ctx)
    return {"epoch_loss": epoch_losses, "samples": samples, "train_seconds": time.perf_counter() - start}


def layout_from(config: dict[str, Any]) -> HeadLayout:
    """Rebuild the :class:`HeadLayout` sent by the driver in the stage config."""
    return HeadLayout.build(config["scenario"], [list(s) for s in config["label_sets"]])


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point of a stage (runs on every worker).

    ``config`` holds: ``spec`` (the pipeline as JSON), ``task_id``, ``scenario``, ``label_sets``, ``input_shape``,
    ``scale``, ``features``/``label`` column names, ``parent`` (the previous checkpoint folder), ``lineage`` (the
    driver's lineage record for this stage), ``train_rows`` (rows streamed per epoch, all workers), ``state_uri``
    (this stage's folder for strategy state too large for the checkpoint) and ``progress`` (a
    ``ray.util.queue.Queue`` or None).

    Returns:
        rank 0's fit statistics (see :func:`fit_task`) plus ``setup_seconds``.
    """
    import ray.train
    import ray.train.torch

    t0 = time.perf_counter()
    pipeline = Pipeline.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    layout = layout_from(config)
    torch.manual_seed(pipeline.seed * 1000 + config["task_id"])

    model = build_model(pipeline.model, tuple(config["input_shape"]), layout.num_outputs)
    model_state, strategy_states, _ = load_checkpoint(config["parent"])
    model.load_state_dict(model_state)
    strategies = build_strategies([(s.name, s.params()) for s in pipeline.strategy])
    for s, state in zip(strategies, strategy_states):
        s.load_state_dict(state)
    train_model = ray.train.torch.prepare_model(model) if world > 1 else model
    device = next(model.parameters()).device

    shard = ray.train.get_dataset_shard("train")
    collate = ToBatch(config["features"], config["label"], tuple(config["input_shape"]), config["scale"],
                      layout.target_table())
    # A stage that streams several domains (joint) gets a proportionally larger shuffle buffer, so that its
    # batches mix the domains instead of following the order in which their shards are read.
    buffer_rows = (pipeline.training.shuffle_buffer * len(train_domains_of(strategies, config["task_id"]))
                   if pipeline.training.shuffle == "local" else 0)

    def iter_task_batches() -> Iterator[Batch]:
        return iter(shard.iter_torch_batches(batch_size=pipeline.training.batch_size, collate_fn=collate,
                                             local_shuffle_buffer_size=buffer_rows or None,
                                             local_shuffle_seed=pipeline.seed + config["task_id"]))

    queue = config.get("progress")

    def on_progress(event: dict[str, Any]) -> None:
        if queue is not None and rank == 0:
            queue.put_nowait({**event, "stage": config["task_id"]})

    ctx = StageContext(model=model, train_model=train_model, optimizer=make_optimizer(pipeline, train_model),
                       task_id=config["task_id"], num_tasks=len(layout.label_sets), head_mask=layout.head_mask(),
                       world_size=world, rank=rank, device=device, seed=pipeline.seed,
                       iter_task_batches=iter_task_batches, log=print,
                       steps_per_epoch=math.ceil(config["train_rows"] / world / pipeline.training.batch_size),
                       rows_per_epoch=config["train_rows"], domain_units=layout.domain_units(),
                       target_table=layout.target_table(), state_uri=config.get("state_uri"),
                       filesystem=Storage.from_settings(pipeline.storage.s3).arrow)
    setup_seconds = time.perf_counter() - t0
    stats = fit_task(ctx, strategies, pipeline.training.epochs, on_progress, pipeline.training.progress_every)
    stats["setup_seconds"] = setup_seconds
    stats["samples_per_second"] = stats["samples"] * world / max(stats["train_seconds"], 1e-9)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            folder = write_checkpoint(Path(tmp) / "stage", model.state_dict(),
                                      [s.state_dict() for s in strategies], config["lineage"])
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report({"task_id": config["task_id"], "final_loss": stats["epoch_loss"][-1]}, checkpoint=checkpoint)
    return stats

