"""``lifelong tune``: a search over whole pipelines with Ray Tune, chosen on validation data.

A continual-learning hyperparameter (the replay ratio, a masking strength) only shows its worth over the whole
stream, so every trial runs the whole pipeline through the same stage engine as ``lifelong run``
(:func:`orchestrator.dag.run`), with one more listener, :class:`TuneReporter`. After each domain k it reports the
metrics over the domains seen so far, on each domain's ``val`` split: Ray Tune's ASHA scheduler, whose time axis is
*domains finished*, stops a trial that forgets badly on its early domains. A trial never reads a ``test`` split (its
evaluation is forced to ``val``); the best configuration's test metrics come only from ``lifelong run`` on the
exported YAML.

Data path, in one place:

1. :func:`check_tune` and :func:`check_space` refuse a bad ``tune:`` section before anything starts: every value at
   the bounds of every dimension is applied as ``--set`` would and the resulting pipeline validated, so an unknown
   key or a value out of range names its key.
2. :func:`start_tune` (driver): shards are built once, the tune run is created in MLflow, and each trial is a Tune
   function trainable (:func:`run_trial`) reserving a placement group for its own driver, its training workers and
   its evaluation actors (:func:`trial_bundles`), which its actors are captured into.
3. Each trial's pipeline run is an MLflow child of the tune run, and the parent of its stage runs; it records its
   sampled values as ``tune.<key>`` params and its seen-so-far metrics per domain (``orchestrator/lineage.py``).
4. :class:`Leaderboard` (a Tune callback on the driver) prints each trial's reports as they come;
   :func:`summarise` builds the final leaderboard from Tune's results, and :func:`export_best` writes the best
   configuration as a runnable pipeline YAML without its ``tune:`` section.

``--resume DIR`` continues an interrupted search with ``Tuner.restore``; finished trials are not run again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from orchestrator.engine import Cell, Listener, RunInfo, RunStopped
from orchestrator.errors import LifelongError, SpecError, one_line
from orchestrator.metrics import SeenSoFar
from orchestrator.redact import hide_secrets, redact_uri, restore_secrets
from orchestrator.spec import (Dimension, Pipeline, TuneSpec, apply_overrides, bind, load_pipeline, parse_yaml,
                               set_value, validate_raw)
from orchestrator.storage import Storage

SETTINGS_FILE = "lifelong-tune.json"
LEADERBOARD_FILE = "leaderboard.json"


# ---------------------------------------------------------------------------------------------------------------
# 1. Checks before anything starts


def trial_pipeline(base: Pipeline, values: Mapping[str, Any], source: str) -> Pipeline:
    """The pipeline a trial runs: ``base`` without its ``tune:`` section, each sampled value set at its dotted key
    (the rules of ``--set``), evaluated on the ``val`` splits, validated and its strategies bound.

    Raises:
        SpecError: a key that cannot be set, or a value that fails validation (naming the field).
    """
    raw = base.model_dump(mode="python", exclude={"tune"})
    for key, value in values.items():
        set_value(raw, key, value, source)
    raw["evaluation"]["split"] = "val"
    if raw["evaluation"].get("max_lag") is None:
        raw["evaluation"]["max_lag"] = 0  # report domain k before stage k+1: a stopped trial trains no further
    pipeline = validate_raw(raw, source)
    bind(pipeline, source)
    return pipeline


def check_tune(pipeline: Pipeline, source: str) -> TuneSpec:
    """The pipeline's ``tune:`` section, refused if the search could not score its trials.

    Raises:
        SpecError: no ``tune:`` section; evaluation disabled; ``training.executor`` other than ``group``; a domain
            whose source keeps no val split (``source.val_fraction`` 0).
    """
    t = pipeline.tune
    if t is None:
        raise SpecError(source, [("tune", "missing: `lifelong tune` needs a tune: section with a search space")])
    if not pipeline.evaluation.enabled:
        raise SpecError(source, [("evaluation.enabled", "a search scores its trials on the evaluation; set true")])
    if pipeline.training.executor != "group":
        raise SpecError(source, [("training.executor", "trials run with the group executor; remove "
                                  "training.executor or set it to group")])
    for i, d in enumerate(pipeline.domains):
        if d.source is not None and d.source.val_fraction == 0:
            raise SpecError(source, [("tune.metric", f"{t.metric} is computed on the val split, and domains.{i} "
                                      f"({d.name}) keeps none (source.val_fraction: 0)")])
    return t


def check_space(pipeline: Pipeline, source: str) -> None:
    """Apply every value that bounds each dimension of the search space (:meth:`Dimension.probe_values`) to the
    pipeline, one at a time, and validate the result.

    Raises:
        SpecError: ``tune.space.<key>: value <v>: <field>: <problem>`` for the first value refused.
    """
    assert pipeline.tune is not None
    for key, dim in pipeline.tune.space.items():
        for value in dim.probe_values():
            try:
                trial_pipeline(pipeline, {key: value}, source)
            except SpecError as e:
                problems = "; ".join(f"{p}: {m}" if p else m for p, m in e.problems)
                raise SpecError(source, [(f"tune.space.{key}", f"value {value!r}: {problems}")]) from None


def check_val_rows(domains: Sequence[Any], metric: str) -> None:
    """Refuse domains whose shards have no val rows (the objective is computed on val only).

    Raises:
        SpecError: naming the first such domain.
    """
    for i, d in enumerate(domains):
        rows = d.manifest.get("splits", {}).get("val", {}).get("rows", 0)
        if rows <= 0:
            raise SpecError("tune.metric", [("", f"{metric} is computed on the val split, and domains.{i} "
                                             f"({d.name}) has no val rows at {d.uri}")])


# ---------------------------------------------------------------------------------------------------------------
# 2. The trial


@dataclass(frozen=True)
class TrialSettings:
    """What every trial needs, sent once to the trials (``tune.with_parameters``).

    Attributes:
        base: the validated pipeline, with its ``tune:`` section. workdir: absolute working folder (runs, shards,
            mlflow.db). data_root: folder of raw datasets, or None. tracking_uri: MLflow tracking URI (absolute).
        tune_run_id: the MLflow tune run that each trial's run is a child of. search_from: folders near which
            ``shared/data`` is looked for. threads_per_worker: torch threads of each trial's workers when the
            pipeline leaves them unset (the cluster's CPUs shared among the concurrent trials).
    """

    base: Pipeline
    workdir: Path
    data_root: str | None
    tracking_uri: str
    tune_run_id: str
    search_from: tuple[Path, ...]
    threads_per_worker: int


def objective(metrics: Mapping[str, float], tune: TuneSpec) -> float:
    """The value a search maximises, from :func:`orchestrator.metrics.seen_metrics`'s ``acc`` and ``forgetting``
    (fractions in [0, 1]): ``acc`` or ``acc - forgetting_weight * forgetting``."""
    if tune.metric == "acc_minus_forgetting":
        return metrics["acc"] - tune.forgetting_weight * metrics["forgetting"]
    return metrics["acc"]


class TuneReporter(Listener):
    """Listener of the stage engine: after each domain k whose rows R[0..k] are complete, report the val metrics
    over the domains seen so far (``domains`` = k + 1, ``val_acc``, ``val_forgetting``, ``val_bwt``,
    ``objective``) through ``report`` (``ray.tune.report``), once the run's MLflow records so far are written.

    When the trial's scheduler stops the trial, ``ray.tune.report`` raises ``SystemExit`` in the trial's thread;
    it is turned into :class:`orchestrator.engine.RunStopped`, which ends the run with its MLflow runs KILLED. The
    last domain's metrics are kept in :attr:`final` instead of being reported: the trial reports them once the run
    has written its report, so that a scheduler's decision on the last domain cannot cut the run short.

    Args:
        tune: the search's settings (objective). report: called with each domain's metrics.
    """

    def __init__(self, tune: TuneSpec, report: Callable[[dict[str, float]], None]) -> None:
        self.tune, self.report = tune, report
        self.seen = SeenSoFar()
        self.num_domains = 0
        self.flush: Callable[[], None] = lambda: None
        self.final: dict[str, float] | None = None

    def run_started(self, run: RunInfo) -> None:
        """Remember T and how to flush the run's records."""
        self.num_domains, self.flush = run.plan.num_stages, run.flush

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Report every domain whose seen-so-far metrics are now complete, in order."""
        for k, m in self.seen.add(row, [c.acc for c in cells]):
            result = {"domains": k + 1, "val_acc": m["acc"], "val_forgetting": m["forgetting"], "val_bwt": m["bwt"],
                      "objective": objective(m, self.tune)}
            if k + 1 == self.num_domains:
                self.final = result
                continue
            self.flush()
            try:
                self.report(result)
            except SystemExit:
                raise RunStopped(f"stopped by the search's scheduler after {k + 1} domain(s)") from None


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """A Tune function trainable: run the pipeline with ``config``'s values (dotted key → value) through the stage
    engine, reporting after each domain (the last one once the run is complete) with the Ray node the trial runs on
    (``node_id``). A trial stopped by the scheduler ends quietly.

    Raises:
        LifelongError: the pipeline's own errors (Tune records them as the trial's error).
    """
    import ray
    from ray import tune
    from rich.console import Console

    from orchestrator.dag import RunOptions, run

    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, float]) -> None:
        tune.report({**metrics, "node_id": node_id})

    values = dict(config)
    if settings.base.training.threads_per_worker is None:
        values.setdefault("training.threads_per_worker", settings.threads_per_worker)
    pipeline = trial_pipeline(settings.base, values, f"trial {trial_id}")
    assert settings.base.tune is not None
    reporter = TuneReporter(settings.base.tune, report)
    options = RunOptions(workdir=settings.workdir, data_root=settings.data_root, tracking_uri=settings.tracking_uri,
                         search_from=list(settings.search_from), console=Console(stderr=True),
                         show_progress=False, mlflow_parent=settings.tune_run_id, run_name=f"trial-{trial_id}",
                         run_params={f"tune.{k}": str(v) for k, v in config.items()}, listeners=[reporter],
                         register=False)  # trial models would flood the registry; the exported best is run
    try:
        run(pipeline, options)
    except RunStopped:
        return
    if reporter.final is not None:
        report(reporter.final)


def trial_bundles(pipeline: Pipeline) -> list[dict[str, float]]:
    """The placement group of one trial: its own driver (``tune.trial_cpus``), then one bundle per training worker
    (``training.cpus_per_worker``, one GPU each with ``use_gpu``, ``training.resources``) and per evaluation actor
    (``evaluation.cpus_per_actor``, ``evaluation.resources``). The trial's actors are scheduled into it, so Tune's
    accounting is exact."""
    assert pipeline.tune is not None
    t, e = pipeline.training, pipeline.evaluation
    worker = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {}), **t.resources}
    return [{"CPU": pipeline.tune.trial_cpus}, *[dict(worker) for _ in range(t.num_workers)],
            *[{"CPU": e.cpus_per_actor, **e.resources} for _ in range(e.num_actors)]]


def check_trial_fits(bundles: list[dict[str, float]], cluster: Mapping[str, float]) -> int:
    """How many trials fit the cluster at once (at least 1).

    Raises:
        LifelongError: if one trial's placement group is larger than the whole cluster (Ray would wait forever).
    """
    cpus = sum(b.get("CPU", 0.0) for b in bundles)
    gpus = sum(b.get("GPU", 0.0) for b in bundles)
    if cpus > cluster.get("CPU", 0.0) + 1e-9 or gpus > cluster.get("GPU", 0.0) + 1e-9:
        raise LifelongError(f"one trial reserves {cpus:g} CPUs and {gpus:g} GPUs (tune.trial_cpus + training."
                            f"num_workers x training.cpus_per_worker + evaluation.num_actors x evaluation."
                            f"cpus_per_actor), more than this Ray cluster's {cluster.get('CPU', 0.0):g} CPUs and "
                            f"{cluster.get('GPU', 0.0):g} GPUs; lower them")
    fits = cluster.get("CPU", 0.0) / cpus if cpus else math.inf
    return max(1, int(fits))


# ---------------------------------------------------------------------------------------------------------------
# 3. The search on the driver


def search_space(tune: TuneSpec) -> dict[str, Any]:
    """Ray Tune's ``param_space`` for the dimensions (``search: grid`` enumerates choices too)."""
    from ray import tune as rt

    def one(d: Dimension) -> Any:
        grid = d.grid_values(tune.search)
        if grid is not None:
            return rt.grid_search(grid)
        if d.choice is not None:
            return rt.choice(list(d.choice))
        if d.uniform is not None:
            return rt.uniform(*d.uniform)
        if d.loguniform is not None:
            return rt.loguniform(*d.loguniform)
        assert d.randint is not None
        return rt.randint(*d.randint)

    return {key: one(d) for key, d in tune.space.items()}


