"""The run plan: the validated pipeline resolved against its shards, and the typed description of every stage.

Everything a worker or an evaluation actor receives from the driver is built here, once, as a frozen object that
holds validated objects (the :class:`~orchestrator.spec.Pipeline`, bound strategies, the head layout), never a dict
read by string keys:

- :func:`~orchestrator.spec.bind` (re-exported here) checks each strategy's parameters against its ``Config``, once
  per run;
- :class:`StagePlan` holds what every stage of a run shares: the domains and their manifests, the head layout, the
  input format, the bound strategies, the worker resources and the run's storage root;
- :class:`StageData` is what a worker needs to stream a stage's data (known before the stage's parent exists, so
  that the workers can prefetch it);
- :class:`StageSpec` is one stage: its data, the parent checkpoint, where its checkpoint and state go, and the
  lineage record its checkpoint will carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.checkpoint import lineage_record
from orchestrator.errors import LifelongError, ShardError
from orchestrator.ingest import ShardFile, WorkerShard, stage_files, validate_domains
from orchestrator.models import HeadLayout
from orchestrator.spec import LANGUAGE_MODELS, Pipeline, bind
from orchestrator.storage import Storage, join
from strategies import BoundStrategy, train_domains_of

__all__ = ["Domain", "InputFormat", "Resources", "StageData", "StagePlan", "StageSpec", "bind", "check_stream",
           "check_workers", "validate_shards"]


@dataclass(frozen=True)
class Domain:
    """A resolved domain: its name, shard URI and manifest (see ``orchestrator/shards.py``)."""

    name: str
    uri: str
    manifest: Mapping[str, Any]

    def train_inputs(self) -> dict[str, Any]:
        """This domain's training split as a lineage input: ``{"domain", "uri", "manifest_digest", "split",
        "digest", "shards"}`` (the manifest's domain and split digests, each shard's path, sha256 and rows)."""
        train = self.manifest["splits"]["train"]
        return {"domain": self.name, "uri": self.uri, "manifest_digest": self.manifest.get("digest", ""),
                "split": "train", "digest": train["digest"],
                "shards": [{key: s[key] for key in ("path", "sha256", "rows")} for s in train["shards"]]}


def check_stream(domains: Sequence[Domain], pipeline: Pipeline) -> None:
    """What the run would otherwise hit later, from the manifests alone (no shard is read): one schema across the
    stream (the feature column, dtype, input shape and scale, the label column and dtype of domain 0), and no empty
    training split or, when the run evaluates, empty evaluation split.

    Raises:
        ShardError: naming the domain, the manifest field and both values.
    """
    first = domains[0]
    for d in domains:
        splits = d.manifest["splits"]
        if splits["train"]["rows"] == 0:
            raise ShardError(f"domain '{d.name}' ({d.uri}): its train split is empty")
        split = pipeline.evaluation.split
        if pipeline.evaluation.enabled and splits.get(split, {}).get("rows", 0) == 0:
            raise ShardError(f"domain '{d.name}' ({d.uri}): its {split} split, which evaluation.split scores, is "
                             f"empty")
        for part, key in (("features", "column"), ("features", "dtype"), ("features", "shape"),
                          ("features", "scale"), ("label", "column"), ("label", "dtype"), ("text", "vocab_size"),
                          ("text", "tokenizer"), ("text", "eos"), ("text", "context")):
            mine, theirs = (m["schema"].get(part) or {} for m in (d.manifest, first.manifest))
            mine, theirs = mine.get(key), theirs.get(key)
            if mine != theirs:
                raise ShardError(f"domain '{d.name}' ({d.uri}): schema.{part}.{key} is {mine!r}, domain "
                                 f"'{first.name}' has {theirs!r}; every domain of a stream needs one schema")
    check_model(first, pipeline)


def check_model(first: Domain, pipeline: Pipeline) -> None:
    """Refuse a model that cannot read the stream's shards: a classifier (``mlp``, ``cnn``) on text domains, a
    language model on classification domains, a strategy that does not work on language models (``supports_text``)
    on text domains, or a ``gpt`` whose ``context`` is shorter than the shards' blocks.

    Raises:
        ShardError: naming ``model.name`` (or ``model.context``) and the domain.
    """
    text, name = first.manifest["schema"].get("text"), pipeline.model.name
    where = f"domain '{first.name}' ({first.uri})"
    if text is None and name in LANGUAGE_MODELS:
        raise ShardError(f"model.name {name} is a language model, but {where} holds classification shards (a label "
                         f"column); use mlp, cnn or your own model")
    if text is not None and name in ("mlp", "cnn"):
        raise ShardError(f"model.name {name} is a classifier, but {where} holds text (token blocks); use gpt or hf")
    if text is not None:
        for i, b in enumerate(bind(pipeline)):
            if not b.cls.supports_text:
                raise ShardError(f"strategy.{i}: '{b.name}' does not work on language models, and {where} holds "
                                 f"text")
    context = pipeline.model.context
    if text is not None and name == "gpt" and context is not None and context < text["context"]:
        raise ShardError(f"model.context {context} is shorter than the blocks of {where} ({text['context']} "
                         f"tokens); raise it or rebuild the shards with a smaller source.context")


def validate_shards(domains: Sequence[Domain], storage: Storage) -> None:
    """The ``validate`` node: re-hash every shard and check every split's labels against the label set (a run
    does it on the driver while the workers boot and stream stage 0; ``lifelong validate`` does it alone).

    Raises:
        ShardError: at the first fault, naming the domain and the shard.
    """
    validate_domains([(d.name, d.uri, d.manifest) for d in domains], storage)


@dataclass(frozen=True)
class Resources:
    """What one stage's worker group reserves: ``num_workers`` actors of ``cpus_per_worker`` CPUs (fractional
    allowed), one GPU each when ``use_gpu`` and the ``custom`` Ray resources (``(name, amount)`` pairs, from
    ``training.resources``); ``threads`` is each worker's torch intra-op thread count."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    threads: int
    custom: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class InputFormat:
    """How shard rows become model inputs: ``[*shape]`` features of ``dtype`` in column ``features`` times ``scale``,
    and integer labels in column ``label``; or, for text domains (``vocab_size`` > 0, no label column), blocks of
    ``shape = (context + 1,)`` token ids, whose first ``context`` are the input and last ``context`` the targets."""

    shape: tuple[int, ...]
    scale: float
    features: str
    label: str | None
    dtype: str = "uint8"
    vocab_size: int = 0

    @property
    def text(self) -> bool:
        """True for text domains (language modelling)."""
        return self.vocab_size > 0

    @property
    def columns(self) -> tuple[str, ...]:
        """The shard columns a batch is made of."""
        return (self.features,) + ((self.label,) if self.label else ())


