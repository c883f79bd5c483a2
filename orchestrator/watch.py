"""``lifelong watch``: extend a run whenever a new domain lands under a prefix of object storage (or a folder).

New data lands one domain per folder, ``<prefix>/<name>/``, written by ``lifelong shards build`` or anything else
that follows the manifest's commit protocol: the shards first, ``manifest.json`` last. :func:`landed` lists the
domains under the prefix whose manifest is committed and valid and which the run does not have yet, in name order; a
folder without a manifest (a domain still being written) is never taken. The CLI appends them through ``lifelong
extend``'s own path, then looks again every ``--interval`` seconds until it is interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from orchestrator.errors import ShardError
from orchestrator.shards import MANIFEST, read_manifest
from orchestrator.storage import Storage, join


def landed(prefix: str, storage: Storage, known: Collection[str], refused: dict[str, str],
           warn: Callable[[str], None]) -> list[tuple[str, str]]:
    """``(name, uri)`` of every domain under ``prefix`` with a committed, valid manifest that is not in ``known``
    (the run's domain names and URIs), in name order.

    A domain whose manifest is invalid is reported through ``warn`` once per error (``refused`` remembers it by URI)
    and left out until its manifest changes.

    Raises:
        StorageError: if the prefix's store stays unreachable for ``storage.retry_seconds``.
    """
    found = []
    for uri in storage.list_folders(prefix):
        name = uri.rsplit("/", 1)[-1]
        if name in known or uri in known or not storage.exists(join(uri, MANIFEST)):
            continue  # already in the run, or still being written (its manifest comes last)
        try:
            read_manifest(uri, storage)
        except ShardError as e:
            if refused.get(uri) != str(e):
                warn(f"{uri}: not taken: {e}")
                refused[uri] = str(e)
            continue
        found.append((name, uri))
    return found
