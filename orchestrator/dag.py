"""The pipeline DAG on Ray: ``validate -> stage_0 -> ... -> stage_{T-1} -> report``, with evaluation beside it.

The story of :func:`run`:

1. resolve every domain's URI, build missing shards from their declared ``source`` (cached; digests checked);
2. ``validate``: a Ray task re-hashes every shard and checks its schema before anything is written, while the
   worker group's processes start and stream stage 0's data;
3. create the run folder ``<workdir>/<pipeline>/<run_id>`` and the MLflow parent run (MLflow calls run on a
   background thread from here on);
4. save the initial model (the lineage root, under ``storage.root`` or the run folder) and evaluate it on every
   domain (``b_j`` for FWT);
5. for each domain k: stage k on the executor (``orchestrator/workers.py``: the persistent worker group, or one Ray
   Train fit), starting from stage k-1's checkpoint, while the workers stream stage k+1's data; then send row k of
   R to the evaluation actors, which compute it while stage k+1 trains;
6. join the rows into R, compute ACC/BWT/FWT/forgetting, and write the report, the heatmap and the event log.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator import shards
from orchestrator.checkpoint import code_version, read_lineage, write_checkpoint
from orchestrator.errors import LifelongError, ShardError, TrainingError, check_reachable, one_line
from orchestrator.evaluation import make_evaluators
from orchestrator.ingest import READ_CPUS, stage_dataset, validate_node
from orchestrator.lineage import BackgroundTracker, RunRef, default_tracking_uri, stage_lineage
from orchestrator.metrics import cl_metrics
from orchestrator.models import HeadLayout, build_model
from orchestrator.report import save_heatmap, save_json
from orchestrator.spec import Pipeline, SourceSpec, flatten
from orchestrator.storage import Storage, join
from orchestrator.workers import Resources, StageRunner
from strategies import build_strategies, train_domains_of


@dataclass
class RunOptions:
    """How to run a pipeline locally.

    Attributes:
        workdir: working folder for runs, shards (unless ``storage.shards`` is set) and the MLflow database.
        data_root: folder of raw datasets (``--data-root``); None = ``$LIFELONG_DATA_ROOT`` or ``../shared/data``.
        tracking_uri: MLflow tracking URI; None = ``sqlite:///<workdir>/mlflow.db``.
        address: the Ray cluster to run on (see :func:`init_ray`); None = ``$RAY_ADDRESS``, else a local Ray.
        search_from: folders near which ``shared/data`` is looked for (the pipeline file's folder, the cwd).
        console: where progress and messages go. show_progress: draw the progress bar.
    """

    workdir: Path
    data_root: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    search_from: list[Path] = field(default_factory=lambda: [Path.cwd()])
    console: Console = field(default_factory=lambda: Console(stderr=True))
    show_progress: bool = True


@dataclass
class Domain:
    """A resolved domain: its name, shard URI and manifest."""

    name: str
    uri: str
    manifest: dict[str, Any]


def prepare_domains(pipeline: Pipeline, options: RunOptions, storage: Storage,
                    log: Callable[[str], None]) -> list[Domain]:
    """Resolve each domain's shards, building missing ones from their ``source``.

    Raises:
        ShardError: a domain has no shards and no source, or its shards were built from another source.
    """
    data_root = shards.find_data_root(options.data_root, options.search_from)
    out = []
    for i, spec in enumerate(pipeline.domains):
        uri = shards.domain_uri(pipeline, i, options.workdir)
        try:
            manifest = shards.read_manifest(uri, storage)
        except ShardError as e:
            if "missing manifest" not in str(e) or spec.source is None:
                where = f"domains.{i} ({spec.name})"
                raise ShardError(f"{where}: {e}" + ("" if spec.source else "; the domain declares no source to "
                                                    "build its shards from")) from None
            log(f"building shards of domain '{spec.name}' from {spec.source.kind} into {uri}")
            manifest = shards.build_domain(uri, spec.name, spec.source, data_root, storage)
        if spec.source is not None and not same_source(manifest, spec.source):
            raise ShardError(f"domains.{i} ({spec.name}): shards at {uri} were built from another source "
                             f"({manifest.get('source')}); move them or set domains.{i}.uri")
        out.append(Domain(spec.name, uri, manifest))
    return out


def same_source(manifest: dict[str, Any], source: SourceSpec) -> bool:
    """True if the manifest's recorded source is the declared one (defaults of newer fields filled in)."""
    try:
        return SourceSpec.model_validate(manifest.get("source") or {}) == source
    except ValueError:
        return False


def validate_domains(domains: list[Domain], storage: Storage) -> None:
    """Run the ``validate`` node on Ray and re-raise its error as a one-line :class:`ShardError`."""
    try:
        ray.get(validate_node.remote([(d.name, d.uri, d.manifest) for d in domains], storage))
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        raise ShardError(one_line(str(cause), ("ShardError: ",))) from None


def init_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address`` (``auto``, ``<ip>:6379``, ``ray://...``; default
    ``$RAY_ADDRESS``), or else start a new local Ray instance with all local CPUs and no dashboard (even when a
    ``ray start`` cluster runs on this machine: ``--address auto`` uses that one). Worker logs stay in Ray's session
    folder (the driver shows its own progress). Nothing happens if Ray is already initialised.

    A running cluster (``ray start --head``) saves each run Ray's own start and stop, about 4.5 s on 2 cores.

    Raises:
        LifelongError: if no Ray cluster answers at ``address``.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}
    if address is None:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, **common)
    else:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if host and port.isdigit():
            check_reachable(host, int(port), f"the Ray cluster at --address {address}")
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError) as e:
            raise LifelongError(f"the Ray cluster at --address {address} is unreachable: "
                                f"{str(e).strip().splitlines()[0]}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def check_resources(pipeline: Pipeline) -> None:
    """Refuse resources that would starve Ray Data and hang the first stage.

    Measured on Ray 2.60 with 2 CPUs: the read tasks (0.25 CPU each) need that much left over by the training
    workers and the evaluation actors; with ``executor: ray_train``, Train's ingest read tasks only get scheduled
    when the workers reserve at most half of the cluster's CPUs (0.5 of 2 runs, 0.75 hangs forever).

    Raises:
        LifelongError: naming the fields to change and the cluster's CPU count.
    """
    total = ray.cluster_resources().get("CPU", 0.0)
    t, e = pipeline.training, pipeline.evaluation
    workers = t.num_workers * t.cpus_per_worker
    reserved = workers + (e.num_actors * e.cpus_per_actor if e.enabled else 0.0)
    if total - reserved < READ_CPUS:
        raise LifelongError(f"training.num_workers x training.cpus_per_worker + evaluation.num_actors x "
                            f"evaluation.cpus_per_actor = {reserved:g} CPUs, which leaves less than {READ_CPUS:g} of "
                            f"this Ray cluster's {total:g} CPUs to Ray Data's readers; the run would hang. Lower "
                            f"training.cpus_per_worker or evaluation.cpus_per_actor")
    if t.executor == "ray_train" and workers > total / 2:
        raise LifelongError(f"training.num_workers x training.cpus_per_worker = {workers:g} CPUs, more than half of "
                            f"this Ray cluster's {total:g} CPUs; with training.executor ray_train, Ray Data's readers "
                            f"would starve and the stage would hang. Lower training.cpus_per_worker (e.g. --set "
                            f"training.cpus_per_worker={total / 2 / t.num_workers:g})")


class EventLog:
    """Append-only JSON-lines event log (``events.jsonl``) with unix timestamps, for overlap and timing audits."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"t": <unix seconds>, "event": event, **fields}``."""
        record = {"t": fields.pop("t", time.time()), "event": event, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class StagePlan:
    """What every stage of one run shares, and each stage's data config and training dataset built from it.

    Attributes:
        pipeline, domains, storage: the validated spec, its resolved domains and the storage they live on.
        layout: the output head layout. input_shape, scale, features, label: the shards' input format
            (``[*input_shape]`` uint8 features times ``scale``; the feature and label column names).
        strategies: driver-side strategy plugins (which domains each stage streams).
        resources: the worker group's resources (None until Ray is up, see :func:`stage_resources`).
    """

    pipeline: Pipeline
    domains: list[Domain]
    storage: Storage
    layout: HeadLayout
    input_shape: tuple[int, ...]
    scale: float
    features: str
    label: str
    strategies: list[Any]
    resources: Resources | None = None

    @classmethod
    def build(cls, pipeline: Pipeline, domains: list[Domain], storage: Storage) -> StagePlan:
        """Check that the domains agree on their input format and that the strategies can run as configured.

        Raises:
            ShardError: two domains have different input shapes.
            LifelongError: a strategy that does not support several workers, with ``training.num_workers`` > 1.
        """
        first = domains[0].manifest["schema"]
        for d in domains[1:]:
            shape = d.manifest["schema"]["features"]["shape"]
            if shape != first["features"]["shape"]:
                raise ShardError(f"domain '{d.name}': input shape {shape} differs from domain '{domains[0].name}' "
                                 f"({first['features']['shape']})")
        strategies = build_strategies([(s.name, s.params()) for s in pipeline.strategy])
        if pipeline.training.num_workers > 1:
            for s in strategies:
                if not s.supports_distributed:
                    raise LifelongError(f"strategy '{s.name}' does not support training.num_workers > 1")
        return cls(pipeline, domains, storage,
                   HeadLayout.build(pipeline.scenario, [d.manifest["label_set"] for d in domains]),
                   tuple(first["features"]["shape"]), float(first["features"]["scale"]), first["features"]["column"],
                   first["label"]["column"], strategies)

    def train_domains(self, k: int) -> list[int]:
        """Indices of the domains stage k trains on (only k, except for strategies such as joint)."""
        return train_domains_of(self.strategies, k)

    def train_rows(self, k: int) -> int:
        """Training rows stage k streams per epoch (all workers together)."""
        return sum(self.domains[j].manifest["splits"]["train"]["rows"] for j in self.train_domains(k))

    def data_config(self, k: int) -> dict[str, Any]:
        """Stage k's data fields of the stage config (see :func:`orchestrator.stage.run_stage`): all a worker needs
        to stream the stage's data, known before the stage's parent checkpoint exists."""
        return {"spec": self.pipeline.model_dump(mode="json"), "task_id": k, "scenario": self.layout.scenario,
                "label_sets": [list(s) for s in self.layout.label_sets], "input_shape": list(self.input_shape),
                "scale": self.scale, "features": self.features, "label": self.label,
                "train_domains": self.train_domains(k)}

    def dataset(self, k: int) -> ray.data.Dataset:
        """Stage k's training data: lazy (streamed by the workers), or read into the object store first
        (``training.materialize``; the driver then holds block references only)."""
        t = self.pipeline.training
        ds = stage_dataset([(d.uri, d.manifest) for d in self.domains], self.train_domains(k), t.shuffle,
                           self.pipeline.seed * 1000 + k, self.storage, readers=t.readers)
        return ds.materialize() if t.materialize else ds


def run(pipeline: Pipeline, options: RunOptions) -> dict[str, Any]:
    """Run a pipeline end to end on Ray and return the report (see ``report.py`` for its fields).

    Raises:
        LifelongError: bad shards, unreachable tracking URI, or a diverged stage (message names the culprit).
    """
    console, started = options.console, time.time()
    storage = Storage.from_settings(pipeline.storage.s3)
    domains = prepare_domains(pipeline, options, storage, lambda m: console.print(f"[dim]{m}[/dim]"))
    plan = StagePlan.build(pipeline, domains, storage)
    init_ray(options.address)
    check_resources(pipeline)
    plan = replace(plan, resources=stage_resources(pipeline))
    runner = StageRunner(pipeline.training.executor, storage, pipeline.training.max_failures)
    try:
        # The worker processes boot and start streaming stage 0's data while the shards are validated.
        first = None if pipeline.training.materialize else plan.dataset(0)
        runner.prestart(plan.resources, None if first is None else (plan.data_config(0), first))
        validate_domains(domains, storage)
        return _tracked_run(plan, options, runner, first, started)
    finally:
        runner.drop_group()


def _tracked_run(plan: StagePlan, options: RunOptions, runner: StageRunner, first: ray.data.Dataset | None,
                 started: float) -> dict[str, Any]:
    """Steps 3-6 of :func:`run`: the run folder, the MLflow parent run, the stages and the report. ``first`` is
    stage 0's dataset if the worker group is already streaming it."""
    pipeline = plan.pipeline
    options.workdir.mkdir(parents=True, exist_ok=True)
    # MLflow works on a background thread from here on (see BackgroundTracker); the heatmap's plotting library is
    # imported there too, so that neither waits on the critical path.
    tracker = BackgroundTracker(options.tracking_uri or pipeline.tracking.uri or default_tracking_uri(options.workdir),
                                pipeline.tracking.experiment or pipeline.name)
    tracker.call(importlib.import_module, "matplotlib.pyplot")
    if not tracker.uri.startswith(("sqlite:", "file:")) and "://" in tracker.uri:
        tracker.ready()  # a tracking server that cannot be reached fails the run before its folder exists

    # Everything above only reads; from here on the run writes under its own fresh folder.
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = (options.workdir / pipeline.name / run_id).resolve()
    run_dir.mkdir(parents=True)
    events = EventLog(run_dir / "events.jsonl")
    (run_dir / "pipeline.json").write_text(json.dumps(pipeline.model_dump(mode="json"), indent=1))
    code = code_version()
    parent = tracker.start_run(f"{pipeline.name}-{run_id}", {
        "lifelong.run_id": run_id, "lifelong.run_dir": str(run_dir), "lifelong.spec_sha256": pipeline.spec_hash(),
        "lifelong.strategy": pipeline.strategy_label(), "lifelong.git_commit": code["git_commit"]})
    tracker.log_params(parent, flatten(pipeline.model_dump(mode="json")))
    events.write("run_start", run_id=run_id)
    ok = False
    try:
        report = _run_stages(plan, tracker, parent, run_id, run_dir, events, code, runner, first, options)
        report.update(wall_seconds=time.time() - started, run_dir=str(run_dir), run_id=run_id,
                      tracking_uri=tracker.uri)
        artifacts = ["report.json", "events.jsonl"]
        tracker.log_metrics(parent, {"wall_seconds": report["wall_seconds"]})
        if report["R"]:
            tracker.log_metrics(parent, {"ACC": report["acc"], "BWT": report["bwt"], "FWT": report["fwt"],
                                         "forgetting": report["avg_forgetting"]})
            save_json({"R": report["R"], "b": report["b"], "domains": report["domains"]},
                      run_dir / "accuracy_matrix.json")
            tracker.call(save_heatmap, report, run_dir / "accuracy_matrix.png")
            artifacts = ["accuracy_matrix.json", "accuracy_matrix.png", *artifacts]

        def finish(mlflow_run_id: str) -> None:  # on the tracker's thread, once the parent run's id is known
            report["mlflow_run_id"] = mlflow_run_id
            save_json(report, run_dir / "report.json")
            events.write("run_end", run_id=run_id, mlflow_run_id=mlflow_run_id)

        tracker.call(finish, parent)
        for name in artifacts:
            tracker.log_artifact(parent, run_dir / name)
        ok = True
    finally:
        tracker.end(parent, ok)
        tracker.close(raise_errors=ok)  # a failed run keeps its own error
    (run_dir / "_COMPLETED").write_text(json.dumps({"finished": time.time()}))
    return report


def stage_root(pipeline: Pipeline, run_id: str, run_dir: Path) -> str:
    """Where a run's checkpoints and strategy state go: ``<storage.root>/<pipeline>/<run_id>`` (a path or URI), or
    the run folder itself when ``storage.root`` is unset."""
    root = pipeline.storage.root
    if root is None:
        return str(run_dir)
    if "://" not in root or root.startswith("file://"):
        root = str(Path(root.removeprefix("file://")).resolve())
    return join(root, pipeline.name, run_id)


def stage_resources(pipeline: Pipeline) -> Resources:
    """The worker group's resources; ``threads_per_worker`` defaults to the cluster's CPUs per worker."""
    t = pipeline.training
    threads = t.threads_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // t.num_workers)
    return Resources(t.num_workers, t.cpus_per_worker, t.use_gpu, threads)


def _run_stages(plan: StagePlan, tracker: BackgroundTracker, parent_id: RunRef, run_id: str, run_dir: Path,
                events: EventLog, code: dict[str, str], runner: StageRunner, first: ray.data.Dataset | None,
                options: RunOptions) -> dict[str, Any]:
    """Step 4-6 of :func:`run` inside the MLflow parent run: the initial checkpoint, the stages on ``runner``
    with evaluation beside them, and the report's stages, R and CL metrics."""
    from ray.util import ActorPool
    from ray.util.queue import Queue

    pipeline, domains, storage, layout = plan.pipeline, plan.domains, plan.storage, plan.layout
    resources = plan.resources
    assert resources is not None, "run() sets the plan's resources once Ray is up"
    T = len(domains)
    root = stage_root(pipeline, run_id, run_dir)
    torch.manual_seed(pipeline.seed)
    init_model = build_model(pipeline.model, plan.input_shape, layout.num_outputs)
    parent = str(write_checkpoint(join(root, "init"), init_model.state_dict(),
                                  [s.state_dict() for s in plan.strategies],
                                  {"pipeline": pipeline.name, "run_id": run_id, "stage": -1, "domain": None,
                                   "spec_sha256": pipeline.spec_hash(), "code": code, "parent": None, "inputs": []},
                                  storage))
    evaluate = pipeline.evaluation.enabled
    evaluators: list[Any] = []
    pool = ActorPool([])
    cells: dict[tuple[int, int], dict[str, Any]] = {}

    def start_evaluators() -> None:
        """Start the evaluation actors once stage 0 is under way: on a small machine their start would otherwise
        compete with the first training worker's, which every later step waits on."""
        evaluators.extend(make_evaluators(pipeline.evaluation.num_actors if evaluate else 0,
                                          pipeline.evaluation.cpus_per_actor, [(d.uri, d.manifest) for d in domains],
                                          pipeline.evaluation.split, layout, pipeline.model, plan.input_shape,
                                          plan.scale, pipeline.evaluation.batch_size,
                                          [(s.name, s.params()) for s in pipeline.strategy], storage))
        for actor in evaluators:
            pool.push(actor)
        submit_row(-1, init)

    def submit_row(row: int, checkpoint: str) -> None:
        if not evaluate:
            return
        events.write("eval_submit", row=row)
        for j in range(T):
            pool.submit(lambda a, v: a.evaluate.remote(*v), (checkpoint, row, j))

    def pump_evals(timeout: float) -> None:
        while pool.has_next():
            try:
                cell = pool.get_next_unordered(timeout=timeout)
            except TimeoutError:
                return
            except ray.exceptions.RayError as e:
                raise LifelongError(f"an evaluation actor failed: {one_line(str(e))}") from None
            cells[(cell["row"], cell["col"])] = cell
            events.write("eval_cell", t=cell["end"], row=cell["row"], col=cell["col"], start=cell["start"],
                         end=cell["end"], acc=cell["acc"])

    init = parent
    queue = Queue(actor_options={"num_cpus": 0})
    rows = [plan.train_rows(k) for k in range(T)]
    total = sum(rows) * pipeline.training.epochs
    world = resources.num_workers
    stages: list[dict[str, Any]] = []
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=options.console,
                        disable=not options.show_progress, transient=False)

    def eta(k: int, t_start: float) -> str:
        """Remaining seconds from the mean wall time of finished stages (start-up dominates small stages)."""
        if not stages:
            return "?"
        mean = sum(s["wall_seconds"] for s in stages) / len(stages)
        return f"{max(0.0, mean * (T - k) - (time.time() - t_start)):.0f}s"

    with progress:
        bar = progress.add_task("starting", total=total, rate="", eta="?")
        done_before = 0
        ahead = first if first is not None else plan.dataset(0)
        lazy = not pipeline.training.materialize  # lazy datasets cost nothing to build: the workers prefetch them
        for k, domain in enumerate(domains):
            train_idx = plan.train_domains(k)
            events.write("stage_start", stage=k, domain=domain.name)
            t_start = time.time()
            inputs = [{"domain": domains[j].name, "uri": domains[j].uri, "split": "train",
                       "digest": domains[j].manifest["splits"]["train"]["digest"],
                       "shards": [{key: s[key] for key in ("path", "sha256", "rows")}
                                  for s in domains[j].manifest["splits"]["train"]["shards"]]} for j in train_idx]
            lineage = stage_lineage(pipeline.name, run_id, k, domain.name, parent, read_lineage(parent, storage),
                                    inputs, pipeline.spec_hash(), code)
            stage_dir = join(root, f"stage-{k}")
            config = {**plan.data_config(k), "parent": parent, "lineage": lineage, "progress": queue,
                      "train_rows": rows[k], "storage": storage, "state_uri": join(root, "state", f"stage-{k}"),
                      "threads": resources.threads, "resources": resources}
            progress.update(bar, description=f"stage {k + 1}/{T} {domain.name}: starting")
            after = plan.dataset(k + 1) if lazy and k + 1 < T else None
            handle = runner.start(config, ahead, lambda k=k: plan.dataset(k), stage_dir,
                                  None if after is None else (plan.data_config(k + 1), after))
            if k == 0:
                start_evaluators()

            # While stage k trains: its MLflow run (queued), stage k+1's dataset, progress and evaluation cells.
            stage_run = tracker.start_run(f"stage-{k}-{domain.name}", {"lifelong.stage": str(k),
                                          "lifelong.domain": domain.name, "lifelong.run_id": run_id}, parent_id)
            for item in inputs:
                tracker.log_dataset(stage_run, f"{item['domain']}/train", item["uri"], item["digest"], "training")
            tracker.log_params(stage_run, {"stage": str(k), "domain": domain.name, "parent_checkpoint": parent,
                                           "train_domains": ",".join(domains[j].name for j in train_idx)})
            ahead = after if after is not None else (plan.dataset(k + 1) if k + 1 < T else None)
            while True:
                finished = handle.wait(timeout=0.5)
                for ev in queue.get_nowait_batch(queue.qsize()):
                    progress.update(bar, completed=done_before + ev["samples"] * world,
                                    description=f"stage {k + 1}/{T} {domain.name}: epoch {ev['epoch'] + 1}/"
                                                f"{pipeline.training.epochs}",
                                    rate=f"{ev['samples'] * world / max(ev['seconds'], 1e-9):,.0f} samples/s")
                    if ev["kind"] == "epoch":
                        tracker.log_metrics(stage_run, {"loss": ev["loss"], "samples_per_second":
                                            ev["samples"] * world / max(ev["seconds"], 1e-9)}, step=ev["epoch"])
                if finished:
                    break
                progress.update(bar, eta=eta(k, t_start))
                pump_evals(timeout=0)
                tracker.check()
            try:
                stats, checkpoint = handle.result()
            except TrainingError as e:
                tracker.end(stage_run, False)
                events.write("stage_failed", stage=k, error=str(e))
                raise TrainingError(f"stage {k} ({domain.name}) failed: {e}") from None
            t_end = time.time()
            events.write("stage_end", t=t_end, stage=k, domain=domain.name, checkpoint=checkpoint)
            submit_row(k, checkpoint)
            done_before += rows[k] * pipeline.training.epochs
            wall = t_end - t_start
            stage = {"stage": k, "domain": domain.name, "checkpoint": checkpoint, "start": t_start, "end": t_end,
                     "wall_seconds": wall, "train_seconds": stats.get("train_seconds", float("nan")),
                     "overhead_seconds": wall - stats.get("train_seconds", float("nan")),
                     "samples_per_second": stats.get("samples_per_second", float("nan")),
                     "epoch_loss": stats.get("epoch_loss", [float("nan")]),
                     "epoch_seconds": stats.get("epoch_seconds", [])}
            stages.append(stage)
            storage.write_bytes(join(stage_dir, "_COMPLETED"), json.dumps(stage, indent=1).encode())
            tracker.log_metrics(stage_run, {"stage_wall_seconds": wall, "train_seconds": stage["train_seconds"],
                                            "overhead_seconds": stage["overhead_seconds"]})
            tracker.log_dict(stage_run, read_lineage(checkpoint, storage), "lineage.json")
            tracker.end(stage_run, True)
            parent = checkpoint
        progress.update(bar, description=f"evaluating the last stage ({T}/{T})")
        while pool.has_next():
            pump_evals(timeout=5.0)
    for a in evaluators:
        ray.kill(a)
    ray.kill(queue.actor)
    report = {"pipeline": pipeline.name, "strategy": pipeline.strategy_label(), "scenario": pipeline.scenario,
              "domains": [d.name for d in domains], "stages": stages}
    if not evaluate:  # a training-only run: no accuracy matrix, no CL metrics
        return {**report, "R": [], "b": [], "acc": None, "bwt": None, "fwt": None, "forgetting": [],
                "avg_forgetting": None}
    R = [[cells[(i, j)]["acc"] for j in range(T)] for i in range(T)]
    b = [cells[(-1, j)]["acc"] for j in range(T)]
    return {**report, "R": R, "b": b, **cl_metrics(R, b)}
