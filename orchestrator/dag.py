"""The pipeline DAG on Ray: ``validate -> stage_0 -> ... -> stage_{T-1} -> report``, with evaluation beside it.

The story of :func:`run`:

1. bind the strategies (their parameters checked once), resolve every domain's URI and build missing shards from
   their declared ``source`` (cached; digests checked);
2. ``validate``: the driver re-hashes every shard and checks its schema before anything is written, while the
   worker group's processes start and stream stage 0's data;
3. create the run folder ``<workdir>/<pipeline>/<run_id>`` and the MLflow parent run (MLflow calls run on a
   background thread from here on);
4. save the initial model (the lineage root, under ``storage.root`` or the run folder);
5. the stage engine (``orchestrator/engine.py``) runs stage k for each domain k on the executor
   (``orchestrator/workers.py``), from stage k-1's checkpoint, while the workers stream stage k+1's data; its
   listeners evaluate (``evaluation.py``: row k of R while stage k+1 trains, and the initial model's row for FWT),
   track (``lineage.py``: a child MLflow run per stage; ``registry.py``: a registered model version per stage), and
   record (``report.py``: progress, events, the report);
6. write the report (R, ACC/BWT/FWT/forgetting), the heatmap and the event log, and finish the MLflow parent run.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from rich.console import Console

from orchestrator import shards
from orchestrator.checkpoint import code_version, read_lineage, write_checkpoint
from orchestrator.engine import Listener, Listeners, Restored, RunInfo, RunStopped, run_stages
from orchestrator.errors import LifelongError, ShardError, check_reachable
from orchestrator.evaluation import EvaluationScheduler
from orchestrator.lineage import BackgroundTracker, MlflowStages, RunRef, tracking_target
from orchestrator.models import build_model, model_factory
from orchestrator.schedules import save_schedule_plot
from orchestrator.plan import Domain, Resources, StagePlan, bind, check_stream, check_workers, validate_shards
from orchestrator.registry import ModelRegistry
from orchestrator.report import EventLog, ProgressBar, ReportBuilder, save_curve, save_heatmap, save_json
from orchestrator.redact import redact_uri
from orchestrator.resume import (CELLS_FILE, COMPLETED_FILE, PIPELINE_FILE, RECORD_FILE, CommittedWork, Resumption,
                                 check_extension, committed_prefix, new_record, read_committed, read_record, write_json)
from orchestrator.spec import Pipeline, SourceSpec, flatten
from orchestrator.storage import Storage, is_local, join, local_path
from orchestrator.workers import StageRunner


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
        mlflow_parent: an MLflow run id that the pipeline's run becomes a child of (a Tune trial's under the tune
            run). run_name: the pipeline run's MLflow name (default ``<pipeline>-<run id>``). run_params: extra
            params of that run (a trial's sampled values). listeners: extra listeners of the stage engine.
        register: register each stage's model in the MLflow model registry (``registry.py``); Tune trials do not.
        spec_file, overrides: the YAML and the ``--set`` overrides the pipeline came from, recorded in the run's
            ``run.json`` so that ``lifelong resume`` can tell whether the file has changed since.
    """

    workdir: Path
    data_root: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    search_from: list[Path] = field(default_factory=lambda: [Path.cwd()])
    console: Console = field(default_factory=lambda: Console(stderr=True))
    show_progress: bool = True
    mlflow_parent: str | None = None
    run_name: str | None = None
    run_params: Mapping[str, str] = field(default_factory=dict)
    listeners: Sequence[Listener] = ()
    register: bool = True
    spec_file: Path | None = None
    overrides: tuple[str, ...] = ()


def prepare_domains(pipeline: Pipeline, options: RunOptions, storage: Storage,
                    log: Callable[[str], None]) -> list[Domain]:
    """Resolve each domain's shards, building missing ones from their ``source``, and check the stream from the
    manifests (:func:`orchestrator.plan.check_stream`).

    Raises:
        ShardError: a domain has no shards and no source, an invalid manifest, shards built from another source, an
            empty split, or a schema that differs from domain 0's.
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
    check_stream(out, pipeline)
    return out


def same_source(manifest: dict[str, Any], source: SourceSpec) -> bool:
    """True if the manifest's recorded source is the declared one (defaults of newer fields filled in)."""
    try:
        return SourceSpec.model_validate(manifest.get("source") or {}) == source
    except ValueError:
        return False


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


def worker_resources(pipeline: Pipeline) -> Resources:
    """The worker group's resources on the connected Ray cluster; ``threads_per_worker`` defaults to the cluster's
    CPUs per worker."""
    t = pipeline.training
    threads = t.threads_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // t.num_workers)
    return Resources(t.num_workers, t.cpus_per_worker, t.use_gpu, threads, tuple(sorted(t.resources.items())))


