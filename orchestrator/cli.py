"""The ``lifelong`` command line.

Errors caused by the user's input print one line naming the culprit and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import LifelongError, SpecError
from orchestrator.redact import redact_text
from orchestrator.spec import FILE_KINDS, Pipeline, SourceSpec, load_pipeline, read_spec_file

if TYPE_CHECKING:
    from orchestrator.dag import RunOptions
    from orchestrator.resume import Resumption
    from orchestrator.tuning import TuneSummary

app = typer.Typer(help="Ray-distributed continual training: pipelines of domains, CL strategies, MLflow lineage.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # help texts hold literal [brackets]: [default: ...]
shards_app = typer.Typer(help="Build and inspect domain shards (Parquet + manifest.json).", no_args_is_help=True)
app.add_typer(shards_app, name="shards")

DEFAULT_PIPELINE = "default_pipeline.yaml"
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Working folder for runs, shards and mlflow.db.")]
DataRootOpt = Annotated[Optional[str], typer.Option(
    "--data-root", help="Folder of raw datasets [default: $LIFELONG_DATA_ROOT, else ../shared/data beside the checkout].")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec field: dotted.key=value (repeatable).")]
RunIdArg = Annotated[str, typer.Argument(help="The run's id: its folder's name under <workdir>/<pipeline>/, printed "
                                              "when it started.")]
ProgressOpt = Annotated[bool, typer.Option(
    "--progress/--no-progress", help="Show the progress bar (--no-progress: one line per stage instead).")]
AddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:PORT [default: $RAY_ADDRESS, else a "
    "local Ray started for this run].")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the final report as one JSON object on stdout.")]


def stderr_console() -> Console:
    """A Rich console on stderr. Into a file or a pipe (a job's log, ``2> log``) it is 200 columns wide, so that
    tables keep their columns whole (Rich's width there is 80)."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)


def _scenario(spec: Pipeline) -> str:
    """The pipeline's scenario as printed: ``language modelling`` for a language model, else its ``scenario``."""
    from orchestrator.spec import LANGUAGE_MODELS

    return "language modelling" if spec.model.name in LANGUAGE_MODELS else spec.scenario


def _fail(err: Exception) -> None:
    """Print ``err`` as the one ``error:`` line (a password in any URI it names is ``***``) and exit with code 2."""
    Console(stderr=True).print(f"[bold red]error:[/bold red] {redact_text(str(err))}", highlight=False,
                               soft_wrap=True)
    raise typer.Exit(code=2)


def _pipeline_path(pipeline: Optional[Path]) -> Path:
    if pipeline is not None:
        return pipeline
    return Path(str(files("orchestrator") / DEFAULT_PIPELINE))


@app.command()
def run(
    pipeline: Annotated[Optional[Path], typer.Argument(help="Pipeline YAML [default: the embedded digits demo].")] = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    workdir: WorkdirOpt = Path("lifelong-runs"),
    data_root: DataRootOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow tracking URI [default: sqlite:///<workdir>/mlflow.db].")] = None,
    progress: ProgressOpt = True,
    address: AddressOpt = None,
    run_name: Annotated[Optional[str], typer.Option(
        "--run-name", help="Name of the run's MLflow parent run [default: <pipeline>-<run id>; a submitted job's "
        "id].")] = None,
) -> None:
    """Run a continual-training pipeline: one stage per domain on Ray, with evaluation beside it. Without
    --address (and $RAY_ADDRESS), a local Ray instance is started for the run (the dry run); with a running
    cluster (`ray start --head`), the run skips Ray's own start and stop."""
    from orchestrator.dag import RunOptions
    from orchestrator.spec import bind

    imports_done = time.time()
    path = _pipeline_path(pipeline)
    console = stderr_console()
    try:
        spec = load_pipeline(path, set_ or [])
        bind(spec, str(path))
    except LifelongError as e:
        _fail(e)
    options = RunOptions(workdir=workdir.resolve(), data_root=data_root, tracking_uri=tracking_uri, address=address,
                         search_from=[path.resolve().parent, Path.cwd()], console=console, show_progress=progress,
                         run_name=run_name, spec_file=path, overrides=tuple(set_ or []))
    console.print(f"[bold]lifelong run[/bold] {spec.name}: {len(spec.domains)} domains, {_scenario(spec)}, "
                  f"strategy {spec.strategy_label()}, {spec.training.num_workers} worker(s)")
    _run_and_report(spec, options, json_out, imports_done)


def _run_and_report(spec: Pipeline, options: RunOptions, json_out: bool, imports_done: float,
                    resumption: Resumption | None = None) -> None:
    """Run (or continue) a pipeline, shut Ray down, and print the report (and with ``json_out`` its JSON)."""
    from orchestrator.dag import run as run_pipeline
    from orchestrator.report import print_report

    console = options.console
    try:
        report = run_pipeline(spec, options, resumption)
    except LifelongError as e:
        _fail(e)
    except KeyboardInterrupt:  # Ctrl+C, or `lifelong stop` of a submitted job (SIGINT)
        console.print("[bold yellow]run stopped[/bold yellow] (interrupted); its MLflow runs, if any, end KILLED; "
                      "lifelong resume RUN_ID continues it", highlight=False)
        raise typer.Exit(code=130) from None
    finally:
        import ray

        shutdown_start = time.time()
        if ray.is_initialized():
            ray.shutdown()
    report["timeline"].update(imports_done=imports_done, shutdown_start=shutdown_start, shutdown_end=time.time())
    print_report(report, console)
    console.print(f"run folder: {report['run_dir']}\nMLflow: {report['tracking_uri']} run {report['mlflow_run_id']}")
    if json_out:
        keys = ("pipeline", "strategy", "scenario", "domains", "R", "b", "acc", "bwt", "fwt", "forgetting",
                "avg_forgetting", "wall_seconds", "mlflow_run_id", "run_id", "run_dir", "tracking_uri", "stages",
                "timeline", "P", "P_b", "avg_ppl", "ppl_rise", "ppl_forgetting", "avg_ppl_forgetting", "ppl_fwt",
                "bits_per_token", "skipped_batches")
        typer.echo(json.dumps({k: report[k] for k in keys if k in report}))


@app.command()
def resume(run_id: RunIdArg, set_: SetOpt = None, workdir: WorkdirOpt = Path("lifelong-runs"),
           data_root: DataRootOpt = None, progress: ProgressOpt = True, address: AddressOpt = None,
           json_out: JsonOpt = False) -> None:
    """Continue an interrupted run (a killed driver, a failed stage, an outage that outlasted the retries) from its
    last committed stage, in the same run folder and MLflow run: committed stages and computed cells of R are not
    run again. Refused if the pipeline's YAML changed since the run started; --set may change only how the run is
    carried out (training.on_nonfinite, training.max_failures, evaluation.num_actors, ...)."""
    _continue(run_id, set_ or [], [], workdir, data_root, progress, address, json_out)


@app.command()
def extend(run_id: RunIdArg, domain: Annotated[list[str], typer.Option(
               "--domain", help="A domain to append: NAME=URI of its shards (repeatable, in stream order).")],
           workdir: WorkdirOpt = Path("lifelong-runs"), data_root: DataRootOpt = None, progress: ProgressOpt = True,
           address: AddressOpt = None, json_out: JsonOpt = False) -> None:
    """Append domains to a finished run: each new stage starts from the run's last checkpoint and strategy state,
    the old checkpoints are evaluated on the new domains, and the report, R and MLflow lineage cover the whole
    stream, under the same MLflow run."""
    pairs = []
    for item in domain:
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            _fail(LifelongError(f"--domain {item}: expected NAME=URI"))
        pairs.append((name.strip(), uri.strip()))
    _continue(run_id, [], pairs, workdir, data_root, progress, address, json_out)


@app.command()
def watch(prefix: Annotated[str, typer.Argument(help="Where new domains land: PREFIX/<name>/manifest.json (an s3:// "
                                                     "URI or a folder).")],
          run_id: Annotated[str, typer.Option("--run", help="The finished run to extend (its id).")],
          interval: Annotated[float, typer.Option("--interval", min=0.1,
                                                  help="Seconds between two looks at the prefix.")] = 30.0,
          workdir: WorkdirOpt = Path("lifelong-runs"), data_root: DataRootOpt = None, progress: ProgressOpt = True,
          address: AddressOpt = None) -> None:
    """Extend a finished run whenever new domains land under PREFIX: every --interval seconds, the folders under
    PREFIX whose manifest.json is committed and whose domain the run lacks are appended, in name order, as `lifelong
    extend` would. A domain still being written (no manifest yet) is never taken. Stops cleanly on Ctrl+C
    (SIGINT) or SIGTERM."""
    from orchestrator.resume import find_run, read_record, run_pipeline_raw
    from orchestrator.storage import Storage
    from orchestrator.watch import landed

    console = stderr_console()
    refused: dict[str, str] = {}
    # A watcher is a service: SIGINT (even when its parent shell started it ignoring SIGINT) and SIGTERM (a service
    # manager's stop) both end it between two looks, or interrupt an extension as Ctrl+C interrupts a run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_dir = find_run(workdir.resolve(), run_id)
        console.print(f"watching {prefix} for new domains of run {run_id} (every {interval:g} s; Ctrl+C stops)",
                      highlight=False)
        while True:
            pipeline = Pipeline.model_validate(run_pipeline_raw(run_dir, read_record(run_dir)))
            known = {d.name for d in pipeline.domains} | {d.uri for d in pipeline.domains if d.uri}
            new = landed(prefix, Storage.from_settings(pipeline.storage.s3), known, refused,
                         lambda m: console.print(f"[yellow]{m}[/yellow]", highlight=False))
            if new:
                console.print(f"watch: {', '.join(n for n, _ in new)} landed; extending run {run_id}", highlight=False)
                _continue(run_id, [], new, workdir, data_root, progress, address, False)
            time.sleep(interval)
    except LifelongError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"watch stopped; run {run_id} is as the last extension left it", highlight=False)


def _continue(run_id: str, overrides: list[str], domains: list[tuple[str, str]], workdir: Path,
              data_root: Optional[str], progress: bool, address: Optional[str], json_out: bool) -> None:
    """``resume`` (no ``domains``) or ``extend``: check, then run the rest of the run."""
    from orchestrator.dag import RunOptions
    from orchestrator.resume import prepare_resume, tracking_uri
    from orchestrator.spec import bind

    imports_done = time.time()
    console = stderr_console()
    try:
        spec, resumption = prepare_resume(run_id, workdir.resolve(), overrides, domains)
        bind(spec, "pipeline.json")
        uri = tracking_uri(resumption.record, spec)
    except LifelongError as e:
        _fail(e)
    record = resumption.record
    search = [Path(record.spec_file).parent] if record.spec_file else []
    options = RunOptions(workdir=workdir.resolve(), data_root=data_root, tracking_uri=uri,
                         address=address, search_from=[*search, Path.cwd()], console=console, show_progress=progress,
                         spec_file=Path(record.spec_file) if record.spec_file else None,
                         overrides=record.overrides)
    verb = f"extend with {', '.join(n for n, _ in domains)}" if domains else "resume"
    console.print(f"[bold]lifelong {verb}[/bold] {spec.name} run {run_id}: {len(spec.domains)} domains, "
                  f"strategy {spec.strategy_label()}")
    _run_and_report(spec, options, json_out, imports_done, resumption)


@app.command()
def tune(
    pipeline: Annotated[Optional[Path], typer.Argument(help="Pipeline YAML with a tune: section.")] = None,
    set_: SetOpt = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the interrupted search in this folder (<workdir>/tune/<name>); finished trials "
        "are not run again.")] = None,
    export: Annotated[Optional[Path], typer.Option(
        "--export", help="Write the best trial's pipeline here as YAML, without its tune: section (never "
        "overwrites).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the leaderboard as one JSON object on stdout.")] = False,
    workdir: WorkdirOpt = Path("lifelong-runs"),
    data_root: DataRootOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow tracking URI [default: sqlite:///<workdir>/mlflow.db].")] = None,
    address: Annotated[Optional[str], typer.Option(
        "--address", help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:PORT [default: $RAY_ADDRESS, "
        "else a local Ray started for the search].")] = None,
) -> None:
    """Search the pipeline's tune: space with Ray Tune: every trial runs the whole pipeline, scored on the val
    splits after each domain, and ASHA stops trials that fall behind. Prints the leaderboard; the best config's
    test metrics come from `lifelong run` on the file that --export writes."""
    from orchestrator.tuning import SearchInterrupted, TuneOptions, TuneRequest, read_request, run_tune

    console = stderr_console()
    try:
        if resume is not None:
            if pipeline is not None or set_:
                raise LifelongError("--resume takes no pipeline or --set: the search's own spec is used")
            request = read_request(resume.resolve())[0]
            path = Path(request.source)
        elif pipeline is None:
            raise LifelongError("give a pipeline YAML with a tune: section, or --resume DIR")
        else:
            path = pipeline
            request = TuneRequest(read_spec_file(pipeline), tuple(set_ or []), str(pipeline))
        options = TuneOptions(workdir=workdir.resolve(), data_root=data_root, tracking_uri=tracking_uri,
                              address=address, search_from=(path.resolve().parent, Path.cwd()),
                              export=export.resolve() if export else None)
        summary = run_tune(request, options, resume.resolve() if resume else None)
    except LifelongError as e:
        _fail(e)
    except SearchInterrupted as e:
        console.print(f"[bold yellow]{e}[/bold yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print_leaderboard(summary, console)
    if json_out:
        typer.echo(json.dumps(summary.to_json(), default=str))


JobsAddressOpt = Annotated[Optional[str], typer.Option(
    "--address", help="The cluster's Ray dashboard (Jobs API), http://HOST:8265 [default: $RAY_API_SERVER_ADDRESS, "
    "else an http:// $RAY_ADDRESS, else http://127.0.0.1:8265].")]
JobIdArg = Annotated[str, typer.Argument(help="The job's id, as `lifelong submit` printed it.")]


@app.command()
def submit(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML to run on the cluster.")],
    set_: SetOpt = None,
    address: JobsAddressOpt = None,
    working_dir: Annotated[Optional[Path], typer.Option(
        "--working-dir", help="Folder shipped as the job's working folder, holding the pipeline and the files it "
        "needs (a user model, a strategy plugin) [default: the pipeline YAML alone].")] = None,
    workdir: Annotated[str, typer.Option(
        "--workdir", help="The run's working folder on the cluster (run folder; shards and mlflow.db unless the "
        "pipeline puts them elsewhere).")] = "/tmp/lifelong-runs",
    data_root: Annotated[Optional[str], typer.Option(
        "--data-root", help="Folder of raw datasets on the cluster [default: the cluster's $LIFELONG_DATA_ROOT].")]
    = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        "--tracking-uri", help="MLflow tracking URI as the cluster sees it [default: the pipeline's tracking.uri, "
        "else sqlite under --workdir on the cluster].")] = None,
    env: Annotated[Optional[list[str]], typer.Option(
        "--env", help="KEY=VALUE environment variable of the job (repeatable).")] = None,
) -> None:
    """Run a pipeline on a Ray cluster as a job (Ray Jobs API): validate it here, ship it, print the job id. Follow
    the job with `lifelong status`, `lifelong logs --follow` and `lifelong stop`."""
    from orchestrator.jobs import SubmitRequest
    from orchestrator.jobs import submit as submit_job

    console = stderr_console()
    try:
        job = submit_job(SubmitRequest(pipeline, tuple(set_ or []), address, working_dir, workdir, data_root,
                                       tracking_uri, tuple(env or [])))
    except LifelongError as e:
        _fail(e)
    console.print(f"submitted {job.pipeline} to {job.address}\n  entrypoint: {job.entrypoint}\n"
                  f"  MLflow: run '{job.job_id}' at {job.tracking}", highlight=False, soft_wrap=True)
    if "sqlite" in job.tracking:
        console.print("  note: the run's MLflow records stay on the cluster; set tracking.uri or --tracking-uri to "
                      "an MLflow server to read them from here", highlight=False, soft_wrap=True)
    console.print(f"follow it: lifelong logs {job.job_id} --follow --address {job.address}", highlight=False,
                  soft_wrap=True)
    typer.echo(job.job_id)


@app.command()
def status(job_id: JobIdArg, address: JobsAddressOpt = None,
           json_out: Annotated[bool, typer.Option("--json", help="Print the state as one JSON object.")] = False,
           ) -> None:
    """Show a submitted job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (exit 0 whatever it is)."""
    from orchestrator.jobs import status as job_status

    try:
        state = job_status(job_id, address)
    except LifelongError as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps({**state.__dict__, "duration_s": state.duration_s}))
        return
    took = f", {state.duration_s:.1f} s" if state.duration_s is not None else ""
    typer.echo(f"{state.job_id}: {state.status}{took}" + (f" ({state.message})" if state.message else ""))