@dataclass(frozen=True)
class StageData:
    """What a worker needs to stream stage ``task_id``'s training data (no parent checkpoint needed).

    Attributes:
        task_id: the stage. train_domains: indices of the domains it streams (its own; 0..k for joint).
        files: its shard files, in stream order. storage: how to reach them.
        layout: the head layout (maps raw labels to output units). input: the shards' input format.
        batch_size: samples per worker step. shuffle: ``files | local | full``. shuffle_rows: rows in the local
            shuffle buffer (0: none). cache_bytes: a worker keeps its part in memory up to this many bytes.
        seed: the pipeline seed. pin_memory: on a GPU, build batches in page-locked memory (``training.pin_memory``).
    """

    task_id: int
    train_domains: tuple[int, ...]
    files: tuple[ShardFile, ...]
    storage: Storage
    layout: HeadLayout
    input: InputFormat
    batch_size: int
    shuffle: str
    shuffle_rows: int
    cache_bytes: int
    seed: int
    pin_memory: bool = False

    def shard(self, rank: int, world: int) -> WorkerShard:
        """Worker ``rank`` of ``world``'s part of the stage's training data (see ``orchestrator/ingest.py``)."""
        full = self.seed * 1000 + self.task_id if self.shuffle == "full" else None
        return WorkerShard(self.files, self.input.columns, self.storage, rank, world, full)


@dataclass(frozen=True)
class StageSpec:
    """One stage, as the driver sends it to every worker.

    Attributes:
        data: the stage's data description. domain: its domain's name. pipeline: the validated pipeline.
        strategies: the bound strategies, in hook order. parent: the checkpoint the stage starts from (path/URI).
        checkpoint_uri: where rank 0 writes the stage's checkpoint. state_uri: the stage's folder for strategy state
            too large for the checkpoint (Parquet buffers). lineage: the record its checkpoint carries.
        storage: how to reach the URIs. resources: the worker group's. train_rows: rows per epoch, all workers.
    """

    data: StageData
    domain: str
    pipeline: Pipeline
    strategies: tuple[BoundStrategy, ...]
    parent: str
    checkpoint_uri: str
    state_uri: str
    lineage: Mapping[str, Any]
    storage: Storage
    resources: Resources
    train_rows: int

    @property
    def task_id(self) -> int:
        """The stage's index (its domain's position in the stream)."""
        return self.data.task_id