def check_resources(pipeline: Pipeline) -> Resources:
    """The worker group's resources, refused if they and the evaluation actors would not fit this cluster (see
    :func:`orchestrator.plan.check_workers`).

    Raises:
        LifelongError: naming the fields to change and what the cluster has.
    """
    resources = worker_resources(pipeline)
    check_workers(resources, ray.cluster_resources(), pipeline)
    return resources


def stage_root(pipeline: Pipeline, run_id: str, run_dir: Path) -> str:
    """Where a run's checkpoints and strategy state go: ``<storage.root>/<pipeline>/<run_id>`` (a path or URI), or
    the run folder itself when ``storage.root`` is unset."""
    root = pipeline.storage.root
    if root is None:
        return str(run_dir)
    return join(local_path(root) if is_local(root) else root, pipeline.name, run_id)


def run(pipeline: Pipeline, options: RunOptions, resumption: Resumption | None = None) -> dict[str, Any]:
    """Run a pipeline end to end on Ray and return the report (see :class:`orchestrator.report.ReportBuilder` for
    its fields, plus ``wall_seconds``, ``run_dir``, ``run_id``, ``tracking_uri``, ``mlflow_run_id`` and
    ``timeline``: unix seconds of ``run_start``, ``ray_init_start``, ``ray_ready``, ``workers_start``,
    ``workers_ready``, ``validated``, ``first_batch`` and ``report_written``, where the fixed costs of a run show).

    With ``resumption`` (``lifelong resume`` and ``extend``, :func:`orchestrator.resume.prepare_resume`), the run
    continues in its own folder and MLflow run: its committed stages and cells are not computed again.

    Raises:
        SpecError: a strategy is unknown or has invalid parameters.
        LifelongError: bad shards, unreachable tracking URI, or a diverged stage (message names the culprit).
    """
    timeline = {"run_start": time.time()}
    strategies = bind(pipeline, pipeline.name)
    model_factory(pipeline.model)  # a user factory that does not import is refused before anything is written
    storage = Storage.from_settings(pipeline.storage.s3)
    domains = prepare_domains(pipeline, options, storage, lambda m: options.console.print(f"[dim]{m}[/dim]"))
    timeline["ray_init_start"] = time.time()
    init_ray(options.address)
    timeline["ray_ready"] = time.time()
    resources = check_resources(pipeline)
    plan = StagePlan.build(pipeline, domains, storage, strategies, resources, root="")  # root: once the run id is known
    first = 0  # the first stage to train
    if resumption is not None:
        root = stage_root(pipeline, resumption.record.run_id, resumption.run_dir)
        if resumption.extended is not None:
            check_extension(plan, join(root, "init"), resumption.extended)
        first = committed_prefix(root, storage, plan.num_stages, pipeline.training.max_failures)
    runner = StageRunner(pipeline.training.executor, pipeline.training.max_failures)
    try:
        # The worker processes boot and start streaming the first stage's data while the shards are validated.
        timeline["workers_start"] = time.time()
        runner.prestart(resources, plan.data(first) if first < plan.num_stages else None)
        validate_shards(domains, storage)
        timeline["validated"] = time.time()
        return _tracked_run(plan, options, runner, timeline, resumption)
    finally:
        runner.close()


def _tracked_run(plan: StagePlan, options: RunOptions, runner: StageRunner, timeline: dict[str, float],
                 resumption: Resumption | None) -> dict[str, Any]:
    """Steps 3-6 of :func:`run`: the run folder, the MLflow parent run, the stages and the report; ``timeline``
    gains the run's later marks."""
    pipeline = plan.pipeline
    options.workdir.mkdir(parents=True, exist_ok=True)
    tracker = _start_tracker(pipeline, options)
    code = code_version()
    # Everything above only reads; from here on the run writes under its own folder.
    run_id, run_dir, parent = _open_run(pipeline, options, tracker, code, resumption)
    tracker.log_params(parent, {**flatten(pipeline.model_dump(mode="json", exclude={"tune"})), **options.run_params})
    events = EventLog(run_dir / "events.jsonl")
    events.write("run_start" if resumption is None else "run_resume", run_id=run_id)
    status = "FAILED"
    try:
        plan = replace(plan, root=stage_root(pipeline, run_id, run_dir))
        init = _initial_checkpoint(plan, run_id, code, resumption is not None)
        restored = read_committed(plan, init, run_dir) if resumption else Restored()
        run = RunInfo(run_id, plan, init, code, tracker.flush, restored, resumption is not None)
        schedule = pipeline.training.lr_schedule
        if schedule.name != "constant":  # the learning rate the stages will follow, as an artifact
            tracker.call(save_schedule_plot, schedule, pipeline.training.optimizer.lr,
                         [plan.planned_steps(k) for k in range(plan.num_stages)], [d.name for d in plan.domains],
                         run_dir / "lr_schedule.png")
            tracker.log_artifact(parent, run_dir / "lr_schedule.png")
        stages = MlflowStages(tracker, parent, run_id)
        registry = [ModelRegistry(tracker, stages, pipeline.tracking.registered_model or pipeline.name,
                                  options.run_params)] if options.register else []
        listeners = [events, stages, *registry, CommittedWork(run_dir / CELLS_FILE), *options.listeners]
        report = _stages(run, runner, options, listeners)
        timeline.update(workers_ready=runner.ready_at() or float("nan"),
                        first_batch=report["stages"][0]["first_batch_at"], report_written=time.time())
        report.update(wall_seconds=timeline["report_written"] - timeline["run_start"], run_dir=str(run_dir),
                      run_id=run_id, tracking_uri=redact_uri(tracker.uri), timeline=timeline)
        _write_report(report, run_dir, tracker, parent, events)
        status = "FINISHED"
    except (RunStopped, KeyboardInterrupt, SystemExit):  # stopped by a listener, Ctrl+C or `lifelong stop`
        status = "KILLED"
        raise
    finally:
        tracker.end(parent, status)
        tracker.close(raise_errors=status != "FAILED")  # a failed run keeps its own error
    write_json(run_dir / COMPLETED_FILE, {"finished": time.time()})
    return report


