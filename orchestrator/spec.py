"""The pipeline spec: pydantic v2 models loaded from YAML, with unknown keys rejected.

A pipeline names an ordered list of domains (Parquet shards under a URI, optionally with the raw ``source`` they are
built from), a model, one or more CL strategies, and the training, evaluation, tracking and storage settings.
``load_pipeline`` reads the YAML, applies ``--set dotted.key=value`` overrides, and validates; every problem is
reported with its field path (see :class:`orchestrator.errors.SpecError`).

This module imports neither torch nor the strategies: a strategy's parameters are kept as written here and checked
against the strategy's own ``Config`` after parsing, once per run (:func:`bind`, which imports them only then).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, SecretStr, ValidationError,
                      field_validator, model_validator)

from orchestrator.errors import SpecError
from orchestrator.redact import MASK, is_secret_key, redact_uri

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A URI that may carry a password (``http://user:PASSWORD@host``): its JSON dump (run records, MLflow params, the
# spec hash) never does.
UriField = Annotated[str, PlainSerializer(redact_uri, return_type=str, when_used="json")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FILE_KINDS = ("csv", "jsonl", "parquet", "text_files")
"""Source kinds read from the user's own files: tables (text or classification) and text files."""


class SourceSpec(_Strict):
    """Where a domain's shards are built from when they are missing.

    ``kind`` is the raw dataset; ``path`` is its folder, relative to the data root (``--data-root``,
    ``LIFELONG_DATA_ROOT``, or ``../shared/data`` beside the checkout) unless absolute. ``classes`` keeps only these
    labels (split by classes); ``permutation_seed`` permutes the input features with a seeded permutation (permuted
    inputs).

    ``idx`` is the user's own IDX files (``idx: {train: [images, labels], test: [...]}``, test optional).
    ``image_folder`` is the user's own images: one sub-folder per class under ``path`` (the labels are the sorted
    folder names' indices; ``classes`` may name folders), or ``path/train/<class>/`` and ``path/test/<class>/`` when
    the user has split them. PNG, JPEG, BMP, GIF and WebP files are decoded with Pillow, converted to ``channels``
    (1: grey, 3: RGB) and resized to ``image_size`` (default: the first image's size).

    Text domains (language modelling, ``orchestrator/text.py``): ``csv``, ``jsonl`` and ``parquet`` read one document
    per row from ``text_columns`` of a file or a folder of files, keeping the rows that ``where`` selects (one table
    cut into domains by a column's values); ``text_files`` reads one document per ``.txt`` file (a file, or a folder
    searched recursively). Documents are tokenised by ``tokenizer`` and packed into blocks of ``context + 1`` ids.
    The same tables with ``feature_columns`` and ``label_column`` instead are classification domains
    (``orchestrator/tables.py``), cut by ``where`` or ``classes``.
    """

    kind: Literal["mnist", "fashion_mnist", "sklearn_digits", "image_folder", "idx", "csv", "jsonl", "parquet",
                  "text_files"]
    path: str | None = None
    classes: list[int | str] | None = None
    permutation_seed: int | None = None
    max_rows: int | None = Field(None, ge=1, description="keep the first N rows of each raw split after the class "
                                 "filter (small subsets for tests and dry runs)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="image_folder without train/ and test/ "
                                 "sub-folders, idx without a test split: the seeded share held out as test")
    idx: dict[Literal["train", "test"], tuple[str, str]] | None = Field(
        None, description="kind idx: [images file, labels file] of each split the user has (train at least), "
        "relative to path; gzipped or not")
    image_size: tuple[int, int] | None = Field(None, description="image_folder: [height, width] every image is "
                                               "resized to; default the first image's size")
    channels: Literal[1, 3] = Field(1, description="image_folder: 1 (grey) or 3 (RGB)")
    text_columns: list[str] | None = Field(None, min_length=1, description="csv, jsonl, parquet: the columns that "
                                           "hold each document's text (joined with a newline), for a text domain")
    feature_columns: list[str] | None = Field(None, min_length=1, description="csv, jsonl, parquet: the numeric "
                                              "columns that are a classification domain's input features")
    label_column: str | None = Field(None, min_length=1, description="csv, jsonl, parquet: the column of class "
                                     "labels (integers, or names: sorted, name i is label i)")
    columns: list[str] | None = Field(None, min_length=1, description="csv without a header row: the names of its "
                                      "columns")
    where: dict[str, Any] | None = Field(None, description="csv, jsonl, parquet: keep the rows whose column holds "
                                         "this value (or one of this list), e.g. {topic: sports}")
    test_path: str | None = Field(None, description="csv, jsonl, parquet, text_files: the user's own test file or "
                                  "folder (else test_fraction of the rows or documents is held out)")
    tokenizer: str = Field("bytes", min_length=1, description="text: 'bytes' (UTF-8 bytes, nothing to download) or "
                           "the local path of a tokenizers tokenizer.json (or its folder)")
    context: int = Field(128, ge=1, description="text: tokens the model reads per block (blocks hold context + 1)")
    rows_per_shard: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _path_needed(self) -> SourceSpec:
        files = self.kind in FILE_KINDS
        if self.kind not in ("sklearn_digits",) and not self.path:
            what = {"image_folder": "image folder", "idx": "IDX files"}.get(self.kind, "files")
            raise ValueError(f"source kind '{self.kind}' needs a 'path' to its {what}")
        tabular = self.kind in ("csv", "jsonl", "parquet")
        classify = self.feature_columns is not None or self.label_column is not None
        if tabular and (self.text_columns is None) == (not classify):
            raise ValueError(f"source kind '{self.kind}' needs either text_columns (a text domain) or "
                             f"feature_columns and label_column (classification), not both")
        if tabular and classify and (self.feature_columns is None or self.label_column is None):
            raise ValueError("feature_columns and label_column: a classification table needs both")
        wrong = [f for f in ("text_columns", "feature_columns", "label_column", "columns", "where", "test_path")
                 if getattr(self, f) is not None and not (tabular or (files and f == "test_path"))]
        if wrong or (self.columns is not None and self.kind != "csv"):
            raise ValueError(f"{(wrong or ['columns'])[0]}: not a field of source kind '{self.kind}'")
        if (self.kind == "idx") != (self.idx is not None) or (self.idx is not None and "train" not in self.idx):
            raise ValueError("idx: source kind 'idx' needs idx: {train: [images, labels]} (test optional), and "
                             "only it takes idx")
        if self.kind != "image_folder" and self.label_column is None and any(isinstance(c, str)
                                                                             for c in self.classes or []):
            raise ValueError(f"classes: source kind '{self.kind}' has integer labels; only image_folder and tables "
                             f"take class names")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"image_size: {list(self.image_size)}: both sides must be >= 1")
        return self


