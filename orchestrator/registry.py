"""The model registry: every committed stage becomes an MLflow ``LoggedModel`` and a version of a registered model
(:class:`ModelRegistry`, a listener of the stage engine), and the chain of stage models can be read back
(:func:`resolve`, :func:`chain`, :func:`run_models`) by ``lifelong lineage`` and ``lifelong audit``.

A stage's model is *external* to MLflow: its weights stay in the stage checkpoint (a local folder or an object-store
prefix), and MLflow records where it is and what made it. The LoggedModel and the model version carry the same tags:

- ``lifelong.run_id``, ``lifelong.pipeline``, ``lifelong.stage``, ``lifelong.domain``;
- ``lifelong.checkpoint`` and the sha256 of its ``model.pt`` and ``strategy.safetensors`` (``lifelong.model_sha256``,
  ``lifelong.strategy_sha256``, the strategy-state digest);
- the parent: ``lifelong.parent_model_id`` and ``lifelong.parent_version`` (empty for a run's first stage, whose
  parent is the run's initial model), ``lifelong.parent_checkpoint``, ``lifelong.parent_model_sha256``;
- the data: ``lifelong.manifest_digests`` (``domain=digest`` per training input) and ``lifelong.shards``
  (``domain/path=sha256`` per shard, while it fits a tag; the full list is always in ``lineage.json``);
- ``lifelong.spec_sha256`` and ``lifelong.code_version`` (package version and git commit).

The LoggedModel's params are the hyperparameters that shaped it (seed, scenario, model, strategy and training
fields of the spec, and a Tune trial's sampled values), and its artifacts are the stage's ``lineage.json`` (the
commit record, with every shard's sha256) and the ``MLmodel`` file that MLflow needs to register an external model.
Registration runs on the tracker's background thread, after the stage's MLflow run, in stage order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import LINEAGE_FILE
from orchestrator.engine import Listener, RunInfo, StageResult
from orchestrator.errors import LifelongError
from orchestrator.lineage import BackgroundTracker, MlflowStages, Tracker
from orchestrator.plan import StageSpec
from orchestrator.redact import redact_uri
from orchestrator.spec import Pipeline, flatten
from orchestrator.storage import Storage

TAG = "lifelong."
MODEL_TYPE = "lifelong-stage"
MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag's value
HYPERPARAMETERS = {"seed", "scenario", "model", "strategy", "training"}  # the spec fields that shape a model


def hyperparameters(pipeline: Pipeline, extra: Mapping[str, str] = {}) -> dict[str, str]:  # noqa: B006 - read only
    """The flattened spec fields that shape a stage's model (``training.lr``, ``strategy.0.ratio``, ...), plus
    ``extra`` (a Tune trial's sampled values), as MLflow params."""
    return {**flatten(pipeline.model_dump(mode="json", include=HYPERPARAMETERS)), **extra}


def stage_tags(lineage: Mapping[str, Any], checkpoint: str, parent: tuple[str, str] | None) -> dict[str, str]:
    """The tags of a stage's LoggedModel and model version (see the module's docstring).

    Args:
        lineage: the stage checkpoint's ``lineage.json``. checkpoint: its folder (path or URI).
        parent: ``(model id, version)`` of the parent stage's model; None when the parent is the run's initial model.
    """
    inputs = lineage.get("inputs", [])
    shards = ",".join(f"{i['domain']}/{s['path']}={s['sha256']}" for i in inputs for s in i["shards"])
    if len(shards) > MAX_TAG_CHARS:
        shards = f"{sum(len(i['shards']) for i in inputs)} shards: see {LINEAGE_FILE}"
    code = lineage.get("code", {})
    return {
        f"{TAG}run_id": str(lineage["run_id"]),
        f"{TAG}pipeline": str(lineage["pipeline"]),
        f"{TAG}stage": str(lineage["stage"]),
        f"{TAG}domain": str(lineage["domain"]),
        f"{TAG}checkpoint": checkpoint,
        f"{TAG}model_sha256": str(lineage["model_sha256"]),
        f"{TAG}strategy_sha256": str(lineage.get("strategy_sha256", "")),
        f"{TAG}parent_model_id": parent[0] if parent else "",
        f"{TAG}parent_version": parent[1] if parent else "",
        f"{TAG}parent_checkpoint": str(lineage["parent"]["uri"]),
        f"{TAG}parent_model_sha256": str(lineage["parent"].get("model_sha256") or ""),
        f"{TAG}manifest_digests": ",".join(f"{i['domain']}={i.get('manifest_digest', '')}" for i in inputs),
        f"{TAG}shards": shards,
        f"{TAG}spec_sha256": str(lineage["spec_sha256"]),
        f"{TAG}code_version": f"lifelong {code.get('lifelong', 'unknown')} git {code.get('git_commit', 'unknown')}",
    }


def ensure_registered_model(tracker: Tracker, name: str) -> None:
    """Create the registered model ``name`` unless it exists (runs on the tracker's thread)."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.create_registered_model(name, description="lifelong: one version per committed stage")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_stage(tracker: Tracker, name: str, source_run: str, parent: tuple[str, str] | None,
                   lineage: Mapping[str, Any], checkpoint: str, params: Mapping[str, str]) -> tuple[str, str]:
    """Record one committed stage as an external LoggedModel and a version of ``name`` (on the tracker's thread).

    Args:
        source_run: the stage's MLflow run. parent: the parent stage's ``(model id, version)``, or None.
        lineage: the checkpoint's ``lineage.json``. checkpoint: its folder. params: :func:`hyperparameters`.
    Returns:
        ``(model id, version)``, e.g. ``("m-4f2…", "3")``.
    Raises:
        mlflow.exceptions.MlflowException: if the tracking store refuses a call.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.models.utils import get_external_mlflow_model_spec

    client, tags = tracker.client, stage_tags(lineage, checkpoint, parent)
    model = client.create_logged_model(
        tracker.experiment_id, name=f"{lineage['pipeline']}-stage-{lineage['stage']}", source_run_id=source_run,
        tags={**tags, "mlflow.model.isExternal": "true"}, params={k: v[:6000] for k, v in params.items()},
        model_type=MODEL_TYPE)
    with tempfile.TemporaryDirectory() as folder:
        get_external_mlflow_model_spec(model).save(str(Path(folder) / "MLmodel"))
        (Path(folder) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
        client.log_model_artifacts(model.model_id, folder)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id, _new_version(tracker, name, model, source_run, tags)


def _new_version(tracker: Tracker, name: str, model: Any, source_run: str, tags: Mapping[str, str]) -> str:
    """Register a LoggedModel as a new version of ``name``, tag the model with it, and return the version."""
    # The source is the model's artifact location rather than models:/<id>: MLflow's sqlite registry resolves the
    # latter through the process-wide tracking URI, not this client's (a TODO in its store).
    version = tracker.client.create_model_version(name, source=model.artifact_location, run_id=source_run,
                                                  tags={**tags, f"{TAG}model_id": model.model_id},
                                                  model_id=model.model_id)
    tracker.client.set_logged_model_tags(model.model_id, {f"{TAG}registered_model": name,
                                                          f"{TAG}version": str(version.version)})
    return str(version.version)


class ModelRegistry(Listener):
    """Listener of the stage engine: registers each committed stage (:func:`register_stage`), its parent being the
    previous stage's model.

    Args:
        tracker: the run's tracker. stages: the listener that owns the stage runs (the model's source run).
        name: the registered model. extra_params: params every model gets besides :func:`hyperparameters`.
    """

    def __init__(self, tracker: BackgroundTracker, stages: MlflowStages, name: str,
                 extra_params: Mapping[str, str] = {}) -> None:  # noqa: B006 - read only
        self.tracker, self.stages, self.name, self.extra = tracker, stages, name, dict(extra_params)
        self.params: dict[str, str] = {}
        self.models: dict[int, Future] = {}  # stage -> (model id, version), once registered

    def run_started(self, run: RunInfo) -> None:
        """Create the registered model if it does not exist yet."""
        self.params = hyperparameters(run.plan.pipeline, self.extra)
        self.tracker.with_tracker(ensure_registered_model, self.name)

    def stage_restored(self, stage: StageSpec, result: StageResult) -> None:
        """A stage committed by an earlier attempt of the run: its registered model, or (if that attempt died
        before registering it) its registration now."""
        found = self.tracker.with_tracker(registered_stage, self.name, stage.lineage["run_id"], stage.task_id)
        if found.result() is None:
            self.stage_committed(stage, result)
        else:
            self.models[stage.task_id] = found

    def stage_committed(self, stage: StageSpec, result: StageResult) -> None:
        """Queue the stage's registration after its parent's, with the ``lineage.json`` that the stage-run
        listener (``stages``, before this one) has queued for reading."""
        k = stage.task_id
        self.models[k] = self.tracker.with_tracker(register_stage, self.name, self.stages.runs[k],
                                                   self.models.get(k - 1), self.stages.lineages[k],
                                                   result.checkpoint, self.params)


def registered_stage(tracker: Tracker, name: str, run_id: str, k: int) -> tuple[str, str] | None:
    """``(model id, version)`` of stage k of lifelong run ``run_id``, or None if no complete model of it was logged
    (on the tracker's thread). A model whose registration as a version of ``name`` did not finish (the driver was
    killed in between) is registered now.
    """
    from mlflow.entities import LoggedModelStatus

    found = tracker.client.search_logged_models(
        [tracker.experiment_id], filter_string=f"tags.`{TAG}run_id` = '{run_id}' AND tags.`{TAG}stage` = '{k}'",
        max_results=100)
    models = [m for m in found if m.model_type == MODEL_TYPE and m.status == LoggedModelStatus.READY]
    if not models:
        return None
    model = models[0]
    versions = tracker.client.search_model_versions(f"name = '{name}' AND tags.`{TAG}model_id` = '{model.model_id}'")
    if versions:
        return model.model_id, str(versions[0].version)
    tags = {key: value for key, value in model.tags.items() if key.startswith(TAG)}
    return model.model_id, _new_version(tracker, name, model, model.source_run_id or "", tags)


@dataclass(frozen=True)
class StageModel:
    """One stage's model as MLflow recorded it.

    Attributes:
        model_id: the LoggedModel's id (``m-…``). version: its registered version (``"name/3"``, or "" if none).
        stage: the stage index. domain: its domain. run_id: lifelong's run id. checkpoint: the checkpoint folder.
        tags: every ``lifelong.*`` tag (see the module's docstring). params: the hyperparameters that shaped it.
        lineage: the recorded ``lineage.json`` (``inputs`` holds every shard's URI, path and sha256).
        source_run: the stage's MLflow run.
    """

    model_id: str
    version: str
    stage: int
    domain: str
    run_id: str
    checkpoint: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    source_run: str = ""

    @property
    def parent_model_id(self) -> str:
        """The parent stage's model id ("" when the parent is the run's initial model)."""
        return self.tags.get(f"{TAG}parent_model_id", "")

    def tag(self, key: str) -> str:
        """The tag ``lifelong.<key>`` ("" if absent)."""
        return self.tags.get(f"{TAG}{key}", "")


def client_for(uri: str) -> Any:
    """An ``MlflowClient`` on an existing tracking store (``lineage`` and ``audit`` only read).

    Raises:
        LifelongError: if ``uri`` is a ``sqlite:///`` file that does not exist (MLflow would create an empty one).
    """
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per lineage.json read
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise LifelongError(f"no MLflow store at {redact_uri(uri)}: pass --tracking-uri (or --workdir) of the run")
    return MlflowClient(tracking_uri=uri)


def read_model(client: Any, model_id: str) -> StageModel:
    """Read one stage model (tags, params, recorded ``lineage.json``) by its LoggedModel id.

    Raises:
        LifelongError: if it is not a lifelong stage model or its ``lineage.json`` is missing.
    """
    import mlflow.artifacts

    model = client.get_logged_model(model_id)
    tags = {k: v for k, v in model.tags.items() if k.startswith(TAG)}
    if f"{TAG}stage" not in tags:
        raise LifelongError(f"models:/{model_id} is not a lifelong stage model (no {TAG}stage tag)")
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{model.artifact_location}/{LINEAGE_FILE}",
                                                       dst_path=folder, tracking_uri=client.tracking_uri)
            lineage = json.loads(Path(path).read_text())
        except Exception as e:  # noqa: BLE001 - any artifact-store failure: name the model
            raise LifelongError(f"models:/{model_id}: cannot read its {LINEAGE_FILE}: {str(e).splitlines()[0]}")
    version = f"{tags[TAG + 'registered_model']}/{tags[TAG + 'version']}" if f"{TAG}version" in tags else ""
    return StageModel(model_id, version, int(tags[f"{TAG}stage"]), tags.get(f"{TAG}domain", ""),
                      tags.get(f"{TAG}run_id", ""), tags.get(f"{TAG}checkpoint", ""), tags, dict(model.params),
                      lineage, model.source_run_id or "")


def recorded_storage(client: Any, model: StageModel) -> Storage:
    """How the run reached its storage: the ``storage.s3`` params of its pipeline run (endpoint, region,
    profile; credentials come from the environment, as they were never recorded)."""
    from mlflow.exceptions import MlflowException

    from orchestrator.spec import S3Spec

    params: dict[str, str] = {}
    try:
        stage_run = client.get_run(model.source_run)
        parent = stage_run.data.tags.get("mlflow.parentRunId")
        params = client.get_run(parent).data.params if parent else {}
    except MlflowException:
        pass
    fields = {k: params.get(f"storage.s3.{k}") for k in ("endpoint_url", "region", "profile")}
    return Storage.from_settings(S3Spec(**{k: v for k, v in fields.items() if v not in (None, "", "None")}))


def _experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]


def run_models(client: Any, ref: str) -> list[StageModel]:
    """Every stage model of a run, in stage order; ``ref`` is lifelong's run id or the MLflow id of the run's
    pipeline run or of one of its stage runs.

    Raises:
        LifelongError: if no stage model belongs to such a run.
    """
    from mlflow.exceptions import MlflowException

    run_id = ref
    try:
        run_id = client.get_run(ref).data.tags.get(f"{TAG}run_id", ref)
    except MlflowException:
        pass  # not an MLflow run id: lifelong's own
    found = client.search_logged_models(_experiment_ids(client),
                                        filter_string=f"tags.`{TAG}run_id` = '{run_id}'", max_results=10000)
    models = [m for m in found if m.model_type == MODEL_TYPE]
    if not models:
        raise LifelongError(f"no registered stage model of a run '{ref}' at {redact_uri(client.tracking_uri)}")
    return sorted((read_model(client, m.model_id) for m in models), key=lambda m: m.stage)


def resolve(client: Any, ref: str) -> StageModel:
    """The stage model that ``ref`` names: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/m-ID``, or a
    run (see :func:`run_models`), whose last stage's model it then is.

    Raises:
        LifelongError: if ``ref`` names no lifelong stage model (the message names it).
    """
    from mlflow.exceptions import MlflowException

    if not ref.startswith("models:/"):
        return run_models(client, ref)[-1]
    body = ref.removeprefix("models:/")
    try:
        if body.startswith("m-") and "/" not in body:
            return read_model(client, body)
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = body.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as e:
        raise LifelongError(f"{ref}: {e.message.splitlines()[0]}") from None
    model_id = version.tags.get(f"{TAG}model_id")
    if not model_id:
        raise LifelongError(f"{ref} is not a lifelong stage model (its version has no {TAG}model_id tag)")
    return read_model(client, model_id)


def chain(client: Any, last: StageModel, max_stages: int = 100_000) -> list[StageModel]:
    """``last`` and its ancestors, back to the first stage (whose parent is an initial model), newest first.

    Raises:
        LifelongError: if a parent model is missing from the store.
    """
    from mlflow.exceptions import MlflowException

    out = [last]
    while out[-1].parent_model_id and len(out) < max_stages:
        try:
            out.append(read_model(client, out[-1].parent_model_id))
        except MlflowException as e:  # a missing parent breaks the chain: say which
            raise LifelongError(f"models:/{out[-1].model_id}: its parent models:/{out[-1].parent_model_id} cannot "
                                f"be read: {str(e).splitlines()[0]}") from None
    return out


def lineage_record_of(models: list[StageModel]) -> dict[str, Any]:
    """The chain ``models`` (newest first, from :func:`chain`) as ``lifelong lineage --json`` prints it: per stage
    its model, version, run, checkpoint with digests, spec hash, code version, hyperparameters and data (each
    domain's URI and manifest digest, each shard's path, sha256 and rows); and the root (initial model)."""
    stages = [{
        "stage": m.stage, "domain": m.domain, "model_id": m.model_id, "model_uri": f"models:/{m.model_id}",
        "version": m.version, "run_id": m.run_id, "mlflow_run_id": m.source_run, "checkpoint": m.checkpoint,
        "model_sha256": m.tag("model_sha256"), "strategy_sha256": m.tag("strategy_sha256"),
        "spec_sha256": m.tag("spec_sha256"), "code_version": m.tag("code_version"),
        "parent_model_id": m.parent_model_id or None, "hyperparameters": dict(m.params),
        "data": [{"domain": i["domain"], "uri": i["uri"], "split": i["split"], "manifest_digest":
                  i.get("manifest_digest", ""), "split_digest": i["digest"], "shards": i["shards"]}
                 for i in m.lineage.get("inputs", [])],
    } for m in models]
    first = models[-1]
    return {"model": stages[0]["model_uri"], "stages": stages,
            "root": {"checkpoint": first.tag("parent_checkpoint"), "model_sha256": first.tag("parent_model_sha256")}}