@app.command()
def logs(job_id: JobIdArg, address: JobsAddressOpt = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
         ) -> None:
    """Print a submitted job's output (its driver's stdout and stderr)."""
    from orchestrator.jobs import logs as job_logs

    try:
        job_logs(job_id, address, follow, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    except LifelongError as e:
        _fail(e)


@app.command()
def stop(job_id: JobIdArg, address: JobsAddressOpt = None) -> None:
    """Stop a submitted job and wait until it has stopped (its MLflow runs end KILLED)."""
    from orchestrator.jobs import stop as stop_job

    try:
        state = stop_job(job_id, address)
    except LifelongError as e:
        _fail(e)
    typer.echo(f"{state.job_id}: {state.status}")


def print_leaderboard(summary: "TuneSummary", console: Console) -> None:
    """The final leaderboard (with each trial's Ray node, shortened, when trials ran on several), each errored
    trial's error, the best trial and what ASHA saved."""
    from orchestrator.tuning import describe

    table = Table(title=f"lifelong tune: {summary.experiment_dir}")
    nodes = len({r.node_id for r in summary.rows if r.node_id}) > 1  # a column only when trials ran on several
    for col in ("trial", "config", "val ACC", "forgetting", "objective", "domains", "status", *(["node"] * nodes)):
        table.add_column(col)
    for r in summary.rows:
        table.add_row(r.trial_id, describe(r.config), f"{r.val_acc:.4f}", f"{r.val_forgetting:.4f}",
                      f"{r.objective:.4f}", str(r.domains), r.status, *([r.node_id[:8]] * nodes))
    console.print(table)
    for r in summary.rows:
        if r.error:
            console.print(f"trial {r.trial_id} error: {r.error}", highlight=False, soft_wrap=True)
    if summary.best is not None:
        console.print(f"best: trial {summary.best.trial_id} ({describe(summary.best.config)}), val objective "
                      f"{summary.best.objective:.4f}")
    console.print(f"{summary.domains_run} trial-domains trained, {summary.domains_saved} saved by early stopping; "
                  f"{summary.wall_seconds:.1f} s; MLflow tune run {summary.tune_run_id}")


TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", help="MLflow tracking URI of the run [default: $MLFLOW_TRACKING_URI, else "
    "sqlite:///<workdir>/mlflow.db].")]