class DomainSpec(_Strict):
    """One step of the continual stream: shards under ``uri`` (``<uri>/manifest.json``, ``<uri>/<split>/*.parquet``).

    ``uri`` defaults to ``<storage.shards>/<pipeline name>/<domain name>``.
    """

    name: str = Field(pattern=_NAME)
    uri: str | None = None
    source: SourceSpec | None = None


class HFSpec(_Strict):
    """A Hugging Face ``transformers`` causal LM (``model.name: hf``): exactly one of ``config`` (a config dict,
    ``model_type`` naming the architecture, default gpt2; random weights) or ``path`` (a local folder to load;
    nothing is downloaded)."""

    config: dict[str, Any] | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one(self) -> HFSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of config or path")
        return self


LANGUAGE_MODELS = ("gpt", "hf")
BUILT_IN_MODELS = ("mlp", "cnn", *LANGUAGE_MODELS)  # any other model.name is a package.module:factory


class ModelSpec(_Strict):
    """The model: built-in ``mlp`` or ``cnn`` (classification), ``gpt`` or ``hf`` (language models, for text
    domains), or a user factory ``package.module:factory``.

    A user factory is called as ``factory(input_shape=(C, H, W) or (D,), num_outputs=int, **params)`` and must
    return an ``nn.Module`` mapping ``[B, *input_shape]`` float inputs to ``[B, num_outputs]`` logits (or, for text
    domains, ``[B, L]`` token ids to ``[B, L, num_outputs]`` logits; ``input_shape`` is then ``(context + 1,)``).
    """

    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [400, 400])
    channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers: int = Field(2, ge=1, description="gpt: transformer blocks")
    heads: int = Field(4, ge=1, description="gpt: attention heads per block")
    width: int = Field(128, ge=1, description="gpt: model width (a multiple of heads)")
    context: int | None = Field(None, ge=1, description="gpt: longest sequence; default the shards' context")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="gpt: dropout")
    hf: HFSpec | None = Field(None, description="hf: the transformers model to build or load")
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BUILT_IN_MODELS and not re.match(r"^[\w.]+:\w+$", v):
            raise ValueError(f"unknown model '{v}': use 'mlp', 'cnn', 'gpt', 'hf' or an import path "
                             f"'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _fits(self) -> ModelSpec:
        if (self.name == "hf") != (self.hf is not None):
            raise ValueError("hf: model.name hf needs hf: {config: ...} or {path: ...}, and only it takes hf")
        if self.name == "gpt" and self.width % self.heads:
            raise ValueError(f"width: {self.width} is not a multiple of heads ({self.heads})")
        return self


class StrategySpec(BaseModel):
    """One CL strategy: ``name`` (registry key or ``package.module:Class``) plus that strategy's own parameters,
    which are checked against the strategy's ``Config`` after parsing (:func:`bind`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)

    def params(self) -> dict[str, Any]:
        """The strategy's parameters (everything but ``name``)."""
        return dict(self.model_extra or {})


class OptimizerSpec(_Strict):
    """Optimizer settings; a fresh optimizer is built at the start of every stage."""

    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)


