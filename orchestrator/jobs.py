"""`lifelong submit | status | logs | stop`: a pipeline run as a Ray job, through Ray's Jobs API.

``submit`` validates the pipeline here, then ships it (its YAML, or a whole ``--working-dir``) to the cluster through
the job's ``runtime_env`` and runs ``lifelong run`` there as the job's entrypoint; the run connects to the cluster
through ``$RAY_ADDRESS``, which Ray sets for a job's driver. The job's id names the run's MLflow parent run, so a job
and its lineage are found from each other. ``status``, ``logs`` and ``stop`` follow and end a job by its id.

The address is the cluster's dashboard (``http://HOST:8265``): ``--address``, else ``$RAY_API_SERVER_ADDRESS``, else
``$RAY_ADDRESS`` when it is an ``http(s)://`` address, else ``http://127.0.0.1:8265`` (as Ray's ``ray job`` CLI).
Token authentication (on by default for local clusters since Ray 2.59) is Ray's own: ``RAY_AUTH_MODE=token`` with
the token in ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from orchestrator.errors import LifelongError, check_reachable
from orchestrator.redact import redact_command, redact_uri
from orchestrator.spec import bind, load_pipeline

T = TypeVar("T")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HINT = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, "
             "~/.ray/auth_token)")


def jobs_address(explicit: str | None) -> str:
    """The Jobs API address: ``explicit``, ``$RAY_API_SERVER_ADDRESS``, an ``http(s)://`` ``$RAY_ADDRESS``, or
    :data:`DEFAULT_ADDRESS`.

    Raises:
        LifelongError: an address that is not ``http(s)://HOST[:PORT]``.
    """
    env = os.environ.get("RAY_ADDRESS", "")
    address = (explicit or os.environ.get("RAY_API_SERVER_ADDRESS")
               or (env if env.startswith(("http://", "https://")) else None) or DEFAULT_ADDRESS)
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise LifelongError(f"--address {address}: give the cluster's dashboard as http://HOST:8265")
    return address.rstrip("/")


def connect(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for the cluster at ``address`` (see :func:`jobs_address`).

    Raises:
        LifelongError: nothing listens there (at once, not after the client's retries), the cluster refuses the
            token, or the dashboard does not answer as a Jobs API.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # The SDK's INFO lines (package uploads, websocket closes) are not the user's business; warnings still show.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    resolved = jobs_address(address)
    url = urlparse(resolved)
    port = url.port or (443 if url.scheme == "https" else 80)
    check_reachable(url.hostname or "", port, f"the Ray Jobs API at --address {resolved}")
    try:
        return JobSubmissionClient(resolved)
    except AuthenticationError as e:
        raise LifelongError(f"the Ray cluster at {resolved} refused the request: {_first_line(e)}; "
                            f"{AUTH_HINT}") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LifelongError(f"the Ray Jobs API at {resolved} did not answer: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextmanager
def _job_errors(job_id: str) -> Iterator[None]:
    """Turn the Jobs SDK's errors for ``job_id`` into one-line :class:`LifelongError` s."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise LifelongError(f"job {job_id}: the cluster refused the request: {_first_line(e)}; {AUTH_HINT}") \
            from None
    except RuntimeError as e:  # the SDK raises RuntimeError for an unknown job and for HTTP errors
        message = _first_line(e)
        if "does not exist" in message or "404" in message:
            raise LifelongError(f"job {job_id} does not exist on this cluster") from None
        raise LifelongError(f"job {job_id}: {message}") from None