@dataclass(frozen=True)
class StagePlan:
    """What every stage of one run shares.

    Attributes:
        pipeline, domains, storage: the validated spec, its resolved domains and the storage they live on.
        strategies: the bound strategies. layout: the head layout. input: the shards' input format.
        resources: the worker group's resources. root: where the run's checkpoints and state go (path or URI).
        stage_domains: for each stage k, the indices of the domains it streams (only k, except for strategies such
            as joint), asked of the strategies once.
    """

    pipeline: Pipeline
    domains: tuple[Domain, ...]
    storage: Storage
    strategies: tuple[BoundStrategy, ...]
    layout: HeadLayout
    input: InputFormat
    resources: Resources
    root: str
    stage_domains: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, pipeline: Pipeline, domains: list[Domain], storage: Storage, strategies: tuple[BoundStrategy, ...],
              resources: Resources, root: str) -> StagePlan:
        """Build the plan from domains that :func:`check_stream` has accepted (``dag.prepare_domains`` checks
        them)."""
        first = domains[0].manifest["schema"]
        features, text = first["features"], first.get("text")
        if text is not None:
            layout = HeadLayout.language(int(text["vocab_size"]), len(domains))
        else:
            layout = HeadLayout.build(pipeline.scenario, [list(d.manifest["label_set"]) for d in domains])
        form = InputFormat(tuple(features["shape"]), float(features["scale"]), features["column"],
                           first["label"]["column"] if text is None else None, features["dtype"],
                           int(text["vocab_size"]) if text is not None else 0)
        instances = [b.build() for b in strategies]
        stage_domains = tuple(tuple(train_domains_of(instances, k)) for k in range(len(domains)))
        return cls(pipeline, tuple(domains), storage, strategies, layout, form, resources, root, stage_domains)

    @property
    def num_stages(self) -> int:
        """T, the number of domains."""
        return len(self.domains)

    def train_domains(self, k: int) -> list[int]:
        """Indices of the domains stage k trains on (only k, except for strategies such as joint)."""
        return list(self.stage_domains[k])

    def train_rows(self, k: int) -> int:
        """Training rows stage k streams per epoch (all workers together)."""
        return sum(self.domains[j].manifest["splits"]["train"]["rows"] for j in self.train_domains(k))

    def planned_steps(self, k: int) -> int:
        """Optimizer steps stage k plans on each worker (epochs x steps per epoch; strategies may add epochs)."""
        t = self.pipeline.training
        return math.ceil(self.train_rows(k) / self.resources.num_workers / t.batch_size) * t.epochs

    def data(self, k: int) -> StageData:
        """Stage k's data description."""
        t = self.pipeline.training
        domains = tuple(self.train_domains(k))
        # A stage that streams several domains (joint) gets a proportionally larger shuffle buffer, so that its
        # batches mix the domains instead of following the order in which their shards are read.
        rows = t.shuffle_buffer * len(domains) if t.shuffle == "local" else 0
        files = stage_files([(d.uri, d.manifest) for d in self.domains], domains, t.shuffle,
                            self.pipeline.seed * 1000 + k)
        return StageData(k, domains, files, self.storage, self.layout, self.input, t.batch_size, t.shuffle, rows,
                         int(t.cache_mb * 2**20), self.pipeline.seed, t.pin_memory)

    def stage(self, k: int, parent: str, parent_lineage: Mapping[str, Any], run_id: str,
              code: Mapping[str, str]) -> StageSpec:
        """Stage k's description, starting from ``parent`` (whose ``lineage.json`` is ``parent_lineage``)."""
        inputs = [self.domains[j].train_inputs() for j in self.train_domains(k)]
        domain = self.domains[k].name
        lineage = lineage_record(self.pipeline.name, run_id, k, domain, parent, dict(parent_lineage), inputs,
                                self.pipeline.spec_hash(), dict(code))
        return StageSpec(self.data(k), domain, self.pipeline, self.strategies, parent,
                         join(self.root, f"stage-{k}", "checkpoint"), join(self.root, "state", f"stage-{k}"), lineage,
                         self.storage, self.resources, self.train_rows(k))


def check_workers(resources: Resources, cluster: Mapping[str, float], pipeline: Pipeline) -> None:
    """Refuse a worker group and evaluation actors that together reserve more CPUs, GPUs or of a custom resource
    than the cluster has (``cluster``: ``ray.cluster_resources()``): Ray would wait for them forever and the run
    would hang.

    Raises:
        LifelongError: naming the fields to change and what the cluster has.
    """
    e = pipeline.evaluation
    for role, count, wanted in (("training", resources.num_workers, dict(resources.custom)),
                                ("evaluation", e.num_actors if e.enabled else 0, e.resources)):
        for name, amount in wanted.items():
            if count * amount > cluster.get(name, 0.0) + 1e-9:
                have = ", ".join(sorted(k for k in cluster if not k.startswith("node:"))) or "none"
                raise LifelongError(f"{role}.resources.{name}: {count} x {amount:g} needed, this Ray cluster has "
                                    f"{cluster.get(name, 0.0):g} (its resources: {have}); the run would wait forever")
    gpus = (resources.num_workers if resources.use_gpu else 0) + (e.num_actors * e.gpus_per_actor if e.enabled else 0)
    if gpus > cluster.get("GPU", 0.0) + 1e-9:
        raise LifelongError(f"training.use_gpu (one GPU per worker) and evaluation.gpus_per_actor reserve {gpus:g} "
                            f"GPUs, this Ray cluster has {cluster.get('GPU', 0.0):g}; the run would wait forever")
    cluster_cpus = cluster.get("CPU", 0.0)
    workers = resources.num_workers * resources.cpus_per_worker
    reserved = workers + (e.num_actors * e.cpus_per_actor if e.enabled else 0.0)
    if reserved > cluster_cpus:
        raise LifelongError(f"training.num_workers x training.cpus_per_worker + evaluation.num_actors x "
                            f"evaluation.cpus_per_actor = {reserved:g} CPUs, more than this Ray cluster's "
                            f"{cluster_cpus:g}; the run would wait for them forever. Lower training.cpus_per_worker "
                            f"or evaluation.cpus_per_actor")