class ScheduleSpec(_Strict):
    """``training.lr_schedule``: the learning rate across each stage's steps, as a factor on ``optimizer.lr``
    (``orchestrator/schedules.py``): ``constant``; ``cosine`` (re-warm and re-decay at every domain); or ``infinite``
    (warm-up and cool-down once, a constant rate across domains, annealing at the end of each stage), both from
    Ibrahim et al., TMLR 2024."""

    name: Literal["constant", "cosine", "infinite"] = "constant"
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of a stage's steps (cosine: every "
                                   "stage; infinite: stage 0) spent warming up")
    min_ratio: float = Field(0.1, gt=0.0, le=1.0, description="the lowest rate, as a share of optimizer.lr (end of "
                             "the cosine decay; end of infinite's annealing)")
    cooldown_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="infinite: share of stage 0's steps spent "
                                     "cooling down to constant_ratio")
    constant_ratio: float = Field(0.5, gt=0.0, le=1.0, description="infinite: the constant rate, as a share of "
                                  "optimizer.lr")
    anneal_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="infinite: share of each stage's steps spent "
                                   "annealing before its checkpoint")

    @model_validator(mode="after")
    def _phases_fit(self) -> ScheduleSpec:
        if self.name == "infinite":
            if self.warmup_fraction + self.cooldown_fraction + self.anneal_fraction > 1.0:
                raise ValueError("warmup_fraction + cooldown_fraction + anneal_fraction exceed 1 (one stage)")
            if self.min_ratio > self.constant_ratio:
                raise ValueError(f"min_ratio {self.min_ratio} is above constant_ratio {self.constant_ratio}")
        return self


def _positive_resources(resources: dict[str, float]) -> dict[str, float]:
    """Check custom Ray resources: names other than Ray's own (CPU, GPU, memory) and amounts > 0.

    Raises:
        ValueError: naming the bad entry.
    """
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name}: set it with the role's own field (cpus_per_worker, use_gpu), not resources")
        if not amount > 0:
            raise ValueError(f"{name}: the amount must be > 0, got {amount}")
    return resources