def _open_run(pipeline: Pipeline, options: RunOptions, tracker: BackgroundTracker, code: dict[str, str],
              resumption: Resumption | None) -> tuple[str, Path, RunRef]:
    """``(run id, run folder, MLflow pipeline run)``: a new run's fresh folder, ``run.json``, ``pipeline.json`` and
    MLflow run; or a resumed run's own, ``pipeline.json`` rewritten for an extended run (the report it had is kept
    as ``report-<T>.json``) and its MLflow run marked RUNNING again."""
    if resumption is not None:
        record, run_dir = resumption.record, resumption.run_dir
        if resumption.extended is not None:
            for name in ("report.json", PIPELINE_FILE):
                if (run_dir / name).exists():
                    os.replace(run_dir / name, run_dir / name.replace(".json", f"-{resumption.extended}.json"))
            (run_dir / COMPLETED_FILE).unlink(missing_ok=True)
            names = tuple(d.name for d in pipeline.domains[resumption.extended:])
            record = record.model_copy(update={"extensions": (*record.extensions, names)})
            write_json(run_dir / RECORD_FILE, record.model_dump(mode="json"))
        write_json(run_dir / PIPELINE_FILE, pipeline.model_dump(mode="json"))
        options.console.print(f"[dim]resuming run {record.run_id} in {run_dir}[/dim]")
        if record.mlflow_run_id:
            return record.run_id, run_dir, tracker.reopen_run(record.mlflow_run_id)
        return record.run_id, run_dir, _start_parent(pipeline, options, tracker, code, record.run_id, run_dir)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = (options.workdir / pipeline.name / run_id).resolve()
    run_dir.mkdir(parents=True)
    write_json(run_dir / PIPELINE_FILE, pipeline.model_dump(mode="json"))
    record = new_record(run_id, pipeline, options.spec_file, options.overrides, tracker.uri, tracker.experiment)
    write_json(run_dir / RECORD_FILE, record.model_dump(mode="json"))
    options.console.print(f"[dim]run {run_id} in {run_dir}[/dim]")
    return run_id, run_dir, _start_parent(pipeline, options, tracker, code, run_id, run_dir)


def _start_parent(pipeline: Pipeline, options: RunOptions, tracker: BackgroundTracker, code: dict[str, str],
                  run_id: str, run_dir: Path) -> RunRef:
    """Create the MLflow pipeline run and record its id in ``run.json`` once known."""
    parent = tracker.start_run(options.run_name or f"{pipeline.name}-{run_id}", {
        "lifelong.run_id": run_id, "lifelong.run_dir": str(run_dir), "lifelong.spec_sha256": pipeline.spec_hash(),
        "lifelong.strategy": pipeline.strategy_label(), "lifelong.git_commit": code["git_commit"]},
        options.mlflow_parent)

    def remember(mlflow_run_id: str) -> None:
        record = read_record(run_dir)
        write_json(run_dir / RECORD_FILE, record.model_copy(update={"mlflow_run_id": mlflow_run_id})
                   .model_dump(mode="json"))

    tracker.call(remember, parent)
    return parent


def _start_tracker(pipeline: Pipeline, options: RunOptions) -> BackgroundTracker:
    """The run's MLflow tracker (its calls run on a background thread); a tracking server that cannot be reached
    fails the run here, before its folder exists. The heatmap's plotting library is imported on that thread too, so
    that neither waits on the critical path."""
    tracker = BackgroundTracker(*tracking_target(pipeline, options.tracking_uri, options.workdir))
    tracker.call(importlib.import_module, "matplotlib.pyplot")
    if not tracker.uri.startswith(("sqlite:", "file:")) and not is_local(tracker.uri):
        tracker.ready()
    return tracker