def _read_client(tracking_uri: Optional[str], workdir: Path) -> tuple[object, str]:
    """An MLflow client on the store that ``lineage`` and ``audit`` read, and its URI."""
    from orchestrator.lineage import default_tracking_uri
    from orchestrator.registry import client_for

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir.resolve())
    return client_for(uri), uri


def stdout_console() -> Console:
    """A Rich console on stdout, 200 columns wide into a file or a pipe (see :func:`stderr_console`)."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID, or a run id "
                                            "(lifelong's, or the MLflow id of its pipeline or stage run: its last "
                                            "stage's model).")],
    tracking_uri: TrackingOpt = None,
    workdir: WorkdirOpt = Path("lifelong-runs"),
    json_out: Annotated[bool, typer.Option("--json", help="Print the chain as one JSON object.")] = False,
) -> None:
    """Walk a model's chain back to the first domain: per stage its registered version, checkpoint and digests,
    every training shard (URI and sha256) and the hyperparameters that shaped it."""
    from rich.text import Text
    from rich.tree import Tree

    from orchestrator.registry import chain, lineage_record_of, resolve

    try:
        client, _ = _read_client(tracking_uri, workdir)
        record = lineage_record_of(chain(client, resolve(client, ref)))
    except LifelongError as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps(record, indent=1))
        return
    stages = record["stages"]
    shared = stages[0]["hyperparameters"] if all(s["hyperparameters"] == stages[0]["hyperparameters"]
                                                 for s in stages) else None
    def line(text: str) -> Text:  # long URIs and digests fold onto the next line rather than being cut
        return Text(text, overflow="fold")

    top = Tree(line(f"{ref}: {len(stages)} stage(s), newest first"))
    for s in stages:
        name = f"models:/{s['version']}" if s["version"] else s["model_uri"]
        node = top.add(line(f"stage {s['stage']} '{s['domain']}'  {name} ({s['model_id']})  run {s['run_id']}"))
        parent = next((p for p in stages if p["model_id"] == s["parent_model_id"]), None)
        node.add(line(f"parent: stage {parent['stage']} ({parent['model_id']})" if parent else
                      f"parent: initial model {record['root']['checkpoint']}  model.pt "
                      f"{record['root']['model_sha256']}"))
        files = node.add(line(f"checkpoint {s['checkpoint']}"))
        files.add(line(f"model.pt  sha256 {s['model_sha256']}"))
        files.add(line(f"strategy.safetensors  sha256 {s['strategy_sha256']}"))
        for d in s["data"]:
            data = node.add(line(f"data {d['domain']}/{d['split']} {d['uri']}  manifest {d['manifest_digest']}  "
                                 f"split {d['split_digest']}"))
            for shard in d["shards"]:
                data.add(line(f"{shard['path']}  sha256 {shard['sha256']}  {shard['rows']} rows"))
        node.add(line(f"spec {s['spec_sha256']}  code {s['code_version']}"))
        if shared is None:
            node.add(line("hyperparameters " + " ".join(f"{k}={v}" for k, v in s["hyperparameters"].items())))
    console = stdout_console()
    console.print(top, highlight=False)
    if shared is not None:
        console.print("hyperparameters (every stage): " + " ".join(f"{k}={v}" for k, v in shared.items()),
                      highlight=False, soft_wrap=True)


@app.command()
def audit(
    run_id: Annotated[str, typer.Argument(help="The run: lifelong's run id, or the MLflow id of its pipeline or "
                                               "stage run.")],
    tracking_uri: TrackingOpt = None,
    workdir: WorkdirOpt = Path("lifelong-runs"),
    s3_endpoint_url: Annotated[Optional[str], typer.Option(
        "--s3-endpoint-url", help="S3 endpoint to read the run's files from [default: the run's "
        "storage.s3.endpoint_url, else the AWS environment].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print every check as one JSON object.")] = False,
) -> None:
    """Re-hash a run's checkpoints (model.pt, strategy.safetensors, lineage.json) and training shards against the digests
    MLflow recorded. Each mismatch is named; exit 1 if there is one, 0 if every file matches."""
    from dataclasses import replace

    from orchestrator.audit import audit as audit_run
    from orchestrator.registry import recorded_storage, run_models

    console = stderr_console()
    try:
        client, _ = _read_client(tracking_uri, workdir)
        models = run_models(client, run_id)
        storage = recorded_storage(client, models[0])
        if s3_endpoint_url:
            storage = replace(storage, endpoint_url=s3_endpoint_url)
    except LifelongError as e:
        _fail(e)
    checks = []
    for check in audit_run(models, storage):
        checks.append(check)
        if not check.ok:
            console.print(f"MISMATCH stage {check.stage} {check.kind} {check.uri}: recorded {check.expected}, "
                          f"now {check.actual}", highlight=False, soft_wrap=True)
    bad = [c for c in checks if not c.ok]
    kinds = {k: sum(c.kind == k for c in checks) for k in dict.fromkeys(c.kind for c in checks)}
    counted = ", ".join(f"{n} {k}" for k, n in kinds.items())
    if json_out:
        typer.echo(json.dumps({"run_id": models[0].run_id, "ok": not bad, "checks": [
            {**c.__dict__, "ok": c.ok} for c in checks]}))
    if bad:
        console.print(f"audit FAILED: {len(bad)} of {len(checks)} files differ from their recorded sha256 "
                      f"(run {models[0].run_id}, {len(models)} stages: {counted})", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"audit passed: all {len(checks)} files match their recorded sha256 (run {models[0].run_id}, "
                  f"{len(models)} stages: {counted})", highlight=False, soft_wrap=True)


@app.command()
def validate(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML to check.")],
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path("lifelong-runs"),
) -> None:
    """Check a pipeline as its run's validate node would, writing nothing: the spec (every problem with its field
    path), each domain's manifest, one schema across the stream, no empty split, and, for domains whose shards exist,
    every shard's sha256 and labels. Exit 2 if anything is wrong."""
    from orchestrator.plan import Domain, check_stream, validate_shards
    from orchestrator.shards import MANIFEST, domain_uri, read_manifest
    from orchestrator.spec import bind
    from orchestrator.storage import Storage

    try:
        spec = load_pipeline(pipeline, set_ or [])
        bind(spec, str(pipeline))
    except SpecError as e:
        console = Console(stderr=True)
        console.print(f"[bold red]{e.source}: {len(e.problems)} problem(s)[/bold red]")
        for path, msg in e.problems:
            console.print(f"  {path or '<top>'}: {msg}", highlight=False)
        raise typer.Exit(code=2) from None
    problems, present = [], []
    storage = Storage.from_settings(spec.storage.s3)
    for i, d in enumerate(spec.domains):
        uri = domain_uri(spec, i, workdir.resolve())
        try:
            if storage.exists(f"{uri.rstrip('/')}/{MANIFEST}"):
                present.append(Domain(d.name, uri, read_manifest(uri, storage)))
            elif d.source is None:
                problems.append(f"domains.{i}.uri: no {MANIFEST} at {uri} and no source to build it from")
        except LifelongError as e:
            problems.append(f"domains.{i} ({d.name}): {e}")
    if not problems and len(present) == len(spec.domains):
        try:  # the stream as a whole, then every shard (the run's validate node)
            check_stream(present, spec)
            validate_shards(present, storage)
        except LifelongError as e:
            problems.append(str(e))
    for p in problems:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {p}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(code=2)
    built = len(spec.domains) - len(present)
    typer.echo(f"{pipeline}: OK ({len(spec.domains)} domains, {_scenario(spec)}, strategy {spec.strategy_label()}"
               + (f"; {built} to be built from their source" if built else "; shards re-hashed") + ")")