def expected_trials(tune: TuneSpec) -> int:
    """How many trials the search runs: ``num_samples`` times every combination of its grid dimensions (of its
    choices too with ``search: grid``)."""
    n = tune.num_samples
    for d in tune.space.values():
        n *= len(d.grid_values(tune.search) or [None])
    return n


def search_algorithm(tune: TuneSpec, seed: int, concurrent: int) -> Any:
    """Ray Tune's searcher, running at most ``concurrent`` trials at once: the variant generator (random and grid)
    or Optuna's TPE (Ray Tune ignores ``TuneConfig.max_concurrent_trials`` for a variant generator passed in).

    Raises:
        LifelongError: ``search: optuna`` without the optuna package.
    """
    if tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise LifelongError("tune.search: optuna needs the optuna package: pip install 'lifelong[optuna]'") \
                from None
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric="objective", mode="max", seed=seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)


def scheduler(tune: TuneSpec, num_domains: int) -> Any:
    """ASHA over *domains finished* (``max_t`` = T; a trial that reaches T ends as it would anyway), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not tune.asha.enabled or num_domains < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="domains", max_t=num_domains, grace_period=min(tune.asha.grace_period,
                         num_domains), reduction_factor=tune.asha.reduction_factor, stop_last_trials=False)


class Leaderboard(Callback):
    """Tune callback on the driver: one line per trial report and per trial end, as they happen (on stderr)."""

    def __init__(self, num_domains: int) -> None:
        self.num_domains = num_domains

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        """Print the trial's domain report."""
        print(f"trial {trial.trial_id}  domain {result.get('domains')}/{self.num_domains}  val ACC "
              f"{result.get('val_acc', float('nan')):.4f}  forgetting {result.get('val_forgetting', float('nan')):.4f}"
              f"  objective {result.get('objective', float('nan')):.4f}  {describe(trial.config)}", file=sys.stderr,
              flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Print how the trial ended."""
        done = (trial.last_result or {}).get("domains", 0)
        how = "finished" if done == self.num_domains else f"stopped early after {done} domain(s)"
        print(f"trial {trial.trial_id}  {how}", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """Print the trial's failure."""
        print(f"trial {trial.trial_id}  failed: see {trial.local_path}", file=sys.stderr, flush=True)


def describe(config: Mapping[str, Any]) -> str:
    """``key=value`` pairs of a trial's sampled values, floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


@dataclass(frozen=True)
class TrialRow:
    """One line of the final leaderboard.

    Attributes:
        trial_id: Tune's id. config: the sampled values. domains: domains finished. val_acc, val_forgetting,
            objective: the last report's (NaN before the first). status: ``finished``, ``stopped early`` or
            ``error``. node_id: the Ray node the trial ran on ("" before its first report). error: an errored
            trial's innermost message (:func:`orchestrator.errors.one_line`; "" otherwise; the whole traceback is in
            the trial's ``error.txt``).
    """

    trial_id: str
    config: Mapping[str, Any]
    domains: int
    val_acc: float
    val_forgetting: float
    objective: float
    status: str
    node_id: str = ""
    error: str = ""


@dataclass(frozen=True)
class TuneSummary:
    """The outcome of a search.

    Attributes:
        rows: the leaderboard, best first (finished trials first, then by objective). best: the best finished
            trial, or None. experiment_dir: Tune's experiment folder. tune_run_id: the MLflow tune run.
            domains_run: trial-domains trained; domains_saved: trial-domains that stopped trials did not train.
            wall_seconds: the search's wall time on the driver.
    """

    rows: tuple[TrialRow, ...]
    best: TrialRow | None
    experiment_dir: Path
    tune_run_id: str
    domains_run: int
    domains_saved: int
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The leaderboard as ``leaderboard.json`` and ``lifelong tune --json`` give it (JSON-ready values, paths
        as strings)."""
        return {"best": self.best.__dict__ if self.best else None, "rows": [r.__dict__ for r in self.rows],
                "domains_run": self.domains_run, "domains_saved": self.domains_saved,
                "wall_seconds": self.wall_seconds, "experiment_dir": str(self.experiment_dir),
                "tune_run_id": self.tune_run_id}


def summarise(results: Any, num_domains: int, experiment_dir: Path, tune_run_id: str) -> TuneSummary:
    """The final leaderboard from Ray Tune's ``ResultGrid``."""
    rows = []
    for r in results:
        m = r.metrics or {}
        done = int(m.get("domains", 0))
        status = "error" if r.error else ("finished" if done == num_domains else "stopped early")
        rows.append(TrialRow(str(m.get("trial_id") or Path(str(r.path)).name), dict(r.config or {}), done,
                             float(m.get("val_acc", math.nan)), float(m.get("val_forgetting", math.nan)),
                             float(m.get("objective", math.nan)), status, str(m.get("node_id", "")),
                             one_line(str(r.error)) if r.error else ""))
    rows.sort(key=lambda row: (row.status != "finished", math.inf if math.isnan(row.objective) else -row.objective))
    finished = [row for row in rows if row.status == "finished"]
    return TuneSummary(tuple(rows), finished[0] if finished else None, experiment_dir, tune_run_id,
                       domains_run=sum(row.domains for row in rows),
                       domains_saved=sum(num_domains - row.domains for row in rows if row.status == "stopped early"))


def export_best(raw: dict[str, Any], best: TrialRow, path: Path, note: str) -> Path:
    """Write the best trial's pipeline as YAML at ``path`` (atomically): the user's spec without ``tune:``, with
    the trial's values set at their keys (the evaluation split stays the user's, ``test`` by default). Secrets are
    left out (S3 keys, a URI's password; a comment names them): the file runs with them taken from the environment.

    Raises:
        StorageError: if ``path`` already exists (nothing written is ever overwritten).
    """
    spec, removed = hide_secrets(json.loads(json.dumps(raw)), drop=True)
    spec.pop("tune", None)
    for key, value in best.config.items():
        set_value(spec, key, value, "--export")
    validate_raw(spec, str(path))
    if removed:
        note += (f"\n# secrets left out (lifelong never writes them): {', '.join(removed)}; the AWS_* and "
                 "MLFLOW_TRACKING_* environment variables supply them")
    text = f"# {note}\n" + yaml.safe_dump(spec, sort_keys=False)
    Storage.from_settings().write_bytes(str(path), text.encode())
    return path


@dataclass(frozen=True)
class TuneRequest:
    """What the user asked for, saved in the experiment folder so that ``--resume`` rebuilds the same search.

    Attributes:
        yaml_text: the pipeline YAML as read. overrides: the ``--set`` items. source: the YAML's path (messages).
        spec_sha256: the validated pipeline's hash, checked on resume.
    """

    yaml_text: str
    overrides: tuple[str, ...]
    source: str
    spec_sha256: str = ""

    def raw(self) -> Any:
        """The spec as parsed, overrides applied (as :func:`orchestrator.spec.load_pipeline` does).

        Raises:
            SpecError: malformed YAML or a bad override.
        """
        raw = parse_yaml(self.yaml_text, self.source)
        return apply_overrides(raw, list(self.overrides)) if isinstance(raw, dict) else raw

    def pipeline(self) -> Pipeline:
        """The validated pipeline.

        Raises:
            SpecError: as :func:`orchestrator.spec.load_pipeline`.
        """
        return validate_raw(self.raw(), self.source)


def write_request(request: TuneRequest, experiment_dir: Path, extra: Mapping[str, Any]) -> None:
    """Save the request and ``extra`` (the MLflow tune run, the workdir) as ``lifelong-tune.json``: the spec with
    its ``--set`` overrides applied and its secrets masked (:func:`orchestrator.redact.hide_secrets`)."""
    blob = {"spec": hide_secrets(request.raw())[0], "source": request.source, "spec_sha256": request.spec_sha256,
            **extra}
    Storage.from_settings().write_bytes(str(experiment_dir / SETTINGS_FILE), json.dumps(blob, indent=1).encode())


def read_request(experiment_dir: Path) -> tuple[TuneRequest, dict[str, Any]]:
    """The saved request of a search and its extra fields; the secrets it masked are taken again from the spec
    file it was started from, if that still exists (else from the environment).

    Raises:
        LifelongError: ``--resume <dir>``: not a search folder of ``lifelong tune``, or its spec changed.
    """
    path = experiment_dir / SETTINGS_FILE
    try:
        blob = json.loads(path.read_text())
        if "yaml_text" in blob:  # saved by lifelong before secrets were masked there: the spec as written
            blob["spec"] = TuneRequest(blob.pop("yaml_text"), tuple(blob.pop("overrides")), blob["source"]).raw()
        masked, source, sha = blob.pop("spec"), blob.pop("source"), blob.pop("spec_sha256")
    except (OSError, ValueError, KeyError) as e:
        raise LifelongError(f"--resume {experiment_dir}: not a lifelong tune folder ({SETTINGS_FILE}: "
                            f"{getattr(e, 'strerror', None) or e})") from None
    if validate_raw(masked, str(path)).spec_hash() != sha:
        raise LifelongError(f"--resume {experiment_dir}: the saved spec no longer validates to the same pipeline")
    try:
        secrets = load_pipeline(source).model_dump() if Path(source).is_file() else None
    except LifelongError:
        secrets = None
    raw = restore_secrets(masked, secrets)
    return TuneRequest(yaml.safe_dump(raw, sort_keys=False), (), source, sha), blob


def timestamp() -> str:
    """``YYYYmmdd-HHMMSS`` of now, local time."""
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------------------------
# 4. The driver: `lifelong tune`


class SearchInterrupted(Exception):
    """The search was stopped (Ctrl+C / SIGINT) before every trial ended; ``--resume`` continues it."""


@dataclass(frozen=True)
class TuneOptions:
    """Where and how to run a search.

    Attributes:
        workdir: working folder (runs, shards, mlflow.db, and the searches under ``<workdir>/tune``).
        data_root: folder of raw datasets, or None. tracking_uri: MLflow tracking URI, or None for the pipeline's or
            ``sqlite:///<workdir>/mlflow.db``. address: the Ray cluster (see :func:`orchestrator.dag.init_ray`).
        search_from: folders near which ``shared/data`` is looked for. export: where to write the best config's
            YAML, or None.
    """

    workdir: Path
    data_root: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    search_from: tuple[Path, ...] = ()
    export: Path | None = None


def run_tune(request: TuneRequest, options: TuneOptions, resume_dir: Path | None = None) -> TuneSummary:
    """Run (or, with ``resume_dir``, continue) a search and return its leaderboard.

    Raises:
        SpecError: a bad ``tune:`` section (before any trial starts).
        LifelongError: bad shards, a trial larger than the cluster, an existing ``--export`` file, an unreachable
            tracking URI, or no trial that finished every domain.
        SearchInterrupted: the search was stopped (SIGINT) before every trial ended; its state is saved.
    """
    import ray

    from orchestrator.dag import RunOptions, init_ray, prepare_domains

    start = time.time()
    pipeline = request.pipeline()
    t = check_tune(pipeline, request.source)
    check_space(pipeline, request.source)
    if options.export is not None and options.export.exists():
        raise LifelongError(f"--export {options.export}: the file exists; choose a new name")
    run_options = RunOptions(workdir=options.workdir, data_root=options.data_root, search_from=list(
        options.search_from))
    domains = prepare_domains(pipeline, run_options, Storage.from_settings(pipeline.storage.s3),
                              lambda m: print(m, file=sys.stderr))
    check_val_rows(domains, t.metric)
    init_ray(options.address)
    bundles = trial_bundles(pipeline)
    cluster = ray.cluster_resources()
    concurrent = min(t.max_concurrent_trials, check_trial_fits(bundles, cluster))
    threads = max(1, int(cluster.get("CPU", 1) // (concurrent * pipeline.training.num_workers)))
    experiment_dir, tune_run_id, tracker = _tune_run(request, pipeline, options, resume_dir)
    settings = TrialSettings(pipeline, options.workdir, options.data_root, tracker.uri, tune_run_id,
                             options.search_from, threads)
    # Tune saves the search's state at most this often (default: every 10 s or more); an interrupted search then
    # loses no trial that had ended a second before.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    results = _tuner(pipeline, t, settings, bundles, concurrent, experiment_dir, resume_dir is not None).fit()
    ended, expected = results.num_terminated + results.num_errors, expected_trials(t)
    if ended < expected:
        raise SearchInterrupted(f"search interrupted with {ended} of {expected} trials ended; continue it with "
                                f"`lifelong tune --resume {experiment_dir}`")
    summary = summarise(results, len(pipeline.domains), experiment_dir, tune_run_id)
    summary = replace(summary, wall_seconds=time.time() - start)
    _finish(summary, request, options, tracker)
    return summary


def _tune_run(request: TuneRequest, pipeline: Pipeline, options: TuneOptions,
              resume_dir: Path | None) -> tuple[Path, str, Any]:
    """The experiment folder and the MLflow tune run: new ones, or those of the search being resumed."""
    from orchestrator.lineage import Tracker, tracking_target
    from orchestrator.spec import flatten

    uri, experiment = tracking_target(pipeline, options.tracking_uri, options.workdir)
    tracker = Tracker(uri, experiment)
    if resume_dir is not None:
        return resume_dir, read_request(resume_dir)[1]["tune_run_id"], tracker
    name = f"{pipeline.name}-{timestamp()}"
    experiment_dir = (options.workdir / "tune" / name).resolve()
    experiment_dir.mkdir(parents=True)
    assert pipeline.tune is not None
    run_id = tracker.start_run(f"tune-{name}", {"lifelong.tune_dir": str(experiment_dir),
                                                "lifelong.spec_sha256": pipeline.spec_hash()})
    tracker.log_params(run_id, flatten(pipeline.model_dump(mode="json", exclude_none=True)))
    write_request(TuneRequest(request.yaml_text, request.overrides, request.source, pipeline.spec_hash()),
                  experiment_dir, {"tune_run_id": run_id, "tracking_uri": redact_uri(uri)})
    return experiment_dir, run_id, tracker


def _tuner(pipeline: Pipeline, t: TuneSpec, settings: TrialSettings, bundles: list[dict[str, float]],
           concurrent: int, experiment_dir: Path, resume: bool) -> Any:
    """Ray Tune's ``Tuner`` for the search (restored from ``experiment_dir`` when resuming)."""
    from ray import tune as rt

    trainable = rt.with_resources(rt.with_parameters(run_trial, settings=settings),
                                  rt.PlacementGroupFactory(bundles))
    if resume:
        return rt.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True, resume_errored=True)
    seed = pipeline.seed if t.seed is None else t.seed
    return rt.Tuner(trainable, param_space=search_space(t),
                    tune_config=rt.TuneConfig(metric="objective", mode="max", num_samples=t.num_samples,
                                              search_alg=search_algorithm(t, seed, concurrent),
                                              scheduler=scheduler(t, len(pipeline.domains))),
                    run_config=rt.RunConfig(name=experiment_dir.name, storage_path=str(experiment_dir.parent),
                                            callbacks=[Leaderboard(len(pipeline.domains))], verbose=0))


def _finish(summary: TuneSummary, request: TuneRequest, options: TuneOptions, tracker: Any) -> None:
    """Write the leaderboard, close the MLflow runs (a stopped trial's runs end KILLED) and export the best."""
    path = summary.experiment_dir / LEADERBOARD_FILE
    Storage.from_settings().write_bytes(str(path), json.dumps(summary.to_json(), indent=1, default=str).encode(),
                                        overwrite=True)
    _end_stopped_runs(tracker, summary.tune_run_id)
    run_id = summary.tune_run_id
    tracker.log_metrics(run_id, {"trials": len(summary.rows), "trial_domains_run": summary.domains_run,
                                 "trial_domains_saved": summary.domains_saved, "wall_seconds": summary.wall_seconds})
    if summary.best is not None:
        tracker.log_metrics(run_id, {"best_val_acc": summary.best.val_acc, "best_objective": summary.best.objective})
        tracker.log_params(run_id, {f"best.{k}": str(v) for k, v in summary.best.config.items()})
    tracker.log_artifact(run_id, path)
    if options.export is not None and summary.best is not None:
        export_best(request.raw(), summary.best, options.export,
                    f"best trial {summary.best.trial_id} of lifelong tune {summary.experiment_dir} (val objective "
                    f"{summary.best.objective:.4f}); its test metrics come from `lifelong run` on this file")
        tracker.log_artifact(run_id, options.export)
    tracker.end(run_id, "FINISHED" if summary.best is not None else "FAILED")
    if summary.best is None:
        raise LifelongError(f"no trial of {summary.experiment_dir} finished every domain; see {path}")


def _end_stopped_runs(tracker: Any, tune_run_id: str) -> None:
    """Mark KILLED the trial runs, and their stage runs, still RUNNING after the search (a trial stopped by its
    scheduler is ended by Ray Tune, possibly before its own last MLflow call)."""
    client = tracker.client
    parents = [tune_run_id]
    while parents:
        runs = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parents.pop()}'")
        parents += [r.info.run_id for r in runs]
        for r in runs:
            if r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, "KILLED")
