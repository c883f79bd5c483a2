"""Secrets kept out of everything lifelong prints or writes (logs, MLflow params, run records, exported YAML).

A secret is either the value of a field whose name says so (``storage.s3.secret_access_key``,
``storage.s3.session_token``, a ``--set`` of such a field) or the password part of a URI
(``http://user:PASSWORD@host``, an MLflow tracking server behind basic auth). MLflow's own ``MLFLOW_TRACKING_TOKEN`` and
``MLFLOW_TRACKING_PASSWORD`` are read by MLflow from the environment and never pass through lifelong.

- :func:`is_secret_key`: whether a field name (the last part of a dotted key) names a secret;
- :func:`redact_uri`: a URI with its password and secret-named query values replaced by ``***``;
- :func:`redact_text`: the same for every URI inside a message;
- :func:`redact_args`: a command line as it may be printed;
- :func:`redact_overrides`: ``--set`` items as they may be recorded (secret fields left out, URIs redacted);
- :func:`hide_secrets`: a raw spec with its secrets masked (a saved request), or without them (``tune --export``);
- :func:`restore_secrets`: a masked spec's secrets taken again from the spec they came from.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_NAME = re.compile(r"(?:^|_)(?:secret|password|passwd|token|credentials?|access_key|key_id|api_key)(?:_|$)",
                          re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Whether a field called ``name`` (the last part of a dotted key, or a query parameter) holds a secret:
    ``secret_access_key``, ``access_key_id``, ``session_token``, ``password``; not ``tokenizer`` or ``max_tokens``."""
    return bool(_SECRET_NAME.search(name.rsplit(".", 1)[-1]))


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user part and the values of secret-named query parameters replaced by
    ``***`` (``http://alice:***@host:5000/?token=***``); any other string comes back unchanged."""
    return _scrub(uri, MASK)


def _scrub(uri: str, mask: str | None) -> str:
    """``uri`` with its password and secret-named query values replaced by ``mask``, or, with ``mask`` None, left
    out (``http://alice@host:5000/``); ``uri`` itself if it holds neither or is not a URI."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URI (a bad port, say): nothing to find in it
        return uri
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{mask}@{host}" if mask is not None else f"{user}@{host}" if user else host
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(is_secret_key(k) for k, _ in pairs):
        query = urlencode([(k, mask if is_secret_key(k) else v) for k, v in pairs
                           if mask is not None or not is_secret_key(k)], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^\s/:@]*):[^\s/@]*@")


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with the password of every ``scheme://user:password@`` in it
    replaced by ``***``."""
    return _USERINFO.sub(rf"\1:{MASK}@", text)


def is_redacted(uri: str) -> bool:
    """Whether ``uri`` is one that :func:`redact_uri` gave: its password, or a secret-named query value, is ``***``
    (such a URI can no longer be used as it is)."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return False
    return password == MASK or any(is_secret_key(k) and v == MASK for k, v in parse_qsl(parts.query))


def redact_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """``--set key=value`` items as lifelong records them (``run.json``, a tune folder): an item setting a secret
    field is left out (a resume takes that secret from the spec file or the environment again), a URI value loses
    its password."""
    kept = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not is_secret_key(key.strip()):
            shown = redact_uri(value.strip())
            kept.append(item if shown == value.strip() else f"{key}{sep}{shown}")
    return tuple(kept)


def redact_args(argv: Sequence[str]) -> list[str]:
    """A command line as it may be shown: ``KEY=VALUE`` items (``--set``, ``--env``) of a secret-named key keep
    ``KEY=***``, URIs lose their password."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={MASK}" if sep and is_secret_key(key.strip()) else redact_text(arg))
    return out


def redact_command(command: str) -> str:
    """A shell command line (a job's entrypoint) as it may be shown: :func:`redact_args` on its words."""
    try:
        return shlex.join(redact_args(shlex.split(command)))
    except ValueError:  # unbalanced quotes: not split into words, only its URIs redacted
        return redact_text(command)


def hide_secrets(raw: Any, drop: bool = False, prefix: str = "") -> tuple[Any, list[str]]:
    """A copy of a raw spec (nested dicts and lists, as parsed from YAML) with its secrets hidden, and the dotted
    keys of what was hidden. Secret-named fields become ``***`` and URIs lose their password to ``***``
    (:func:`restore_secrets` fills them in again); with ``drop`` (a file a user may share and run as it is:
    ``tune --export``), such fields are left out and URIs keep no password at all (``http://alice@host``).

    Args:
        raw: the parsed spec. drop: leave the secrets out rather than mask them. prefix: the dotted key of ``raw``
            inside the whole spec ("" at the top).
    """
    hidden: list[str] = []
    if isinstance(raw, dict):
        out = {}
        for k, v in raw.items():
            key = f"{prefix}{k}"
            if is_secret_key(str(k)) and v is not None:
                hidden.append(key)
                if not drop:
                    out[k] = MASK
                continue
            out[k], inner = hide_secrets(v, drop, f"{key}.")
            hidden += inner
        return out, hidden
    if isinstance(raw, list):
        items = [hide_secrets(v, drop, f"{prefix}{i}.") for i, v in enumerate(raw)]
        return [v for v, _ in items], [k for _, inner in items for k in inner]
    if not isinstance(raw, str) or redact_uri(raw) == raw:
        return raw, hidden
    return _scrub(raw, None if drop else MASK), [f"{prefix.rstrip('.')} (credentials in the URI)"]


def is_masked(value: Any) -> bool:
    """Whether a leaf of a dumped spec is a secret that was masked (``***``, pydantic's ``**********``) or a
    redacted URI."""
    return isinstance(value, str) and bool(value) and (set(value) == {"*"} or is_redacted(value))


def restore_secrets(masked: Any, source: Any) -> Any:
    """A copy of ``masked`` (a spec's JSON dump, secrets masked) with each masked leaf taken from ``source`` at the
    same place: ``source`` is the same spec's ``model_dump()`` with its secrets (pydantic ``SecretStr`` values are
    unwrapped), or None when the spec file it came from is gone. A masked leaf that ``source`` lacks becomes None
    (the environment then supplies it: ``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_URI``)."""
    if isinstance(masked, dict):
        return {k: restore_secrets(v, source.get(k) if isinstance(source, dict) else None) for k, v in masked.items()}
    if isinstance(masked, list):
        return [restore_secrets(v, source[i] if isinstance(source, list) and i < len(source) else None)
                for i, v in enumerate(masked)]
    if not is_masked(masked):
        return masked
    value = source.get_secret_value() if hasattr(source, "get_secret_value") else source
    return value if isinstance(value, str) and redact_uri(value) in (masked, value) else None