EndpointOpt = Annotated[Optional[str], typer.Option(
    "--endpoint-url", help="S3-compatible endpoint for s3:// URIs [default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, "
    "else AWS]. Credentials come from the AWS environment or profile.")]


@shards_app.command("build")
def shards_build(
    out: Annotated[str, typer.Option("--out", help="Output folder or URI; one sub-folder per domain.")],
    dataset: Annotated[str, typer.Option(help="mnist | fashion_mnist | sklearn_digits | image_folder (your images: "
                                               "one sub-folder per class under --path) | csv | jsonl | parquet | "
                                               "text_files (your text, for language models)")] = "mnist",
    scenario: Annotated[str, typer.Option(help="split (by classes) | permuted (inputs)")] = "split",
    tasks: Annotated[Optional[int], typer.Option(
        help="Number of domains [default: 5; image_folder: every class, --classes-per-task per domain].")] = None,
    classes_per_task: Annotated[int, typer.Option(help="split: classes per domain.")] = 2,
    domain: Annotated[Optional[list[str]], typer.Option(
        "--domain", help="NAME=CLASS,CLASS: one domain of these classes (labels, or class folder names), named by "
        "you (repeatable; replaces --tasks and --classes-per-task). Text: NAME=VALUE,VALUE, the rows whose "
        "--split-by column holds these values; text_files: NAME=PATH, a file or folder per domain.")] = None,
    text_column: Annotated[Optional[list[str]], typer.Option(
        "--text-column", help="csv, jsonl, parquet: a column holding the text (repeatable; joined by newlines).")]
    = None,
    split_by: Annotated[Optional[str], typer.Option(help="csv, jsonl, parquet: the column whose values cut the "
                                                         "rows into domains (see --domain).")] = None,
    columns: Annotated[Optional[str], typer.Option(help="csv without a header row: its column names, comma "
                                                        "separated.")] = None,
    context: Annotated[int, typer.Option(help="text: tokens per block the model reads.")] = 128,
    tokenizer: Annotated[str, typer.Option(help="text: 'bytes' or the path of a tokenizer.json.")] = "bytes",
    path: Annotated[Optional[str], typer.Option(help="Raw dataset folder: absolute, or relative to the data root.")]
    = None,
    data_root: DataRootOpt = None,
    val_fraction: Annotated[float, typer.Option(help="Share of train carved out as val.")] = 0.1,
    image_size: Annotated[Optional[tuple[int, int]], typer.Option(
        help="image_folder: HEIGHT WIDTH every image is resized to [default: the first image's size].")] = None,
    channels: Annotated[int, typer.Option(help="image_folder: 1 (grey) or 3 (RGB).")] = 1,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 8192,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Write domain shards and manifests (DESIGN §2) for a split-by-classes or permuted-inputs scenario, to a local
    folder or straight to object storage (``--out s3://bucket/prefix``). Your own images: ``--dataset image_folder
    --path DIR``, with ``--domain NAME=CLASSES`` to name the domains and choose their classes."""
    from pydantic import ValidationError

    from orchestrator import shards
    from orchestrator.spec import S3Spec
    from orchestrator.storage import Storage

    storage = Storage.from_settings(S3Spec(endpoint_url=endpoint_url))
    if scenario not in ("split", "permuted"):
        _fail(LifelongError(f"--scenario: unknown scenario '{scenario}' (use split or permuted)"))
    root = shards.find_data_root(data_root, [Path.cwd()])
    common = _source_fields(dataset, path, val_fraction, rows_per_shard, image_size, channels, text_column, columns,
                            context, tokenizer)
    try:
        plan = (_text_domains_to_build(dataset, split_by, domain or [], common) if dataset in FILE_KINDS else
                _domains_to_build(dataset, scenario, tasks, classes_per_task, domain or [], common, root))
        built = [(name, shards.build_domain(f"{out.rstrip('/')}/{name}", name, source, root, storage))
                 for name, source in plan]
    except ValidationError as e:
        first = e.errors()[0]
        _fail(LifelongError(f"{'.'.join(map(str, first['loc'])) or 'source'}: {first['msg']}"))
    except (LifelongError, ValueError) as e:
        _fail(e)
    Console().print(_built_table(out, built))


def _source_fields(dataset: str, path: Optional[str], val_fraction: float, rows_per_shard: int,
                   image_size: Optional[tuple[int, int]], channels: int, text_column: Optional[list[str]],
                   columns: Optional[str], context: int, tokenizer: str) -> dict[str, object]:
    """The ``SourceSpec`` fields every domain `shards build` writes shares, from its options (the image and text
    options only for their kinds; MNIST and Fashion-MNIST default to their folders under the data root)."""
    default_path = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}.get(dataset)
    common: dict[str, object] = {"kind": dataset, "path": path or default_path, "val_fraction": val_fraction,
                                 "rows_per_shard": rows_per_shard}
    if dataset == "image_folder":
        common.update(image_size=image_size, channels=channels)
    if dataset in FILE_KINDS:
        common.update(context=context, tokenizer=tokenizer, **({"text_columns": text_column} if text_column else {}),
                      **({"columns": [c.strip() for c in columns.split(",")]} if columns else {}))
    return common


def _built_table(out: str, built: list[tuple[str, dict[str, Any]]]) -> Table:
    """The table `shards build` prints: per domain its labels (or, for text, its vocabulary), rows per split and
    digest."""
    table = Table(title=f"shards in {out}")
    for col in ("domain", "labels", "train", "val", "test"):
        table.add_column(col)
    table.add_column("digest", overflow="fold")
    for name, m in built:
        labels = ",".join(map(str, m["label_set"])) or f"text ({m['schema']['text']['vocab_size']} ids)"
        table.add_row(name, labels, *(str(m["splits"][s]["rows"]) for s in ("train", "val", "test")), m["digest"])
    return table


def _domains_to_build(dataset: str, scenario: str, tasks: Optional[int], classes_per_task: int, domain: list[str],
                      common: dict[str, object], root: Optional[Path]) -> list[tuple[str, SourceSpec]]:
    """``(name, source)`` of each domain `shards build` writes: the user's ``--domain NAME=CLASSES``, else
    ``--tasks`` groups of ``--classes-per-task`` classes (an image folder's class folders, in sorted order), else
    ``--tasks`` permutations.

    Raises:
        LifelongError: a malformed ``--domain``, or more groups than classes.
        pydantic.ValidationError: a source that does not validate.
    """
    from orchestrator import shards

    if domain:
        plan = []
        for item in domain:
            name, sep, classes = item.partition("=")
            if not sep or not name or not classes:
                raise LifelongError(f"--domain {item!r}: expected NAME=CLASS,CLASS")
            picked = [int(c) if c.strip().lstrip("-").isdigit() else c.strip() for c in classes.split(",")]
            plan.append((name, SourceSpec(classes=picked, **common)))
        return plan
    if scenario == "permuted":
        return [(f"perm-{k}", SourceSpec(permutation_seed=k, **common)) for k in range(tasks or 5)]
    names: list[int | str] = list(range(10))
    if dataset == "image_folder":
        names = list(shards.image_classes(shards.resolve_source_dir(SourceSpec(**common), root)))
    count = tasks if tasks is not None else (len(names) // classes_per_task if dataset == "image_folder" else 5)
    plan = []
    for k in range(count):
        picked = names[k * classes_per_task:(k + 1) * classes_per_task]
        if not picked:
            raise LifelongError(f"--tasks {count} x --classes-per-task {classes_per_task}: only {len(names)} classes")
        plan.append((f"classes-{'-'.join(map(str, picked))}", SourceSpec(classes=picked, **common)))
    return plan


def _text_domains_to_build(dataset: str, split_by: Optional[str], domain: list[str],
                           common: dict[str, object]) -> list[tuple[str, SourceSpec]]:
    """``(name, source)`` of each text domain `shards build` writes: ``--domain NAME=PATH`` for text files,
    ``--domain NAME=VALUE,VALUE`` (the rows whose ``--split-by`` column holds them) for tables.

    Raises:
        LifelongError: no ``--domain``, a malformed one, or a table without ``--split-by``.
        pydantic.ValidationError: a source that does not validate.
    """
    if not domain:
        raise LifelongError(f"--domain: name each domain of a {dataset} source (NAME=VALUE,VALUE with --split-by; "
                            f"NAME=PATH for text_files)")
    plan = []
    for item in domain:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise LifelongError(f"--domain {item!r}: expected NAME=" + ("PATH" if dataset == "text_files" else
                                                                          "VALUE,VALUE"))
        if dataset == "text_files":
            plan.append((name, SourceSpec(**{**common, "path": value})))
        elif not split_by:
            raise LifelongError("--split-by: name the column whose values --domain picks")
        else:
            plan.append((name, SourceSpec(**common, where={split_by: [v.strip() for v in value.split(",")]})))
    return plan


UriArg = Annotated[str, typer.Argument(help="The domain's folder or URI (where its manifest.json is).")]


@shards_app.command("inspect")
def shards_inspect(uri: UriArg, endpoint_url: EndpointOpt = None,
                   json_out: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
                   ) -> None:
    """Print a domain's manifest: schema, label set, and per split its rows, shards and digest (no shard is read)."""
    from orchestrator.shards import read_manifest
    from orchestrator.spec import S3Spec
    from orchestrator.storage import Storage

    try:
        m = read_manifest(uri, Storage.from_settings(S3Spec(endpoint_url=endpoint_url)))
    except LifelongError as e:
        _fail(e)
    if json_out:
        typer.echo(json.dumps(m, indent=1))
        return
    f, label, text = m["schema"]["features"], m["schema"].get("label"), m["schema"].get("text")
    if text:
        what = (f"text: blocks of {text['context']} + 1 token ids, vocabulary {text['vocab_size']} "
                f"(tokenizer {text['tokenizer']}, end of document {text['eos']})")
    else:
        what = f"label: column '{label['column']}', {label['dtype']}\n  labels: {', '.join(map(str, m['label_set']))}"
    console = stdout_console()
    console.print(f"domain '{m['domain']}' at {uri}: digest {m['digest']}\n  features: column '{f['column']}', "
                  f"{f['dtype']} {f['shape']} x {f['scale']:g}; {what}\n  source: {m.get('source') or m.get('origin')}",
                  highlight=False, soft_wrap=True)
    table = Table("split", "rows", "shards", "digest", "shard sha256 (first 16)")
    for name in ("train", "val", "test"):
        split = m["splits"][name]
        table.add_row(name, str(split["rows"]), str(len(split["shards"])), split["digest"],
                      " ".join(s["sha256"][:16] for s in split["shards"][:4]) + (" …" if len(split["shards"]) > 4
                                                                                  else ""))
    console.print(table)


@shards_app.command("verify")
def shards_verify(uri: UriArg, endpoint_url: EndpointOpt = None) -> None:
    """Re-hash every shard of a domain against its manifest and check its schema, row counts and labels (exit 2 at
    the first fault, naming the shard)."""
    from orchestrator.shards import read_manifest, verify_domain
    from orchestrator.spec import S3Spec
    from orchestrator.storage import Storage

    storage = Storage.from_settings(S3Spec(endpoint_url=endpoint_url))
    try:
        m = read_manifest(uri, storage)
        verify_domain(uri, m, storage=storage)
    except LifelongError as e:
        _fail(e)
    count = sum(len(s["shards"]) for s in m["splits"].values())
    rows = sum(s["rows"] for s in m["splits"].values())
    checked = "token blocks of text" if m["schema"].get("text") else "every label in the label set"
    typer.echo(f"{uri}: OK ({count} shards, {rows} rows re-hashed; {checked})")


@shards_app.command("schema")
def shards_schema() -> None:
    """Print the JSON Schema of manifest.json (the public shard format, lifelong-shards/1)."""
    from orchestrator.manifest import json_schema

    typer.echo(json.dumps(json_schema(), indent=1))


def main() -> None:
    """Console entry point.

    Once a command has finished (Ray shut down, every file and MLflow record written) and its output is flushed,
    the process exits at once: the interpreter's own teardown of torch's and Ray's native objects takes about 2 s
    on 2 cores and has nothing left to write. An unexpected exception still ends with Python's traceback.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
