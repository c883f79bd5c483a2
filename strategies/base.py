"""The strategy plugin API.

A strategy is a small class with optional hooks, named after Avalanche's. The stage loop calls them in this order,
for every strategy in the pipeline's list, in list order (see ``orchestrator/stage.py``)::

    before_task(ctx)
    for each epoch, for each batch of new-domain samples:
        batch = train_batch(ctx, batch)          # chained: each strategy sees the previous one's batch
        outputs = model(batch.x)
        terms = LossTerms(ce=cross-entropy of batch)
        loss(ctx, batch, outputs, terms)         # named terms: penalties added, "ce" restricted or scaled
        terms.total().backward()                 # DDP all-reduces gradients here
        after_backward(ctx)                      # gradient surgery on the all-reduced gradients
        optimizer.step(); after_step(ctx)
    n = max(extra_epochs(ctx)); n more epochs as above   # PackNet: retraining after pruning
    after_task(ctx)                              # importance / Fisher / buffer consolidation, all-reduced
    state_dict()                                 # saved into the stage checkpoint by rank 0

and, when an evaluation actor scores domain j: ``model = inference_model(model, j)`` for each strategy in order.

A strategy's state must be identical on every worker after ``after_task`` so that rank 0's ``state_dict()`` is the
state of the whole worker group; ``load_state_dict`` receives that state at the start of the next stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict


class ObjectStore(Protocol):
    """Where strategies keep state too large for the checkpoint: the pipeline's storage
    (:class:`orchestrator.storage.Storage`, with its S3 settings), for local paths and URIs alike."""

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of ``uri``; raises if it is missing or unreadable (naming it)."""

    def write_bytes(self, uri: str, data: bytes, overwrite: bool = False) -> None:
        """Write ``data`` to ``uri`` atomically; refuses to overwrite an existing object unless ``overwrite``."""


def local_store() -> ObjectStore:
    """The default store of a :class:`StageContext` built outside a run (tests, notebooks): local paths and URIs
    that need no settings."""
    from orchestrator.storage import Storage

    return Storage()


@dataclass
class Batch:
    """A training batch.

    Attributes:
        x: ``[B, *input_shape]`` float32 inputs (text: ``[B, L]`` int64 token ids).
        y: ``[B]`` int64 output-unit targets (already mapped through the head layout; text: ``[B, L]`` the next
            token ids).
        t: ``[B]`` int64 domain (task) ids.
    """

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def cat(self, other: Batch) -> Batch:
        """Concatenate two batches along the sample axis."""
        return Batch(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]), torch.cat([self.t, other.t]))

    def select(self, index: slice | torch.Tensor) -> Batch:
        """The samples at ``index`` (a slice or an index tensor)."""
        return Batch(self.x[index], self.y[index], self.t[index])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (``non_blocking``: an asynchronous copy from page-locked memory)."""
        return Batch(self.x.to(device, non_blocking=non_blocking), self.y.to(device, non_blocking=non_blocking),
                     self.t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory, for asynchronous copies to a GPU.

        Raises:
            RuntimeError: if no GPU is visible (torch needs one to pin memory).
        """
        return Batch(self.x.pin_memory(), self.y.pin_memory(), self.t.pin_memory())

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Batch:
        """A batch from a buffer's ``{"x", "y", "t", ...}`` tensors (other fields are ignored)."""
        return cls(fields["x"], fields["y"], fields["t"])


def masked_logits(logits: torch.Tensor, t: torch.Tensor, head_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, K]`` with the units outside each sample's head (domain ids ``t``: ``[B]``; ``head_mask``:
    ``[T, K]`` bool) set to -inf; unchanged where every unit is in every head (class-IL, domain-IL)."""
    return logits.masked_fill(~head_mask.to(logits.device)[t], float("-inf"))


def head_cross_entropy(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor, head_mask: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over each sample's own head: the training loss of every stage (task-IL with one head per domain
    is the same as a separate linear head per task). For a language model (``logits`` ``[B, L, V]``, ``y``
    ``[B, L]``), the next-token cross-entropy, a sample's loss being the mean over its L tokens.

    Args:
        logits: ``[B, K]`` raw outputs (or ``[B, L, V]``). y: ``[B]`` output-unit targets (or ``[B, L]`` token ids).
        t: ``[B]`` domain ids. head_mask: ``[T, K]`` bool, which units each domain's head has
        (``HeadLayout.head_mask``; every unit for a language model).
    Returns:
        a scalar (``reduction="mean"``) or ``[B]`` per-sample losses (``"none"``), in nats.
    """
    if logits.dim() == 3:
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        per_sample = per_token.view(y.shape).mean(1)
        return per_sample if reduction == "none" else per_sample.mean()
    return torch.nn.functional.cross_entropy(masked_logits(logits, t, head_mask), y, reduction=reduction)


