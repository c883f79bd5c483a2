"""User-facing errors.

Every error a user can cause (bad YAML, unknown strategy, missing shard, wrong schema, NaN loss, unreachable
endpoint) is raised as a :class:`LifelongError` whose message names the culprit: the file, the field path, the shard
or the URI. The CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations

import socket


class LifelongError(Exception):
    """An error caused by the user's input; the message names the culprit in one line."""


class SpecError(LifelongError):
    """The pipeline YAML is malformed or fails validation.

    Attributes:
        problems: ``(field path, message)`` pairs, one per problem found.
    """

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        joined = "; ".join(f"{path}: {msg}" if path else msg for path, msg in problems)
        super().__init__(f"{source}: {joined}")


class ShardError(LifelongError):
    """A shard or manifest is missing, corrupt, or does not have the expected schema."""


class TrainingError(LifelongError):
    """Training diverged (for example a NaN loss) in a named stage."""


def one_line(text: str,
             markers: tuple[str, ...] = ("TrainingError: ", "ShardError: ", "StorageError: ",
                                         "LifelongError: ")) -> str:
    """The innermost message of an error's text (a Ray task's traceback, Ray Train's error, ``"Type: message"``),
    on one line: what follows the last of ``markers`` if any occurs, else the last non-empty line."""
    for marker in markers:
        if marker in text:
            return text.rsplit(marker, 1)[-1].strip().splitlines()[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def check_reachable(host: str, port: int, culprit: str, timeout_s: float = 5.0) -> None:
    """Fail at once if nothing accepts a TCP connection at ``host:port`` (Ray and MLflow clients retry an
    unreachable server for minutes before they give up).

    Raises:
        LifelongError: ``"<culprit> is unreachable: <reason>"``.
    """
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise LifelongError(f"{culprit} is unreachable: {e}") from None
