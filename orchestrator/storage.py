"""One way to reach local paths, ``file://`` and ``s3://`` URIs (and any other fsspec URI).

Shards, manifests, checkpoints and replay buffers are all read and written through a :class:`Storage`, which hands
out an fsspec filesystem (s3fs for ``s3://``) and a pyarrow filesystem for the same URI, both configured alike:

- S3 settings come from the pipeline's ``storage.s3`` block; each unset one falls back to the standard AWS
  environment: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
  ``AWS_PROFILE``, and the default credential chain (``AWS_ACCESS_KEY_ID`` ..., ``~/.aws/credentials``).
- pyarrow's ``S3FileSystem`` ignores ``AWS_ENDPOINT_URL`` (apache/arrow#44119), so the endpoint is always passed to it
  explicitly (``endpoint_override`` and ``scheme``).
- A :class:`Storage` is a small frozen dataclass: it pickles to Ray workers with its settings, and its ``repr``
  masks the secrets, so they never reach logs or MLflow params.

Commit protocol (nothing is ever visible half-written): :meth:`Storage.write_bytes` writes a temporary key
``<name>.tmp-<random>`` beside the target and then moves it onto the target (a rename on local disks, a server-side
copy on S3, which makes the whole object appear at once). :meth:`Storage.commit` writes a multi-file artefact (a
domain's shards, a checkpoint) the same way: its members first, each atomically, and its commit record
(``manifest.json``, ``lineage.json``) last; a reader looks for the record first, so an artefact without one does not
exist for it. Shards, checkpoints and replay-buffer parts all go through these two methods.

Outages: every read and write of object storage is retried, with exponential backoff (tenacity), while the store
cannot be reached, for up to ``retry_seconds`` (``storage.s3.retry_seconds``); after that the error names the URI and
the endpoint. A shard being streamed is read again from the row group where the outage hit it
(:meth:`Storage.retrying`).

:func:`join`, :func:`is_local` and :func:`local_path` are the only places that look at a URI's scheme.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from orchestrator.errors import LifelongError, one_line
from orchestrator.redact import redact_uri

T = TypeVar("T")
# What a store that cannot be reached raises, as botocore, aiobotocore, aiohttp and pyarrow (curl) word it.
UNREACHABLE = ("Could not connect", "Connection refused", "NETWORK_CONNECTION", "EndpointConnectionError",
               "ConnectTimeout", "Connect timeout", "ReadTimeout", "Connection reset", "ConnectionResetError",
               "ServerDisconnected", "ServiceUnavailable", "SlowDown", "curlCode: 7", "curlCode: 28")


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says that the store could not be reached (worth retrying), rather than what it answered
    (a missing key, a refused credential, a bad request)."""
    text = f"{type(error).__name__}: {error}"
    return any(marker in text for marker in UNREACHABLE)


class StorageError(LifelongError):
    """A URI cannot be reached, read or written (the message names it)."""


class ObjectExistsError(StorageError, FileExistsError):
    """A write was refused because its target exists (nothing committed is ever overwritten)."""


class MissingObjectError(StorageError, FileNotFoundError):
    """A read found nothing at its URI (as opposed to a store it could not reach)."""


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v), None)