CustomResources = Annotated[dict[str, float], AfterValidator(_positive_resources)]
"""Custom Ray resources of one role (training workers, evaluation actors): ``{name: amount > 0}``, Ray's own (CPU,
GPU, memory) excluded."""


class TrainingSpec(_Strict):
    """Per-stage training settings. ``batch_size`` counts new-domain samples per worker step."""

    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = Field(False, description="one GPU per worker (the NCCL backend with several workers)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the forward pass and the loss run under bfloat16 autocast (weights, gradients "
        "and the optimizer stay float32); on CPUs too, where it is mostly slower")
    pin_memory: bool = Field(True, description="on a GPU, build batches in page-locked memory and copy them to the "
                             "device asynchronously")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (Ray scheduling; the torch "
                                   "threads are threads_per_worker)")
    shuffle: Literal["files", "local", "full"] = Field(
        "local", description="files: shard files in random order; local: plus a per-worker shuffle buffer; "
        "full: a global shuffle of all rows (a full extra pass)")
    shuffle_buffer: int = Field(8192, ge=1, description="rows in each worker's local shuffle buffer (shuffle: local)")
    cache_mb: float = Field(1024.0, ge=0, description="a worker keeps its part of the stage's data in memory after "
                            "the first epoch when it takes at most this many MB (float32 features), and later epochs "
                            "re-shuffle it there; 0 streams every epoch from the shards")
    executor: Literal["group", "ray_train"] = Field(
        "group", description="group: one persistent worker group per pipeline (workers started once, a checkpoint "
        "per stage); ray_train: one Ray Train fit for the whole pipeline, each stage reported with its checkpoint "
        "(Ray Train's placement and FailureConfig; about 16 s of start-up once, on 2 cores)")
    threads_per_worker: int | None = Field(None, ge=1, description="torch intra-op threads per worker; default: the "
                                           "cluster's CPUs divided by num_workers")
    max_failures: int = Field(0, ge=0, description="restarts of a stage from its parent checkpoint after a worker "
                              "process dies")
    progress_every: int = Field(20, ge=1, description="report progress every N steps")
    checkpoint_every_n_steps: int | None = Field(
        None, ge=1, description="also checkpoint inside a stage every N optimizer steps (model, optimizer and strategy "
        "state, under the stage's folder): a stage restarted after a worker died (training.max_failures), or resumed "
        "after the driver did (lifelong resume), continues from the newest one instead of its parent; None: only "
        "at the end of each stage")
    on_nonfinite: Literal["error", "skip_batch"] = Field(
        "error", description="a NaN or infinite loss: error stops the run naming the domain, epoch and step; "
        "skip_batch skips that batch (no backward pass, no optimizer step; with several workers all of them skip "
        "it) and counts it in the report, and fails the stage only when every batch of an epoch is skipped")
    resources: CustomResources = Field(default_factory=dict, description="custom Ray resources each worker "
                                        "reserves besides its CPUs and GPU, e.g. {node_a: 0.01} to place the "
                                        "workers on the nodes that carry node_a")


