"""Committed work: what a run has done, recorded as it goes, and read back by ``lifelong resume`` and ``extend``.

A run's folder ``<workdir>/<pipeline>/<run_id>`` holds:

- ``run.json`` (:class:`RunRecord`): the run's identity, the spec file and ``--set`` overrides it was started
  from, and its MLflow pipeline run;
- ``pipeline.json``: the validated pipeline it runs (an extended run's, with the new domains);
- ``cells.jsonl``: every cell of R and every continual-evaluation point, appended by :class:`CommittedWork`, a
  listener of the stage engine, as they are computed.

Stage k's checkpoint (``<root>/stage-k/checkpoint``, committed by its ``lineage.json``) and its ``_COMPLETED`` record
(:func:`orchestrator.report.stage_summary`) live on the run's storage. :func:`read_committed` reads all of it back
into an :class:`orchestrator.engine.Restored`; the stage engine then skips the committed stages and the evaluation
computes only the missing cells. :func:`prepare_resume` checks what the user asked for before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from orchestrator.checkpoint import LINEAGE_FILE, load_checkpoint, read_lineage, verify_checkpoint
from orchestrator.engine import Cell, CurvePoint, Listener, Restored, RunInfo, StageResult
from orchestrator.errors import LifelongError
from orchestrator.models import build_model
from orchestrator.plan import StagePlan
from orchestrator.redact import is_redacted, is_secret_key, redact_overrides, redact_uri, restore_secrets
from orchestrator.spec import DomainSpec, Pipeline, apply_overrides, flatten, load_pipeline, validate_raw
from orchestrator.storage import Storage, join, replace_file

RECORD_FILE = "run.json"
PIPELINE_FILE = "pipeline.json"
CELLS_FILE = "cells.jsonl"
COMPLETED_FILE = "_COMPLETED"

# Fields that `resume --set` may change: how the run is carried out, not what a committed stage computed.
OPERATIONAL_FIELDS = ("training.on_nonfinite", "training.max_failures", "training.progress_every",
                      "training.threads_per_worker", "training.cpus_per_worker", "training.resources",
                      "training.cache_mb", "training.checkpoint_every_n_steps", "evaluation.num_actors",
                      "evaluation.cpus_per_actor", "evaluation.gpus_per_actor", "evaluation.resources",
                      "evaluation.batch_size", "evaluation.max_lag", "evaluation.max_queued_snapshots",
                      "evaluation.max_actor_restarts", "storage.s3.retry_seconds", "storage.s3.access_key_id",
                      "storage.s3.secret_access_key", "storage.s3.session_token", "storage.s3.profile")


class RunRecord(BaseModel):
    """``run.json``: a run's identity and where it came from (written when the run starts, updated when its MLflow
    run is known and when it is extended).

    Attributes:
        run_id: lifelong's run id. pipeline: the pipeline's name. spec_file: the YAML it was started from (absolute
            path). overrides: the ``--set`` overrides of that start. spec: the pipeline they gave (its JSON dump), to
            which the file is compared on resume. tracking_uri, experiment: the MLflow store and experiment.
            mlflow_run_id: the pipeline run ("" until created). created: unix seconds. extensions: the domains each
            ``extend`` appended, in order.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    pipeline: str
    spec_file: str
    overrides: tuple[str, ...] = ()
    spec: dict[str, Any]
    tracking_uri: str
    experiment: str
    mlflow_run_id: str = ""
    created: float
    extensions: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Resumption:
    """A run to continue rather than start (``lifelong resume`` or ``extend``).

    Attributes:
        record: its ``run.json``. run_dir: its folder. extended: the number of domains before this ``extend``
            (None for a plain resume).
    """

    record: RunRecord
    run_dir: Path
    extended: int | None = None


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` in one step (:func:`orchestrator.storage.replace_file`)."""
    replace_file(path, json.dumps(obj, indent=1).encode())


def read_record(run_dir: Path) -> RunRecord:
    """The ``run.json`` of a run folder.

    Raises:
        LifelongError: it is missing (a run started before lifelong recorded one) or invalid (naming the file).
    """
    path = run_dir / RECORD_FILE
    try:
        return RunRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise LifelongError(f"{path} is missing: the run cannot be resumed") from None
    except ValidationError as e:
        raise LifelongError(f"{path}: invalid run record ({e.errors()[0]['msg']})") from None


def find_run(workdir: Path, run_id: str) -> Path:
    """The folder of run ``run_id`` under ``workdir`` (``<workdir>/<pipeline>/<run_id>``).

    Raises:
        LifelongError: no such run (naming the workdir).
    """
    found = [p for p in workdir.glob(f"*/{run_id}") if (p / RECORD_FILE).is_file()] if "/" not in run_id else []
    if not found:
        raise LifelongError(f"no run '{run_id}' under {workdir} (pass --workdir of the run; its id is printed when it "
                            "starts, and is the name of its folder)")
    return found[0]


def spec_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The dotted fields (as MLflow params name them) whose values differ between two pipeline dumps. A field only
    one dump has counts if it is inside a list (a domain or strategy added or removed); otherwise it is a field that
    one version of lifelong has and the other lacks (a new setting's default), which the user did not change.
    Secret fields never count: lifelong does not record them (a ``--set`` of one is not in ``run.json``), and a
    rotated key changes nothing a stage computed."""
    a, b = flatten(before), flatten(after)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not is_secret_key(k)
                  and (k in a and k in b or any(part.isdigit() for part in k.split("."))))


def prepare_resume(run_id: str, workdir: Path, overrides: Sequence[str] = (),
                   domains: Sequence[tuple[str, str]] = ()) -> tuple[Pipeline, Resumption]:
    """Check a ``resume`` (no ``domains``) or an ``extend`` (``(name, uri)`` per new domain) of run ``run_id``, and
    return the pipeline to run and the :class:`Resumption`. Nothing is written.

    Raises:
        LifelongError: an unknown run; a resume of a finished run or an extend of an unfinished one; a spec file
            that changed since the run started (naming the changed fields); ``--set`` of a field that would change
            what a committed stage computed (naming it).
        SpecError: the new domains make an invalid pipeline (a duplicate name, a bad URI), naming the field.
    """
    run_dir = find_run(workdir, run_id)
    record = read_record(run_dir)
    finished = (run_dir / COMPLETED_FILE).exists()
    if finished and not domains:
        raise LifelongError(f"run {run_id} finished; nothing to resume (lifelong extend {run_id} --domain NAME=URI "
                            "adds domains)")
    if domains and not finished:
        raise LifelongError(f"run {run_id} has not finished: lifelong resume {run_id} first, then extend it")
    _check_spec_file(record)
    raw = run_pipeline_raw(run_dir, record)
    refused = [o.partition("=")[0].strip() for o in overrides
               if not o.partition("=")[0].strip().startswith(OPERATIONAL_FIELDS)]
    if refused:
        raise LifelongError(f"resume --set {', '.join(refused)}: would change what the committed stages computed; only "
                            f"these fields may change on resume: {', '.join(OPERATIONAL_FIELDS)}")
    apply_overrides(raw, list(overrides))
    raw["domains"] = [*raw["domains"], *(DomainSpec(name=n, uri=u).model_dump(mode="json") for n, u in domains)]
    pipeline = validate_raw(raw, f"{run_dir / PIPELINE_FILE} + " + ("--domain" if domains else "--set"))
    return pipeline, Resumption(record, run_dir, len(raw["domains"]) - len(domains) if domains else None)


def run_pipeline_raw(run_dir: Path, record: RunRecord) -> dict[str, Any]:
    """The run's ``pipeline.json`` as a raw spec, with the secrets it masked (S3 keys, a URI's password) taken from
    the spec file it was started from (with its recorded ``--set`` overrides) when that file still exists, else
    left unset (the AWS environment then provides them)."""
    raw = json.loads((run_dir / PIPELINE_FILE).read_text())
    source = None
    if Path(record.spec_file).is_file():
        try:
            source = load_pipeline(record.spec_file, list(record.overrides)).model_dump()
        except LifelongError:
            source = None
    return restore_secrets(raw, source)


def tracking_uri(record: RunRecord, pipeline: Pipeline) -> str:
    """The MLflow tracking URI a resumed run reconnects to: the recorded one, or, if lifelong took a password out
    of it when recording, ``MLFLOW_TRACKING_URI`` or the spec's ``tracking.uri`` where that is the same URI with
    its password.

    Raises:
        LifelongError: the recorded URI had a password and neither gives it back.
    """
    if not is_redacted(record.tracking_uri):
        return record.tracking_uri
    for candidate in (os.environ.get("MLFLOW_TRACKING_URI"), pipeline.tracking.uri):
        if candidate and redact_uri(candidate) == record.tracking_uri:
            return candidate
    raise LifelongError(f"run {record.run_id}: its MLflow tracking URI {record.tracking_uri} had a password, which "
                        "lifelong does not record; set MLFLOW_TRACKING_URI to the full URI")


def _check_spec_file(record: RunRecord) -> None:
    """Refuse a run whose spec file (with the run's own ``--set`` overrides) no longer gives the pipeline it was
    started with; a spec file that is gone is not checked."""
    if not Path(record.spec_file).is_file():
        return
    try:
        now = load_pipeline(record.spec_file, list(record.overrides)).model_dump(mode="json")
    except LifelongError as e:
        raise LifelongError(f"{record.spec_file} changed since run {record.run_id} started and is now invalid: "
                            f"{e}") from None
    changed = spec_changes(record.spec, now)
    if changed:
        raise LifelongError(f"{record.spec_file} changed since run {record.run_id} started: {', '.join(changed)}; "
                            "restore it, or start a new run")


class CommittedWork(Listener):
    """Listener of the stage engine: appends every cell of R and every continual-evaluation point to
    ``cells.jsonl`` as it arrives, one JSON object per line, so that a resumed run computes none of them again
    (a line cut short by a crash is skipped when read back).

    Args:
        path: the run's ``cells.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: set[Cell] = set()

    def run_started(self, run: RunInfo) -> None:
        """Remember the cells already on file."""
        self.written = set(run.restored.cells)

    def row_evaluated(self, row: int, cells: Sequence[Cell]) -> None:
        """Append the row's cells that are not on file yet."""
        self._append([{"cell": dataclasses.asdict(c)} for c in cells if c not in self.written])
        self.written.update(cells)

    def curve_evaluated(self, points: Sequence[CurvePoint]) -> None:
        """Append the points."""
        self._append([{"point": dataclasses.asdict(p)} for p in points])

    def _append(self, records: list[dict[str, Any]]) -> None:
        if records:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())


def read_committed(plan: StagePlan, init_checkpoint: str, run_dir: Path) -> Restored:
    """The committed work of a run: the stages 0..k-1 whose checkpoints are committed, each the child of the one
    before (the first of the initial model), with their ``_COMPLETED`` statistics; the cells of R of those rows
    (and of the initial model) for the plan's domains; and their continual-evaluation points.

    Raises:
        LifelongError: a checkpoint records another parent than the stage before it (the run's folder was edited).
    """
    stages: dict[int, StageResult] = {}
    parent = init_checkpoint
    for k in range(plan.num_stages):
        folder = join(plan.root, f"stage-{k}")
        checkpoint = stage_checkpoint(plan.root, k, plan.storage, plan.pipeline.training.max_failures)
        if checkpoint is None:
            break
        lineage = read_lineage(checkpoint, plan.storage)
        if lineage.get("stage") != k or (lineage.get("parent") or {}).get("uri") != parent:
            raise LifelongError(f"{checkpoint}: its lineage.json records stage {lineage.get('stage')} from "
                                f"{(lineage.get('parent') or {}).get('uri')}, not stage {k} from {parent}")
        stats = _completed(folder, plan)
        stages[k] = StageResult(checkpoint, stats, float(stats.get("start", math.nan)),
                                float(stats.get("end", math.nan)))
        parent = checkpoint
    cells: dict[tuple[int, int], Cell] = {}
    points: list[CurvePoint] = []
    for record in committed_records(run_dir / CELLS_FILE):
        if "cell" in record:
            c = Cell(**record["cell"])
            if (c.row == -1 or c.row in stages) and c.col < plan.num_stages:
                cells[c.row, c.col] = c
        elif "point" in record:
            p = CurvePoint(**record["point"])
            if p.stage in stages:
                points.append(p)
    return Restored(stages, tuple(cells.values()), tuple(points))


def stage_checkpoint(root: str, k: int, storage: Storage, max_failures: int) -> str | None:
    """The committed checkpoint of stage k under ``root``: ``stage-k/checkpoint``, or the newest
    ``checkpoint-retry<n>`` (a stage restarted after a worker died commits under a name of its own, n up to
    ``training.max_failures``); None if there is none."""
    folder = join(root, f"stage-{k}")
    for name in [f"checkpoint-retry{n}" for n in range(max_failures, 0, -1)] + ["checkpoint"]:
        if storage.exists(join(folder, name, LINEAGE_FILE)):
            return join(folder, name)
    return None


def committed_prefix(root: str, storage: Storage, num_stages: int, max_failures: int = 0) -> int:
    """How many stages of the run under ``root`` have a committed checkpoint, counted from stage 0, after checking
    each of them, and the initial model, against the sha256 their ``lineage.json`` records (:func:`read_committed`
    checks the chain).

    Raises:
        LifelongError: a checkpoint file is missing or was changed (naming it); nothing of the run is read
            further.
    """
    k = 0
    try:
        if storage.exists(join(root, "init", LINEAGE_FILE)):
            verify_checkpoint(join(root, "init"), storage)
        while k < num_stages and (checkpoint := stage_checkpoint(root, k, storage, max_failures)) is not None:
            verify_checkpoint(checkpoint, storage)
            k += 1
    except (ValueError, FileNotFoundError) as e:
        raise LifelongError(f"{e}: the run cannot be resumed from it") from None
    return k


def check_extension(plan: StagePlan, init_checkpoint: str, extended: int) -> None:
    """Refuse an ``extend`` whose new domains would change the shape of the run's model: the initial model and
    every committed stage were built for the run's first ``extended`` domains (a class-IL domain with new classes
    widens the output layer, a task-IL domain adds a head).

    Raises:
        LifelongError: naming the new domains and the parameters whose shapes would change.
    """
    model_state, _, _ = load_checkpoint(init_checkpoint, plan.storage)
    fresh = build_model(plan.pipeline.model, plan.input.shape, plan.layout.num_outputs).state_dict()
    changed = [f"{k} {tuple(v.shape)} -> {tuple(fresh[k].shape)}" for k, v in model_state.items()
               if k in fresh and fresh[k].shape != v.shape]
    if changed:
        names = ", ".join(d.name for d in plan.domains[extended:])
        raise LifelongError(f"extend: {names} would change the run's model ({'; '.join(changed)}: new classes or "
                            "heads); a finished run's output layer cannot grow, so start a new run with every domain")


def _completed(folder: str, plan: StagePlan) -> dict[str, Any]:
    """A committed stage's ``_COMPLETED`` record ({} if the run died between the commit and the record)."""
    try:
        return json.loads(plan.storage.read_bytes(join(folder, COMPLETED_FILE)))
    except (FileNotFoundError, ValueError):
        return {}


def committed_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of ``cells.jsonl`` (none if it does not exist)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line a crash cut short
    return out


def new_record(run_id: str, pipeline: Pipeline, spec_file: Path | None, overrides: Sequence[str], tracking_uri: str,
               experiment: str) -> RunRecord:
    """The ``run.json`` of a new run; its secrets (a ``--set`` of one, a URI's password) are not recorded."""
    return RunRecord(run_id=run_id, pipeline=pipeline.name, spec_file=str(spec_file.resolve()) if spec_file else "",
                     overrides=redact_overrides(overrides), spec=pipeline.model_dump(mode="json"),
                     tracking_uri=redact_uri(tracking_uri),
                     experiment=experiment, created=time.time())