class LossTerms:
    """The named terms of a training step's loss; the step minimises ``sum_k weight_k * term_k``.

    The stage loop starts every step with one term, ``ce`` (the cross-entropy of the whole training batch over each
    sample's head). Each strategy's ``loss`` hook then adds its own terms (``ewc``, ``derpp.mse``, ``lwf.kd``, ...),
    replaces a term's value by its own definition (DER++ restricts ``ce`` to the new samples), or scales a term's
    weight (LwF's ``beta`` on ``ce``). Values and weights are kept apart so that a replacement and a scaling commute:
    strategies composed in either order give the same terms.

    Attributes:
        values: name -> scalar tensor. weights: name -> float (1.0 unless scaled).
    """

    def __init__(self, **values: torch.Tensor) -> None:
        self.values: dict[str, torch.Tensor] = dict(values)
        self.weights: dict[str, float] = {name: 1.0 for name in values}

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        """A new term ``name`` (scalar tensor) with ``weight``.

        Raises:
            ValueError: if ``name`` is taken (two strategies adding the same term would be summed silently).
        """
        if name in self.values:
            raise ValueError(f"loss term '{name}' is already defined")
        self.values[name], self.weights[name] = value, weight

    def replace(self, name: str, value: torch.Tensor) -> None:
        """Redefine the value of an existing term; its weight is kept."""
        self.values[name] = value

    def scale(self, name: str, factor: float) -> None:
        """Multiply the weight of an existing term by ``factor``."""
        self.weights[name] *= factor

    def total(self) -> torch.Tensor:
        """``sum_k weight_k * value_k``: the scalar the step minimises."""
        return sum(self.weights[k] * v for k, v in self.values.items())  # type: ignore[return-value]