class EvaluationSpec(_Strict):
    """Evaluation actors: each fills cells R[i][j] of the accuracy matrix beside training."""

    enabled: bool = Field(True, description="false: a training-only run, with no accuracy matrix or CL metrics")
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.25, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0, le=1, description="GPU share of each evaluation actor (e.g. 0.25: four "
                                  "actors on one GPU); 0 scores on CPU")
    batch_size: int = Field(2048, ge=1)
    split: Literal["test", "val"] = "test"
    max_lag: int | None = Field(None, ge=0, description="stages training may run ahead of the evaluation: stage k "
                                "starts once rows up to k - 1 - max_lag of R are complete; None: no limit. "
                                "`lifelong tune` trials use 0, so that a trial its scheduler stops trains no "
                                "further stage")
    every_n_steps: int | None = Field(None, ge=1, description="continual evaluation: every N training steps, the "
                                      "model in training is scored on a fixed subsample of every domain seen so far, "
                                      "by the evaluation actors, without stalling training (the stability gap)")
    subsample: int = Field(1000, ge=1, description="continual evaluation: samples per domain (a fixed, seeded "
                           "subset of its evaluation split)")
    window_steps: int = Field(100, ge=1, description="continual evaluation: window of the windowed forgetting, in "
                              "training steps")
    max_actor_restarts: int = Field(3, ge=0, description="evaluation actors that may die (process killed, node "
                                    "lost) and be replaced during a run; the cells they were computing are sent to "
                                    "the new actor")
    max_queued_snapshots: int = Field(32, ge=1, description="continual evaluation: snapshots waiting for an actor "
                                      "at most (each holds a copy of the weights in Ray's object store); beyond it a "
                                      "snapshot is dropped and counted in the report, so training never waits")
    resources: CustomResources = Field(default_factory=dict, description="custom Ray resources each evaluation "
                                        "actor reserves besides its CPUs, e.g. {node_b: 0.01}")


class TrackingSpec(_Strict):
    """MLflow tracking. ``uri`` defaults to ``sqlite:///<absolute workdir>/mlflow.db``; each committed stage becomes
    a version of the registered model ``registered_model`` (default: the pipeline's name)."""

    uri: UriField | None = None
    experiment: str | None = None
    registered_model: str | None = Field(None, min_length=1, max_length=200,
                                         description="registered model that each stage's model is a version of")


class S3Spec(_Strict):
    """S3(-compatible) settings; each unset field falls back to the standard AWS environment (``AWS_ENDPOINT_URL``,
    ``AWS_REGION``, ``AWS_PROFILE``, the default credential chain). Secrets are never logged."""

    endpoint_url: UriField | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    retry_seconds: float = Field(60.0, ge=0, description="how long a read or write of object storage is retried "
                                 "(exponential backoff) while the endpoint cannot be reached, before the run fails "
                                 "naming it; lifelong resume continues such a run")


class StorageSpec(_Strict):
    """Where runs and shards are written. Relative paths are taken from the current folder.

    ``root`` holds each run's checkpoints, strategy state and Parquet buffers under ``<root>/<pipeline>/<run_id>/``
    (default: the run folder under ``--workdir``); a URI such as ``s3://bucket/prefix`` puts them on shared storage,
    where every node can read them. The run folder itself (report, event log) stays under ``--workdir``."""

    root: str | None = None
    shards: str | None = None
    s3: S3Spec = Field(default_factory=S3Spec)