def _initial_checkpoint(plan: StagePlan, run_id: str, code: dict[str, str], resumed: bool = False) -> str:
    """Save the initial model (seeded by the pipeline's seed) and the strategies' empty state: the lineage root,
    which every stage descends from and the evaluation scores as row -1 (b, for FWT). A resumed run keeps the one
    it committed."""
    pipeline = plan.pipeline
    if resumed:
        try:
            read_lineage(join(plan.root, "init"), plan.storage)
            return join(plan.root, "init")
        except FileNotFoundError:
            pass  # the earlier attempt died before committing it
    torch.manual_seed(pipeline.seed)
    model = build_model(pipeline.model, plan.input.shape, plan.layout.num_outputs)
    lineage = {"pipeline": pipeline.name, "run_id": run_id, "stage": -1, "domain": None,
               "spec_sha256": pipeline.spec_hash(), "code": code, "parent": None, "inputs": []}
    return str(write_checkpoint(join(plan.root, "init"), model.state_dict(),
                                [b.build().state_dict() for b in plan.strategies], lineage, plan.storage))


def _stages(run: RunInfo, runner: StageRunner, options: RunOptions,
            listeners: list[Listener]) -> dict[str, Any]:
    """Run the stage engine with the run's listeners and return the report's stages, R and CL metrics."""
    evaluate = run.plan.pipeline.evaluation.enabled
    builder = ReportBuilder(evaluate)
    bar = ProgressBar(options.console, options.show_progress)
    recorders = Listeners([bar, builder, *listeners])
    scheduler = EvaluationScheduler(recorders) if evaluate else None
    try:
        run_stages(run, runner, Listeners([recorders, *([scheduler] if scheduler else [])]))
    finally:
        bar.close()
        if scheduler is not None:
            scheduler.close()
    report = builder.report()
    if scheduler is not None:
        report["evaluation_actor_restarts"] = scheduler.pool.restarts if scheduler.pool is not None else 0
    if "curve" in report and scheduler is not None:
        report["curve_snapshots_dropped"] = scheduler.snapshots_dropped  # evaluation fell behind training
    return report


def _write_report(report: dict[str, Any], run_dir: Path, tracker: BackgroundTracker, parent: RunRef,
                  events: EventLog) -> None:
    """Write ``report.json``, the accuracy matrix (JSON and PNG) and the event log's end, and log them to the
    parent run with its metrics."""
    artifacts = ["report.json", "events.jsonl"]
    tracker.log_metrics(parent, {"wall_seconds": report["wall_seconds"]})
    if report.get("P"):  # text domains: the perplexity matrix instead of R
        tracker.log_metrics(parent, {"avg_ppl": report["avg_ppl"], "ppl_rise": report["ppl_rise"],
                                     "ppl_forgetting": report["avg_ppl_forgetting"], "ppl_fwt": report["ppl_fwt"],
                                     "bits_per_token": report["bits_per_token"]})
        save_json({"P": report["P"], "b": report["P_b"], "R": report["R"], "domains": report["domains"]},
                  run_dir / "perplexity_matrix.json")
        tracker.call(save_heatmap, report, run_dir / "perplexity_matrix.png")
        artifacts = ["perplexity_matrix.json", "perplexity_matrix.png", *artifacts]
    elif report["R"]:
        tracker.log_metrics(parent, {"ACC": report["acc"], "BWT": report["bwt"], "FWT": report["fwt"],
                                     "forgetting": report["avg_forgetting"]})
        save_json({"R": report["R"], "b": report["b"], "domains": report["domains"]}, run_dir / "accuracy_matrix.json")
        tracker.call(save_heatmap, report, run_dir / "accuracy_matrix.png")
        artifacts = ["accuracy_matrix.json", "accuracy_matrix.png", *artifacts]
    if report.get("curve"):
        tracker.log_metrics(parent, {k: v for k, v in report["stability"].items() if v == v})  # NaN: not logged
        tracker.call(save_curve, report, run_dir / "continual_evaluation.png")
        artifacts = ["continual_evaluation.png", *artifacts]

    def finish(mlflow_run_id: str) -> None:  # on the tracker's thread, once the parent run's id is known
        report["mlflow_run_id"] = mlflow_run_id
        save_json(report, run_dir / "report.json")
        events.write("run_end", run_id=report["run_id"], mlflow_run_id=mlflow_run_id)

    tracker.call(finish, parent)
    for name in artifacts:
        tracker.log_artifact(parent, run_dir / name)