@dataclass
class StageContext:
    """What a strategy sees during a stage.

    Attributes:
        model: the unwrapped model (``[B, *input_shape]`` -> ``[B, K]`` logits).
        train_model: the model used for the training forward pass (DDP-wrapped with several workers).
        optimizer: the stage's optimizer.
        task_id: index of the current domain in the stream (0-based). num_tasks: T.
        head_mask: ``[T, K]`` bool, which output units each domain may predict (see ``HeadLayout``).
        domain_units: ``[T, K]`` bool, the units of each domain's own labels (class-IL: its classes); None means
            ``head_mask``. Use :meth:`units_of`.
        world_size, rank: Ray Train worker group size and this worker's rank.
        device: where the model lives.
        seed: the pipeline seed; strategies derive their RNG seeds from (seed, task_id, rank).
        iter_task_batches: a fresh pass over this worker's shard of the current domain's training data.
        log: writes one line to the stage log.
        epoch, step: the current epoch (0-based) and optimizer step within the stage.
        steps_per_epoch: optimizer steps per epoch on this worker (0 if unknown).
        rows_per_epoch: training samples per epoch, all workers together (0 if unknown).
        target_table: ``[T, max_label + 1]`` long, the output unit of each raw label in each domain (-1 where the
            domain has no such label), from ``HeadLayout.target_table``; None if unknown.
        state_uri: a folder (path or URI) on the pipeline's storage, private to this stage, where strategies may
            write state too large for the checkpoint (Parquet replay buffers); None if the stage has none.
        store: the pipeline's storage (S3 endpoint and credentials), where strategies write state too large for the
            checkpoint; the default (:func:`local_store`) knows local paths and URIs that need no settings.
        autocast_dtype: ``torch.bfloat16`` under ``training.precision: bf16`` (see :meth:`autocast`), else None.
        lr_factor: the learning-rate schedule: step -> factor on the optimizer's base rate, applied before each
            optimizer step (``training.lr_schedule``); None keeps the rate constant.
    """

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    task_id: int
    num_tasks: int
    head_mask: torch.Tensor
    world_size: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    iter_task_batches: Callable[[], Iterator[Batch]] = lambda: iter(())
    log: Callable[[str], None] = print
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    rows_per_epoch: int = 0
    domain_units: torch.Tensor | None = None
    target_table: torch.Tensor | None = None
    state_uri: str | None = None
    store: ObjectStore = field(default_factory=local_store)
    autocast_dtype: torch.dtype | None = None
    lr_factor: Callable[[int], float] | None = None

    def autocast(self) -> Any:
        """The context in which the forward pass and the loss run: bfloat16 autocast on ``device`` when
        ``autocast_dtype`` is set (``training.precision: bf16``), else a no-op."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def units_of(self) -> torch.Tensor:
        """``[T, K]`` bool: the output units that belong to each domain's labels."""
        return self.head_mask if self.domain_units is None else self.domain_units

    def criterion(self, logits: torch.Tensor, batch: Batch, reduction: str = "mean") -> torch.Tensor:
        """:func:`head_cross_entropy` of ``logits`` ``[B, K]`` on ``batch``; ``[B]`` if ``reduction="none"``."""
        return head_cross_entropy(logits, batch.y, batch.t, self.head_mask, reduction)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded from (seed, task_id, rank, salt): reproducible, distinct per worker."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, self.task_id, self.rank, salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all workers, in place, and return it (a no-op with one worker)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Gather one picklable object from every worker, in rank order (``[obj]`` with one worker)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class StrategyConfig(BaseModel):
    """Base class of a strategy's parameters; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Strategy:
    """Base class of CL strategies. Every hook is optional; the defaults do nothing (plain finetuning).

    Class attributes:
        name: registry key used in YAML.
        Config: pydantic model of the strategy's parameters.
        supports_distributed: True if the strategy is correct under DDP with several workers.
        supports_text: True if the strategy works on language models (text domains: ``[B, L, V]`` logits, one shared
            output per token id); False for those built around class heads or Linear/Conv units.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    supports_distributed: ClassVar[bool] = True
    supports_text: ClassVar[bool] = True

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    def train_domains(self, task_id: int) -> list[int]:
        """Indices of the domains whose training data stage ``task_id`` streams (default: only its own)."""
        return [task_id]

    def before_task(self, ctx: StageContext) -> None:
        """Called once at the start of a stage, after the previous state is loaded."""

    def train_batch(self, ctx: StageContext, batch: Batch) -> Batch:
        """Return the batch to train on (e.g. with replay samples mixed in)."""
        return batch

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        """Add, replace or scale named loss terms (see :class:`LossTerms`); ``outputs`` are the logits ``[B, K]``
        of ``batch``."""

    def extra_epochs(self, ctx: StageContext) -> int:
        """Called once the stage's epochs are done: the number of further epochs to train through the same loop,
        with every strategy's hooks (PackNet's retraining after pruning); 0 by default. The stage trains the
        largest number any strategy asks for."""
        return 0

    def after_backward(self, ctx: StageContext) -> None:
        """Called after ``loss.backward()``, when gradients are all-reduced across workers."""

    def after_step(self, ctx: StageContext) -> None:
        """Called after ``optimizer.step()``."""

    def after_task(self, ctx: StageContext) -> None:
        """Called once at the end of a stage; must leave identical state on every worker."""

    def inference_model(self, model: torch.nn.Module, task_id: int) -> torch.nn.Module:
        """The model that evaluates domain ``task_id`` (default: ``model`` itself).

        Parameter-allocation methods (PackNet, HAT) return a view of the model restricted to what that domain's
        task owns. Must not modify ``model``.
        """
        return model

    def state_dict(self) -> dict[str, Any]:
        """The state carried to the next stage (tensors on CPU)."""
        return {}

    def stage_state_dict(self) -> dict[str, Any]:
        """What the strategy has gathered inside the current stage and keeps outside :meth:`state_dict` (tensors
        and JSON values): saved with each in-stage checkpoint (``training.checkpoint_every_n_steps``) and given back
        to :meth:`load_stage_state_dict`, after ``before_task``, when the stage continues from that checkpoint.
        Default: nothing (the strategy changes its state only at task boundaries)."""
        return {}

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`stage_state_dict` returned (called after ``before_task``)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict`` at the end of the previous stage."""