DIMENSION_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class Dimension(_Strict):
    """One dimension of a search space: exactly one of ``choice`` (sampled), ``grid`` (every value, in every
    sample), ``uniform`` / ``loguniform`` (``[low, high]`` floats) or ``randint`` (``[low, high)`` integers), as in
    Ray Tune's ``tune.choice``, ``grid_search``, ``uniform``, ``loguniform`` and ``randint``."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        kinds = [k for k in DIMENSION_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform, randint"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        kind = kinds[0]
        if kind in ("choice", "grid") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind} needs low < high, got [{low}, {high}]")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs bounds > 0, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        """``choice``, ``grid``, ``uniform``, ``loguniform`` or ``randint``."""
        return next(k for k in DIMENSION_KINDS if getattr(self, k) is not None)

    def grid_values(self, search: str) -> list[Any] | None:
        """The values a search enumerates in every sample: a ``grid``, or a ``choice`` under ``search: grid``; None
        for a dimension that is sampled."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None and search == "grid":
            return list(self.choice)
        return None

    def probe_values(self) -> list[Any]:
        """The values that bound what this dimension can sample: every listed value, or both ends of a range (the
        largest integer of ``randint``); checked against the pipeline before any trial starts."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice if self.choice is not None else self.grid or [])
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.uniform or self.loguniform or ())


class AshaSpec(_Strict):
    """Asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning")
    with *domains finished* as its time axis: at each rung, a trial whose objective is below the
    ``1 - 1/reduction_factor`` quantile of the trials that reached the rung stops."""

    enabled: bool = True
    grace_period: int = Field(2, ge=1, description="domains every trial finishes before it can be stopped; 2 "
                              "makes the first cut where forgetting can first show (after domain 1, every trial "
                              "has only learnt one domain)")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep about 1/reduction_factor of trials per rung")


class TuneSpec(_Strict):
    """The ``tune:`` section: a search over whole pipelines with Ray Tune (``lifelong tune``).

    ``space`` is keyed by the dotted paths of ``--set`` (``strategy.ratio``, ``strategy.0.buffer_size``,
    ``training.optimizer.lr``). Every trial runs the whole pipeline, evaluated on each domain's ``val`` split,
    and reports after each domain; the objective is ``acc`` (mean val accuracy over the domains seen so far) or
    ``acc_minus_forgetting`` (that minus ``forgetting_weight`` times the mean forgetting over them).
    """

    space: dict[str, Dimension] = Field(min_length=1)
    num_samples: int = Field(8, ge=1, description="samples of the space (each covers every grid combination)")
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.25, gt=0, description="CPUs reserved for a trial's own driver, beside its "
                              "training workers and evaluation actors")
    metric: Literal["acc", "acc_minus_forgetting"] = "acc"
    forgetting_weight: float = Field(1.0, ge=0.0, description="lambda of acc_minus_forgetting")
    search: Literal["random", "grid", "optuna"] = Field(
        "random", description="random: Ray Tune's variant generator (grid dimensions enumerated, the others "
        "sampled); grid: every dimension must be a choice or grid, all combinations run; optuna: TPE through "
        "Ray Tune's OptunaSearch (pip install 'lifelong[optuna]')")
    seed: int | None = Field(None, description="seed of the search; default: the pipeline's seed")
    asha: AshaSpec = Field(default_factory=AshaSpec)

    @model_validator(mode="after")
    def _search_fits_space(self) -> TuneSpec:
        kinds = {key: d.kind for key, d in self.space.items()}
        if self.search == "grid":
            bad = [k for k, kind in kinds.items() if kind not in ("choice", "grid")]
            if bad:
                raise ValueError(f"search: grid needs finite dimensions (choice or grid); {', '.join(bad)} is not")
        if self.search == "optuna":
            bad = [k for k, kind in kinds.items() if kind == "grid"]
            if bad:
                raise ValueError(f"search: optuna does not take grid dimensions ({', '.join(bad)}); use choice")
        return self


class Pipeline(_Strict):
    """A continual-training pipeline: domains in order, a model, strategies, and run settings.

    Raises:
        pydantic.ValidationError: on any invalid field (``load_pipeline`` turns it into a :class:`SpecError`).
    """

    name: str = Field(pattern=_NAME)
    seed: int = 0
    scenario: Literal["class_il", "task_il", "domain_il"] = "class_il"
    domains: list[DomainSpec] = Field(min_length=1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    strategy: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec(name="finetune")])
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tune: TuneSpec | None = Field(None, description="the search that `lifelong tune` runs; `lifelong run` ignores it")

    @field_validator("strategy", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"name": v}]
        if isinstance(v, dict):
            return [v]
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @field_validator("domains")
    @classmethod
    def _unique(cls, v: list[DomainSpec]) -> list[DomainSpec]:
        names = [d.name for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain names must be unique; repeated: {', '.join(dup)}")
        return v

    def spec_hash(self) -> str:
        """sha256 (hex, 64 chars) of the canonical JSON of the validated spec."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def strategy_label(self) -> str:
        """The strategies joined with ``+``, e.g. ``replay+ewc``."""
        return "+".join(s.name for s in self.strategy)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (torchtune/Hydra style) to a raw spec dict, in place.

    Values are parsed as YAML, so ``3``, ``1e-3``, ``true``, ``[1, 2]`` and ``{name: replay}`` get their types.
    Integer path parts index into lists (``domains.0.uri=...``).

    Raises:
        SpecError: for an override without ``=``, a value that is not valid YAML, or a path through a non-container.
    """
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", [(item, "expected dotted.key=value")])
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise SpecError("--set", [(key.strip(), f"value {text!r} is not valid YAML ({problem})")]) from None
        set_value(raw, key.strip(), value, "--set")
    return raw


def set_value(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set the field at dotted path ``key`` of a raw spec dict to ``value``, in place (the rules of ``--set``:
    integer parts index lists; ``strategy.<field>`` addresses a single strategy).

    Raises:
        SpecError: ``<source>: <key>: ...`` for a path through a non-container or past the end of a list.
    """
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(source, [(key, f"'{part}' is not an index of a list of {len(node)}")])
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part == "strategy" and isinstance(node.get(part), list) and len(node[part]) == 1 \
                        and not parts[i + 1].isdigit():
                    node[part] = node[part][0]  # strategy.name=... addresses the single strategy
                node = node.setdefault(part, {})
        else:
            raise SpecError(source, [(key, f"'{'.'.join(parts[:i])}' is not a mapping")])


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def validate_raw(raw: Any, source: str) -> Pipeline:
    """Validate a raw spec dict.

    Raises:
        SpecError: listing every problem with its field path.
    """
    if not isinstance(raw, dict):
        raise SpecError(source, [("", f"expected a YAML mapping at the top level, got {type(raw).__name__}")])
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append((_format_loc(err["loc"]), msg))
        raise SpecError(source, problems) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a pipeline YAML file into a dict.

    Raises:
        SpecError: when the file is missing or is not valid YAML (with the line and column).
    """
    return parse_yaml(read_spec_file(path), str(path))


def read_spec_file(path: str | Path) -> str:
    """The text of a pipeline YAML file.

    Raises:
        SpecError: when the file cannot be read (naming it).
    """
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SpecError(str(path), [("", f"cannot read file: {e.strerror}")]) from None


def parse_yaml(text: str, source: str) -> Any:
    """Parse a pipeline's YAML text (``{}`` for an empty document).

    Raises:
        SpecError: ``<source>: malformed YAML: line L, column C: <problem>``.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, [("", f"malformed YAML: {where}{problem}")]) from None
    return raw if raw is not None else {}


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Load, override and validate a pipeline YAML.

    Raises:
        SpecError: malformed YAML, bad override, or any invalid field (all problems, with field paths).
    """
    raw = read_yaml(path)
    if isinstance(raw, dict):
        apply_overrides(raw, overrides or [])
    return validate_raw(raw, str(path))


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested spec into ``{"a.b.c": "value"}`` strings for MLflow params: secret-named fields are ``***``,
    URIs lose their password (:mod:`orchestrator.redact`)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        key = prefix.rstrip(".")
        if d is not None and is_secret_key(key):
            out[key] = MASK
        else:
            out[key] = redact_uri(json.dumps(d) if isinstance(d, list) else str(d))
    return out


def bind(pipeline: Pipeline, source: str = "pipeline") -> tuple[Any, ...]:
    """The pipeline's strategies, resolved and with their parameters validated against each strategy's ``Config``:
    ``strategies.BoundStrategy`` objects, in hook order. Called once per run, after parsing; it imports the
    strategies (and torch), which this module itself does not.

    Raises:
        SpecError: ``<source>: strategy.<i>: <problem>`` for an unknown strategy or invalid parameters, or a strategy
            that does not support several workers when ``training.num_workers`` > 1.
    """
    from strategies import StrategyParamError, bind_strategies

    try:
        bound = bind_strategies([(s.name, s.params()) for s in pipeline.strategy])
    except StrategyParamError as e:
        raise SpecError(source, [(f"strategy.{e.index}", e.problem)]) from None
    if pipeline.training.num_workers > 1:
        for i, b in enumerate(bound):
            if not b.cls.supports_distributed:
                raise SpecError(source, [(f"strategy.{i}", f"'{b.name}' does not support training.num_workers > 1")])
    return bound
