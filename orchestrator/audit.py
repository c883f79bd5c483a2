"""``lifelong audit``: re-hash a run's checkpoints and shards against the digests that MLflow recorded.

For each stage model of the run (``registry.py``), the audit reads, from the storage where they are now:

- the checkpoint's ``model.pt`` and ``strategy.safetensors``, against the model's ``lifelong.model_sha256`` and
  ``lifelong.strategy_sha256`` tags;
- its ``lineage.json``, against the copy kept as the model's artifact (compared as JSON);
- the parent checkpoint's ``model.pt`` where the parent is not itself a stage of the run (the initial model);
- every training shard the stage read, against the sha256 in the recorded ``lineage.json``, and the domain's
  ``manifest.json`` digest against the recorded one.

The records compared against live in MLflow, not beside the files, so an edited file is caught even when whoever
edited it also rewrote the record stored next to it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.checkpoint import LINEAGE_FILE, MODEL_FILE, STRATEGY_FILE
from orchestrator.errors import LifelongError
from orchestrator.registry import StageModel
from orchestrator.shards import MANIFEST
from orchestrator.storage import Storage, join


@dataclass(frozen=True)
class Check:
    """One file compared with its recorded digest.

    Attributes:
        stage: the stage whose record holds the digest. kind: ``model.pt``, ``strategy.safetensors``, ``lineage.json``,
            ``manifest`` or ``shard``. uri: the file. expected: the recorded digest. actual: the digest now, or
            ``"unreadable: <why>"``.
    """

    stage: int
    kind: str
    uri: str
    expected: str
    actual: str

    @property
    def ok(self) -> bool:
        """True if the file matches its record."""
        return self.actual == self.expected


def _file_sha256(storage: Storage, uri: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    except (OSError, LifelongError) as e:
        return f"unreadable: {str(e).splitlines()[0][:200]}"


def _canonical(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _lineage_digest(storage: Storage, folder: str) -> str:
    try:
        return _canonical(json.loads(storage.read_bytes(join(folder, LINEAGE_FILE))))
    except (OSError, LifelongError, ValueError) as e:
        return f"unreadable: {str(e).splitlines()[0][:200]}"


def _manifest_digest(storage: Storage, uri: str) -> str:
    try:
        return str(json.loads(storage.read_bytes(join(uri, MANIFEST))).get("digest", ""))
    except (OSError, LifelongError, ValueError) as e:
        return f"unreadable: {str(e).splitlines()[0][:200]}"


def audit(models: Iterable[StageModel], storage: Storage) -> Iterable[Check]:
    """Yield one :class:`Check` per file of the run's checkpoints and shards (each shard and manifest once).

    Args:
        models: the run's stage models (:func:`orchestrator.registry.run_models`). storage: how to reach the files.
    """
    models = list(models)
    own = {m.checkpoint for m in models}
    seen: set[str] = set()
    for m in models:
        folder = m.checkpoint
        for name, tag in ((MODEL_FILE, "model_sha256"), (STRATEGY_FILE, "strategy_sha256")):
            uri = join(folder, name)
            yield Check(m.stage, name, uri, m.tag(tag),
                        _file_sha256(storage, uri))
        yield Check(m.stage, "lineage.json", join(folder, LINEAGE_FILE), _canonical(dict(m.lineage)),
                    _lineage_digest(storage, folder))
        parent = m.tag("parent_checkpoint")
        if parent and parent not in own and parent not in seen:
            seen.add(parent)
            uri = join(parent, MODEL_FILE)
            yield Check(m.stage, "model.pt", uri, m.tag("parent_model_sha256"),
                        _file_sha256(storage, uri))
        for item in m.lineage.get("inputs", []):
            if item["uri"] not in seen and item.get("manifest_digest"):
                seen.add(item["uri"])
                uri = item["uri"]
                yield Check(m.stage, "manifest", join(uri, MANIFEST), item["manifest_digest"],
                            _manifest_digest(storage, uri))
            for shard in item["shards"]:
                uri = join(item["uri"], shard["path"])
                if uri not in seen:
                    seen.add(uri)
                    yield Check(m.stage, "shard", uri, shard["sha256"],
                                _file_sha256(storage, uri))

