"""Lineage in MLflow: one parent run per pipeline run, one child run per stage (:class:`MlflowStages`, a listener
of the stage engine).

The driver owns every run and talks to MLflow through an explicit ``MlflowClient`` (no active-run global state), on
a background thread at background CPU priority (:class:`BackgroundTracker`):

- params: the flattened spec (secret-looking keys masked);
- inputs: each stage's training shards as an MLflow dataset whose source is the domain URI and whose digest is the
  manifest's split digest (context ``training``);
- metrics: per-epoch loss and samples/s in the stage runs; ACC, BWT, FWT and forgetting in the parent run;
- artifacts: the accuracy matrix as JSON and PNG, the event log, and each stage's ``lineage.json``;
- models: each stage's model in the registry (``registry.py``, a listener beside this one).

The default tracking URI is ``sqlite:///<absolute workdir>/mlflow.db``: absolute, because Ray workers change folder.
"""

from __future__ import annotations

import math
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from orchestrator.checkpoint import read_lineage
from orchestrator.cpu import background_priority
from orchestrator.engine import Cell, CurvePoint, Listener, RunInfo, StageResult
from orchestrator.errors import LifelongError, check_reachable
from orchestrator.metrics import SeenSoFar
from orchestrator.plan import StageSpec
from orchestrator.redact import redact_text, redact_uri
from orchestrator.spec import Pipeline
from orchestrator.storage import is_local, local_path
from orchestrator.stage import Progress


Status = Literal["FINISHED", "FAILED", "KILLED"]


def default_tracking_uri(workdir: Path) -> str:
    """``sqlite:///<absolute workdir>/mlflow.db``."""
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a ``sqlite:///`` store, in ``<store folder>/mlartifacts``
    (MLflow's own default is ``./mlruns`` under the current folder, wherever the store is); None for a tracking
    server, whose artifact root is its own (``--artifacts-destination``)."""
    path = uri.removeprefix("sqlite:///")  # SQLAlchemy: an absolute path after it starts with "/"
    if not uri.startswith("sqlite:///") or not path or path == ":memory:":
        return None
    return (Path(path).resolve().parent / "mlartifacts").as_uri()


def tracking_target(pipeline: Pipeline, tracking_uri: str | None, workdir: Path) -> tuple[str, str]:
    """``(tracking URI, experiment name)`` of a pipeline's runs: ``--tracking-uri``, else ``tracking.uri``, else
    :func:`default_tracking_uri`; ``tracking.experiment``, else the pipeline's name."""
    uri = tracking_uri or pipeline.tracking.uri or default_tracking_uri(workdir)
    return uri, pipeline.tracking.experiment or pipeline.name


def create_sqlite_store(uri: str) -> None:
    """Create a ``sqlite:///`` tracking store that does not exist yet as one step: its tables are made in a temporary
    file beside it (MLflow's migrations take seconds), which is then linked onto its name. A run killed meanwhile
    leaves no half-migrated store that every later run would fail on; two runs creating it at once keep the first.
    Nothing happens for another URI or an existing file."""
    from mlflow import MlflowClient

    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or path.name in ("", ":memory:") or path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}")
        client.search_experiments(max_results=1)  # creates the tables
        client._tracking_client.store.engine.dispose()  # noqa: SLF001 - close the file before it is linked
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another run created it first
    finally:
        tmp.unlink(missing_ok=True)