def transient(e: BaseException) -> bool:
    """Whether a Jobs API error is worth retrying: the cluster's job agent not up yet (a cluster that has just
    started) or a gateway error in front of the dashboard."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("No available agent" in text
                                            or any(f"status code {c}" in text for c in (502, 503, 504)))


def retry_transient(call: Callable[[], T], timeout_s: float = 60.0) -> T:
    """``call()``, retried with exponential back-off (0.5 s up to 5 s between tries) for up to ``timeout_s`` seconds
    while it fails with a :func:`transient` error; any other error, or the last one, is raised."""
    import tenacity

    return tenacity.Retrying(retry=tenacity.retry_if_exception(transient), reraise=True,
                             wait=tenacity.wait_exponential(multiplier=0.5, max=5.0),
                             stop=tenacity.stop_after_delay(timeout_s))(call)


@dataclass(frozen=True)
class Submission:
    """A submitted job.

    Attributes:
        job_id: the job's submission id (``lifelong-<pipeline>-<UTC time>-<4 random hex digits>``), also the name of the run's MLflow
            parent run. address: the Jobs API it was sent to. pipeline: the pipeline's name. entrypoint: the
            command the job runs, as it may be shown (secrets in it are ``***``). tracking: where the run's MLflow
            records go, as the job will see it (a password in the URI is ``***``).
    """

    job_id: str
    address: str
    pipeline: str
    entrypoint: str
    tracking: str


@dataclass(frozen=True)
class SubmitRequest:
    """What ``lifelong submit`` sends.

    Attributes:
        pipeline: the pipeline YAML (inside ``working_dir`` when that is given). overrides: ``--set`` values.
        address: the Jobs API (see :func:`jobs_address`). working_dir: a folder shipped as the job's working
            folder (the pipeline's own files: a user model, a strategy plugin), or None to ship the YAML alone.
        workdir: ``--workdir`` of the run on the cluster (its run folder, and by default its shards and MLflow
            store, on the node that runs the job's driver). data_root,
            tracking_uri: ``--data-root`` and ``--tracking-uri`` of the run, as paths and URIs seen from the
            cluster. env: extra environment variables of the job (``KEY=VALUE``).
    """

    pipeline: Path
    overrides: tuple[str, ...] = ()
    address: str | None = None
    working_dir: Path | None = None
    workdir: str = "/tmp/lifelong-runs"
    data_root: str | None = None
    tracking_uri: str | None = None
    env: tuple[str, ...] = ()


def job_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict.

    Raises:
        LifelongError: a string without ``=`` or with an empty key.
    """
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LifelongError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def submit(request: SubmitRequest) -> Submission:
    """Validate the pipeline here, then submit ``lifelong run`` of it as a Ray job.

    Returns:
        the :class:`Submission`; the job runs on (it is not waited for).
    Raises:
        SpecError: a bad pipeline (nothing is sent). LifelongError: a pipeline outside ``--working-dir``, a bad
            ``--env``, or an unreachable or refusing cluster.
    """
    spec = load_pipeline(request.pipeline, list(request.overrides))
    bind(spec, str(request.pipeline))
    # `lifelong stop` interrupts the job's driver with SIGINT (a KeyboardInterrupt: the run ends its stage and its
    # MLflow runs KILLED; Ray's own SIGTERM handler in a driver kills it on the spot) and gives it 30 s to do so.
    env = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "30", **job_env(request.env)}
    client = connect(request.address)
    job_id = f"lifelong-{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    with tempfile.TemporaryDirectory(prefix="lifelong-submit-") as tmp:
        if request.working_dir is not None:
            root = request.working_dir.resolve()
            if not request.pipeline.resolve().is_relative_to(root):
                raise LifelongError(f"{request.pipeline}: the pipeline must be inside --working-dir {root}")
            in_job = request.pipeline.resolve().relative_to(root).as_posix()
        else:
            root, in_job = Path(tmp), request.pipeline.name
            shutil.copyfile(request.pipeline, root / in_job)
        argv = ["lifelong", "run", in_job, "--no-progress", "--run-name", job_id, "--workdir", request.workdir]
        for o in request.overrides:
            argv += ["--set", o]
        if request.data_root:
            argv += ["--data-root", request.data_root]
        if request.tracking_uri:
            argv += ["--tracking-uri", request.tracking_uri]
        entrypoint = shlex.join(argv)
        with _job_errors(job_id):
            retry_transient(lambda: client.submit_job(
                entrypoint=entrypoint, submission_id=job_id, runtime_env={"working_dir": str(root), "env_vars": env},
                metadata={"lifelong.pipeline": spec.name, "lifelong.spec_sha256": spec.spec_hash()}))
    tracking = (request.tracking_uri or spec.tracking.uri
                or f"sqlite:///{request.workdir.rstrip('/')}/mlflow.db on the node of the job's driver")
    return Submission(job_id, jobs_address(request.address), spec.name, redact_command(entrypoint),
                      redact_uri(tracking))


@dataclass(frozen=True)
class JobState:
    """A job as the Jobs API reports it.

    Attributes:
        job_id: the submission id. status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED. message: Ray's message
            (why a job failed, for one). entrypoint: the command (secrets in it ``***``). start_time, end_time:
            seconds since the epoch (None until known). driver_node_id: the node the job's driver ran on ("" until
            known).
    """

    job_id: str
    status: str
    message: str
    entrypoint: str
    start_time: float | None
    end_time: float | None
    driver_node_id: str

    @property
    def duration_s(self) -> float | None:
        """Seconds the job ran (so far, while it runs)."""
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


def status(job_id: str, address: str | None) -> JobState:
    """The job's current state.

    Raises:
        LifelongError: an unknown job, or an unreachable or refusing cluster.
    """
    return _state(connect(address), job_id)


def _state(client: Any, job_id: str) -> JobState:
    """The job's state from an open ``JobSubmissionClient``."""
    with _job_errors(job_id):
        info = client.get_job_info(job_id)
    return JobState(job_id, str(getattr(info.status, "value", info.status)), info.message or "",
                    redact_command(info.entrypoint), _seconds(info.start_time), _seconds(info.end_time),
                    info.driver_node_id or "")


def _seconds(ms: int | None) -> float | None:
    """The Jobs API's milliseconds since the epoch as seconds (None when unset)."""
    return ms / 1000.0 if ms else None


def logs(job_id: str, address: str | None, follow: bool, write: Callable[[str], object]) -> None:
    """Write the job's output so far through ``write``; with ``follow``, keep writing it as it
    comes until the job ends.

    Raises:
        LifelongError: an unknown job, or an unreachable or refusing cluster.
    """
    client = connect(address)
    with _job_errors(job_id):
        if not follow:
            write(client.get_job_logs(job_id))
            return
        client.get_job_info(job_id)  # an unknown job fails here, not after the stream opens

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())


def stop(job_id: str, address: str | None, wait_s: float = 60.0) -> JobState:
    """Ask the job to stop and wait (up to ``wait_s`` seconds) until it is in a terminal state.

    Returns:
        the job's state after the wait (STOPPED, or the state it had already ended in).
    Raises:
        LifelongError: an unknown job, or an unreachable or refusing cluster.
    """
    client = connect(address)
    with _job_errors(job_id):
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while str(getattr(client.get_job_status(job_id), "value", "")) not in TERMINAL:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the Jobs API has no blocking wait
    return _state(client, job_id)