@dataclass(frozen=True)
class Storage:
    """Resolved settings for reaching URIs; S3 settings are used only for ``s3://`` URIs.

    Attributes:
        endpoint_url: S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (None: AWS).
        region: S3 region (None: ``us-east-1``).
        profile: AWS profile to take credentials from.
        key, secret, token: explicit credentials (None: the default AWS credential chain). Masked in ``repr``.
        retry_seconds: how long reads and writes of object storage are retried while it cannot be reached.
    """

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    retry_seconds: float = 60.0

    @classmethod
    def from_settings(cls, s3: Any | None = None, env: Mapping[str, str] | None = None) -> Storage:
        """Build from a spec's ``storage.s3`` block (any object with the same attribute names, secrets as pydantic
        ``SecretStr``), falling back to the AWS environment variables for unset fields."""
        env = os.environ if env is None else env

        def secret(name: str) -> str | None:
            value = getattr(s3, name, None) if s3 is not None else None
            return value.get_secret_value() if value is not None else None

        return cls(
            endpoint_url=_first(getattr(s3, "endpoint_url", None), env.get("AWS_ENDPOINT_URL_S3"),
                                env.get("AWS_ENDPOINT_URL")),
            region=_first(getattr(s3, "region", None), env.get("AWS_REGION"), env.get("AWS_DEFAULT_REGION")),
            profile=_first(getattr(s3, "profile", None), env.get("AWS_PROFILE")),
            key=secret("access_key_id"), secret=secret("secret_access_key"), token=secret("session_token"),
            retry_seconds=float(getattr(s3, "retry_seconds", 60.0)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        hidden = ", ".join(f"{f.name}=***" for f in fields(self) if not f.repr and getattr(self, f.name))
        return f"Storage({', '.join(p for p in (shown, hidden) if p)})"

    # ---------------------------------------------------------------- filesystems

    def fsspec(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """``(filesystem, path)`` for ``uri`` (a path or URI) through fsspec (s3fs for ``s3://``)."""
        uri = os.fspath(uri)
        if uri.startswith(("s3://", "s3a://")):
            import s3fs

            client: dict[str, Any] = {}
            if self.endpoint_url:
                client["endpoint_url"] = self.endpoint_url
            if self.region:
                client["region_name"] = self.region
            fs = s3fs.S3FileSystem(key=self.key, secret=self.secret, token=self.token, profile=self.profile,
                                   client_kwargs=client, skip_instance_cache=True)
            return fs, uri.split("://", 1)[1]
        return fsspec.core.url_to_fs(uri)

    def arrow(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(pyarrow filesystem, path)`` for ``uri``; for ``s3://`` the endpoint is passed explicitly."""
        if uri.startswith(("s3://", "s3a://")):
            kwargs: dict[str, Any] = {"region": self.region or "us-east-1"}
            if self.endpoint_url:
                parsed = urlparse(self.endpoint_url)
                kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
            key, secret, token = self._credentials()
            if key and secret:
                kwargs.update(access_key=key, secret_key=secret, session_token=token)
            return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1]
        return pafs.FileSystem.from_uri(local_path(uri) if is_local(uri) else uri)

    def ray_filesystem(self, uri: str) -> pafs.FileSystem | None:
        """The filesystem to hand Ray Data for ``uri``: None for local paths and ``file://`` (Ray resolves those
        itself), else :meth:`arrow`'s, which carries the endpoint and credentials to the read tasks."""
        return None if is_local(uri) else self.arrow(uri)[0]

    def _credentials(self) -> tuple[str | None, str | None, str | None]:
        """Explicit credentials, else those of ``profile`` (botocore), else None (pyarrow's default chain)."""
        if self.key and self.secret:
            return self.key, self.secret, self.token
        if self.profile:
            import botocore.session

            creds = botocore.session.Session(profile=self.profile).get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                return frozen.access_key, frozen.secret_key, frozen.token
        return None, None, None

    def retrying(self, uri: str, fn: Callable[[], T]) -> T:
        """``fn()``, called again with exponential backoff (0.5 s doubling, at most 5 s apart) while it fails
        because object storage cannot be reached, for up to ``retry_seconds`` in all (local paths: once).

        Raises:
            StorageError: the store stayed unreachable for ``retry_seconds``, or no credentials were found (naming
                ``uri`` and the endpoint).
            Exception: whatever else ``fn`` raises, at once.
        """
        if is_local(uri) or self.retry_seconds <= 0:
            return fn()
        import tenacity

        def warn(state: tenacity.RetryCallState) -> None:  # once per outage, on stderr (the driver's, a worker's log)
            if state.attempt_number == 1:
                print(f"lifelong: cannot reach {uri}{self._where()}; retrying for up to {self.retry_seconds:g} s",
                      file=sys.stderr, flush=True)

        retryer = tenacity.Retrying(retry=tenacity.retry_if_exception(unreachable), reraise=True,
                                    stop=tenacity.stop_after_delay(self.retry_seconds),
                                    wait=tenacity.wait_exponential(multiplier=0.5, max=5), before_sleep=warn)
        try:
            return retryer(fn)
        except Exception as e:  # noqa: BLE001 - only an outage and missing credentials are rewritten
            if "Credentials" in type(e).__name__ or "Unable to locate credentials" in str(e):
                raise StorageError(f"no AWS credentials to reach {uri}{self._where()}: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or storage.s3 "
                                   f"({type(e).__name__})") from None
            if not unreachable(e):
                raise
            raise StorageError(f"cannot reach {uri}{self._where()} for {self.retry_seconds:g} s "
                               f"(storage.s3.retry_seconds): {one_line(str(e))[:200]}") from None

    # ---------------------------------------------------------------- whole objects

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` exists (file or folder/prefix).

        Raises:
            StorageError: if the store cannot be reached (e.g. a wrong endpoint or missing bucket).
        """
        fs, path = self.fsspec(uri)
        return self._exists_on(fs, path, uri)

    def _exists_on(self, fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bool:
        try:
            return bool(self.retrying(uri, lambda: fs.exists(path)))
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - s3fs/botocore raise many unrelated types
            raise StorageError(f"cannot reach {uri}{self._where()}: {e}") from None

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of ``uri``.

        Raises:
            MissingObjectError: if it does not exist (a :class:`StorageError` and a ``FileNotFoundError``).
            StorageError: if it cannot be read (the store unreachable for ``retry_seconds``, a refused credential).
        """
        fs, path = self.fsspec(uri)
        try:
            return bytes(self.retrying(uri, lambda: fs.cat_file(path)))
        except FileNotFoundError:
            raise MissingObjectError(f"{uri} does not exist") from None
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot read {uri}{self._where()}: {e}") from None

    def write_bytes(self, uri: str, data: bytes, overwrite: bool = False) -> None:
        """Write ``data`` (bytes) to ``uri`` through a temporary key committed by a move.

        Raises:
            ObjectExistsError: if ``uri`` exists and ``overwrite`` is false.
            StorageError: if the write fails (the temporary key is removed; the target is untouched).
        """
        fs, path = self.fsspec(uri)
        if not overwrite and self._exists_on(fs, path, uri):
            raise ObjectExistsError(f"{uri} already exists; refusing to overwrite it")
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"

        def put() -> None:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)

        try:
            self.retrying(uri, put)
        except BaseException as e:
            try:
                if fs.exists(tmp):
                    fs.rm(tmp)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
            if isinstance(e, StorageError):
                raise
            if isinstance(e, Exception):
                raise StorageError(f"cannot write {uri}{self._where()}: {e}") from None
            raise

    def list_folders(self, uri: str) -> list[str]:
        """The URIs of the folders (prefixes, on object storage) directly under ``uri``, in name order; [] if
        ``uri`` does not exist.

        Raises:
            StorageError: if the store stays unreachable for ``retry_seconds``.
        """
        fs, path = self.fsspec(uri)
        try:
            entries = self.retrying(uri, lambda: fs.ls(path, detail=True))
        except FileNotFoundError:
            return []
        names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
        return [join(uri, name) for name in sorted(names)]

    def remove(self, uri: str) -> None:
        """Delete ``uri`` and everything under it, if it exists (best effort: a failure leaves it in place).

        Raises:
            nothing: a store that cannot be reached or refuses is ignored (what is left is never read as valid).
        """
        fs, path = self.fsspec(uri)
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def commit(self, folder: str, members: Iterable[tuple[str, bytes]], record: str,
               record_bytes: Callable[[], bytes]) -> str:
        """Write a multi-file artefact under ``folder`` (path or URI) and return ``folder``: each ``(relative path,
        bytes)`` member atomically (:meth:`write_bytes`; leftovers of an unfinished earlier write are replaced), then
        the commit record ``<folder>/<record>`` with the bytes ``record_bytes()`` returns once every member is written
        (a manifest can list the members' digests).

        Raises:
            FileExistsError: if the record exists, before anything is written or when it appears meanwhile (nothing
                committed is ever overwritten).
            StorageError: if the store cannot be reached or written (the message names the URI).
        """
        target = join(folder, record)
        if self.exists(target):
            raise FileExistsError(f"{folder} already holds a committed {record}; refusing to overwrite it")
        for name, data in members:
            self.write_bytes(join(folder, name), data, overwrite=True)
        try:
            self.write_bytes(target, record_bytes())
        except ObjectExistsError:
            raise FileExistsError(f"{target} appeared while {folder} was written; refusing to overwrite it") from None
        return folder

    def _where(self) -> str:
        return f" (endpoint {redact_uri(self.endpoint_url)})" if self.endpoint_url else ""


def replace_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to the local file ``path`` in one step: a temporary file beside it, then renamed onto it, so
    that a reader (or a crash) sees the old content or the new one, never half of one (the run's own records:
    ``run.json``, ``pipeline.json``, ``report.json``, ``_COMPLETED``)."""
    target = os.fspath(path)
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_local(uri: str | os.PathLike[str]) -> bool:
    """True for a plain path or a ``file://`` URI, False for object storage and other fsspec URIs."""
    text = os.fspath(uri)
    return "://" not in text or text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> str:
    """The absolute path of a local path or ``file://`` URI (see :func:`is_local`)."""
    return os.path.abspath(os.fspath(uri).removeprefix("file://"))


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """``uri/part/...`` with single slashes, for paths and URIs alike."""
    return "/".join([os.fspath(uri).rstrip("/"), *(p.strip("/") for p in parts)])