class Tracker:
    """Creates and fills the MLflow runs of one pipeline run.

    Args:
        uri: MLflow tracking URI. experiment: experiment name (created if missing).
    Raises:
        LifelongError: if the tracking server cannot be reached (naming the URI).
    """

    def __init__(self, uri: str, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow prints "View run ... at: <tracking URI>" on stdout when a run on a server ends: that would break
        # `--json` output and print a password the URI may hold. The CLI names the run itself (redacted).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        from mlflow import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..." lines
        self.uri = uri
        server = urlparse(uri)
        if server.scheme in ("http", "https") and server.hostname:
            check_reachable(server.hostname, server.port or (443 if server.scheme == "https" else 80),
                            f"MLflow tracking URI {redact_uri(uri)}")
        try:
            create_sqlite_store(uri)
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=artifact_location(uri))
        except Exception as e:  # noqa: BLE001 - any backend failure means the URI is unusable
            raise LifelongError(f"MLflow tracking URI {redact_uri(uri)} is unreachable: "
                                f"{redact_text(str(e).splitlines()[0][:200])}") from None

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """Create a run (a child of ``parent_id`` if given) and return its id."""
        if parent_id:
            tags = {**tags, "mlflow.parentRunId": parent_id}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def reopen_run(self, run_id: str) -> str:
        """Mark an existing run RUNNING again (the pipeline run of a resumed or extended run) and return its id.

        Raises:
            LifelongError: if the tracking store has no such run.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as e:
            raise LifelongError(f"MLflow run {run_id} is not in {self.uri}: {str(e).splitlines()[0][:160]}") from None
        return run_id

    def stage_runs(self, parent_id: str, k: int) -> list[Any]:
        """The child runs of stage k under the pipeline run ``parent_id``, newest first (more than one when the run
        was resumed while stage k trained)."""
        return self.client.search_runs([self.experiment_id], order_by=["attributes.start_time DESC"],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                     f"tags.`lifelong.stage` = '{k}'")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Log string params in batches of 100 (MLflow's limit per call); a param the run has already is left as it
        is (an extended run logs only its new domains')."""
        from mlflow.entities import Param

        logged = self.client.get_run(run_id).data.params
        items = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Log numeric metrics at ``step`` (the epoch for stage runs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dataset(self, run_id: str, name: str, source_uri: str, digest: str, context: str) -> None:
        """Record a dataset input by reference: its source URI and digest (no data is loaded)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # a file:// URI matches two equivalent local source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(f"file://{local_path(source_uri)}" if is_local(source_uri) else source_uri)
        dataset = MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file as an artifact of the run."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: dict[str, Any], artifact_file: str) -> None:
        """Store a JSON-serialisable dict as the artifact ``artifact_file`` (e.g. ``lineage.json``) of the run."""
        self.client.log_dict(run_id, obj, artifact_file)

    def end(self, run_id: str, status: Status) -> None:
        """Mark a run ``FINISHED``, ``FAILED`` or ``KILLED`` (ended early on purpose, e.g. a stopped Tune trial)."""
        self.client.set_terminated(run_id, status)


RunRef = Future  # a run id that the background thread will know once the run is created


class BackgroundTracker:
    """A :class:`Tracker` whose calls run on one background thread, in the order they were made.

    MLflow's latency then stays off the stages' critical path: creating a new sqlite database takes about 2.5 s on a
    2-core machine and each call 10-50 ms, while the driver's own work is to keep the workers busy. The methods take
    the :class:`Tracker` methods' arguments, except that a run is named by the :data:`RunRef` that
    :meth:`start_run` returns.

    Args:
        uri: MLflow tracking URI. experiment: experiment name (created if missing).
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow", initializer=background_priority)
        self._tracker = self._pool.submit(Tracker, uri, experiment)
        self._calls: list[Future] = [self._tracker]

    def ready(self) -> None:
        """Wait until the tracking store answers and the experiment exists.

        Raises:
            LifelongError: if the tracking URI cannot be reached (naming it).
        """
        self._tracker.result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)`` after the calls made so before it (any :data:`RunRef` argument is resolved first)."""
        def job() -> Any:
            return fn(*[a.result() if isinstance(a, Future) else a for a in args])

        future = self._pool.submit(job)
        self._calls.append(future)
        return future

    def with_tracker(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(tracker, *args)``, ``tracker`` being the :class:`Tracker` (for calls made through its client)."""
        return self.call(fn, self._tracker, *args)

    def _method(self, name: str, *args: Any) -> Future:
        return self.call(lambda *a: getattr(self._tracker.result(), name)(*a), *args)

    def start_run(self, name: str, tags: dict[str, str], parent: RunRef | None = None) -> RunRef:
        """Queue the creation of a run (a child of ``parent`` if given); the returned future yields its id."""
        return self._method("start_run", name, tags, parent)

    def reopen_run(self, run_id: str) -> RunRef:
        """Queue :meth:`Tracker.reopen_run`; the returned future yields ``run_id``."""
        return self._method("reopen_run", run_id)

    def log_params(self, run: RunRef, params: dict[str, str]) -> None:
        """Queue :meth:`Tracker.log_params`."""
        self._method("log_params", run, params)

    def log_metrics(self, run: RunRef, metrics: dict[str, float], step: int = 0) -> None:
        """Queue :meth:`Tracker.log_metrics`."""
        self._method("log_metrics", run, metrics, step)

    def log_dataset(self, run: RunRef, name: str, source_uri: str, digest: str, context: str) -> None:
        """Queue :meth:`Tracker.log_dataset`."""
        self._method("log_dataset", run, name, source_uri, digest, context)

    def log_artifact(self, run: RunRef, path: Path, artifact_path: str | None = None) -> None:
        """Queue :meth:`Tracker.log_artifact` (the file must stay in place until :meth:`close`)."""
        self._method("log_artifact", run, path, artifact_path)

    def log_dict(self, run: RunRef, obj: dict[str, Any], artifact_file: str) -> None:
        """Queue :meth:`Tracker.log_dict`."""
        self._method("log_dict", run, obj, artifact_file)

    def end(self, run: RunRef, status: Status) -> None:
        """Queue :meth:`Tracker.end`."""
        self._method("end", run, status)

    def flush(self) -> None:
        """Wait until every call queued so far has run (their errors are left to :meth:`check`)."""
        wait(list(self._calls))

    def check(self) -> None:
        """Raise the first error of a call that has finished, if any.

        Raises:
            LifelongError: naming the tracking URI (the tracker's own errors are passed on as they are).
        """
        for future in self._calls:
            if not future.done():
                return
            error = future.exception()
            if error is not None:
                if isinstance(error, LifelongError):
                    raise error
                raise LifelongError(f"MLflow tracking at {self.uri} failed: {str(error).splitlines()[0][:200]}")

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every queued call, stop the thread, and raise the first error (unless ``raise_errors`` is false).

        Raises:
            LifelongError: as :meth:`check`.
        """
        self._pool.shutdown(wait=True)
        if raise_errors:
            self.check()


class MlflowStages(Listener):
    """Listener of the stage engine (``orchestrator/engine.py``): one MLflow child run per stage under ``parent``.

    A stage run records the stage's training shards as dataset inputs (source URI and manifest digest), the parent
    checkpoint and the domains it trained on as params, per-epoch loss and samples/s, the stage's timings, and its
    ``lineage.json``. The pipeline run gets, after each stage k whose row of R is complete, the metrics over the
    domains seen so far (``acc_seen``, ``bwt_seen``, ``forgetting_seen``, on the evaluation split, at step k). Every
    call is queued on the tracker's background thread.

    Args:
        tracker: the run's tracker. parent: the pipeline run. run_id: lifelong's run id (a tag of every stage run).
    """

    def __init__(self, tracker: BackgroundTracker, parent: RunRef, run_id: str) -> None:
        self.tracker, self.parent, self.run_id = tracker, parent, run_id
        self.resumed = False
        self.restored: frozenset[Cell] = frozenset()
        self.runs: dict[int, RunRef] = {}
        self.open: set[int] = set()  # stages whose run has not ended
        self.lineages: dict[int, RunRef] = {}  # each committed stage's lineage.json, read on the tracker's thread
        self.seen = SeenSoFar()
        self.names: list[str] = []
        self.text = False

    def stage_started(self, stage: StageSpec) -> None:
        """Create the stage's run, with its dataset inputs and params; in a resumed run, first mark KILLED a run
        of this stage that an interrupted attempt left RUNNING."""
        k, t = stage.task_id, self.tracker
        if self.resumed:
            t.with_tracker(_end_stale_runs, self.parent, k)
        ref = t.start_run(f"stage-{k}-{stage.domain}", {"lifelong.stage": str(k), "lifelong.domain": stage.domain,
                                                         "lifelong.run_id": self.run_id}, self.parent)
        self.runs[k] = ref
        self.open.add(k)
        for item in stage.lineage["inputs"]:
            t.log_dataset(ref, f"{item['domain']}/train", item["uri"], item["digest"], "training")
        t.log_params(ref, {"stage": str(k), "domain": stage.domain, "parent_checkpoint": stage.parent,
                           "train_domains": ",".join(item["domain"] for item in stage.lineage["inputs"])})

    def progress(self, stage: StageSpec, report: Progress) -> None:
        """Log the epoch's mean loss and samples/s (all workers) at step = epoch."""
        if report.kind == "epoch":
            rate = report.samples * stage.resources.num_workers / max(report.seconds, 1e-9)
            self.tracker.log_metrics(self.runs[stage.task_id], {"loss": report.loss, "samples_per_second": rate},
                                     step=report.epoch)

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Log the stage's timings and its checkpoint's ``lineage.json``, and end its run."""
        ref, train = self.runs[stage.task_id], result.stats.get("train_seconds", float("nan"))
        wall = result.end - result.start
        self.tracker.log_metrics(ref, {"stage_wall_seconds": wall, "train_seconds": train,
                                       "overhead_seconds": wall - train,
                                       "skipped_batches": float(result.stats.get("skipped_batches", 0))})
        self.lineages[stage.task_id] = self.tracker.call(read_lineage, result.checkpoint, stage.storage)
        self.tracker.log_dict(ref, self.lineages[stage.task_id], "lineage.json")
        self.tracker.end(ref, "FINISHED")
        self.open.discard(stage.task_id)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """A stage committed by an earlier attempt: reuse its run (ended FINISHED if the attempt died before ending
        it), or create it as :meth:`stage_started` and :meth:`stage_committed` would have."""
        k = stage.task_id
        lineage = self.tracker.call(read_lineage, result.checkpoint, stage.storage)
        found = self.tracker.with_tracker(_restore_stage_run, self.parent, k, lineage)
        if found.result() is None:
            self.stage_started(stage)
            self.stage_committed(stage, result)
        else:
            self.runs[k], self.lineages[k] = found, lineage

    def stage_failed(self, stage: StageSpec, error: str) -> None:
        """End the stage's run as FAILED."""
        self.tracker.end(self.runs[stage.task_id], "FAILED")
        self.open.discard(stage.task_id)

    def run_started(self, run: RunInfo) -> None:
        """Remember the domains' names (continual evaluation's metric names) and whether they are text; in a
        resumed or extended run, the cells logged already, and the metrics over seen domains already logged
        (those whose leading block of R was restored)."""
        self.names = [d.name for d in run.plan.domains]
        self.text = run.plan.input.text
        self.resumed, self.restored = run.resumed, frozenset(run.restored.cells)
        known = {(c.row, c.col): c.acc for c in run.restored.cells}
        k = 0
        while k < len(self.names) and all((i, j) in known for i in range(k + 1) for j in range(k + 1)):
            self.seen.add(k, [known.get((k, j), math.nan) for j in range(len(self.names))])  # logged before
            k += 1

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """Log continual evaluation to the pipeline run: ``continual_acc.<domain>`` (text: ``continual_ppl.<domain>``)
        at step = the global step."""
        if points:
            values = {f"continual_ppl.{self.names[p.col]}": math.exp(p.nll) for p in points} if self.text else \
                {f"continual_acc.{self.names[p.col]}": p.acc for p in points}
            self.tracker.log_metrics(self.parent, values, step=points[0].global_step)

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Log the metrics over the domains seen so far, once per stage k, in order of k."""
        for k, metrics in self.seen.add(row, [c.acc for c in cells]):
            self.tracker.log_metrics(self.parent, {f"{name}_seen": v for name, v in metrics.items()}, step=k)
        new = [c for c in cells if c not in self.restored]
        if row >= 0 and self.text and new:  # text domains: row i of the perplexity matrix P, one metric per domain
            self.tracker.log_metrics(self.parent, {f"ppl.{self.names[c.col]}": math.exp(c.nll) for c in new},
                                     step=row)

    def run_stopped(self, stage: StageSpec | None, reason: str) -> None:
        """End the run of the stage that was training, if any, as KILLED."""
        if stage is not None and stage.task_id in self.open:
            self.tracker.end(self.runs[stage.task_id], "KILLED")

    def poll(self) -> None:
        """Raise the first MLflow error, if a call has failed."""
        self.tracker.check()


def _end_stale_runs(tracker: Tracker, parent_id: str, k: int) -> None:
    """Mark KILLED the runs of stage k that an interrupted attempt of the pipeline run left RUNNING."""
    for r in tracker.stage_runs(parent_id, k):
        if r.info.status == "RUNNING":
            tracker.end(r.info.run_id, "KILLED")


def _restore_stage_run(tracker: Tracker, parent_id: str, k: int, lineage: dict[str, Any]) -> str | None:
    """The run of a committed stage k: its FINISHED run, else the newest one (which the interrupted attempt never
    ended: it gets the checkpoint's ``lineage.json`` and ends FINISHED), else None."""
    runs = tracker.stage_runs(parent_id, k)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    if not runs:
        return None
    run_id = runs[0].info.run_id
    tracker.log_dict(run_id, lineage, "lineage.json")
    tracker.end(run_id, "FINISHED")
    return run_id
