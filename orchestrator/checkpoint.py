"""Stage checkpoints: model weights, strategy state and ``lineage.json``.

A checkpoint is a folder::

    model.pt              the model's state_dict (tensors only, read with ``torch.load(weights_only=True)``)
    strategy.safetensors  each strategy's state_dict, in pipeline order: tensors plus JSON, never a pickle
                          (``orchestrator/tensorfile.py``)
    trainer.safetensors   an in-stage checkpoint's optimizer state (``training.checkpoint_every_n_steps``)
    lineage.json          parent checkpoint URI and digest, shard digests, spec hash, code version, and the sha256
                          of both files above, checked before either is parsed

Local disks and object storage alike (:meth:`orchestrator.storage.Storage.commit`): each file goes to a temporary key
and is moved onto its name, and ``lineage.json``, the commit record, is written last: a checkpoint without it is
incomplete and is refused by every reader, so no reader ever sees half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from orchestrator import tensorfile
from orchestrator.errors import one_line
from orchestrator.storage import Storage, join

MODEL_FILE = "model.pt"
STRATEGY_FILE = "strategy.safetensors"
TRAINER_FILE = "trainer.safetensors"
LINEAGE_FILE = "lineage.json"
DIGEST_KEYS = ("model_sha256", "strategy_sha256", "trainer_sha256")  # of MODEL_FILE, STRATEGY_FILE, TRAINER_FILE


def code_version() -> dict[str, str]:
    """The installed ``lifelong`` version and, when run from a git checkout, its commit (``"unknown"`` otherwise)."""
    try:
        pkg = version("lifelong")
    except PackageNotFoundError:
        pkg = "unknown"
    commit = "unknown"
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"lifelong": pkg, "git_commit": commit}


def write_checkpoint(folder: str | Path, model_state: dict[str, torch.Tensor], strategy_states: list[dict[str, Any]],
                     lineage: dict[str, Any], storage: Storage | None = None,
                     trainer_state: dict[str, Any] | None = None) -> str:
    """Write a checkpoint folder (a local path or a URI such as ``s3://bucket/run/stage-0``) and return it
    (:meth:`Storage.commit`: ``model.pt`` and ``strategy.safetensors`` first, ``lineage.json``, the commit record,
    last).

    ``lineage`` gains ``model_sha256`` and ``strategy_sha256``, the sha256 (hex) of ``model.pt`` and
    ``strategy.safetensors``. An in-stage checkpoint (``training.checkpoint_every_n_steps``) also holds
    ``trainer_state`` (the optimizer's state_dict) as ``trainer.safetensors``, and ``trainer_sha256``.

    Raises:
        TypeError: a strategy state holds something other than tensors and JSON values (:func:`tensorfile.dumps`).
        FileExistsError: if ``folder`` already holds a checkpoint (nothing is overwritten).
        StorageError: if the storage cannot be written.
    """
    members = [(MODEL_FILE, _save(model_state)), (STRATEGY_FILE, tensorfile.dumps(list(strategy_states)))]
    if trainer_state is not None:
        members.append((TRAINER_FILE, tensorfile.dumps(trainer_state)))
    digests = {key: hashlib.sha256(blob).hexdigest() for (_, blob), key in zip(members, DIGEST_KEYS)}
    lineage_blob = json.dumps({**lineage, **digests}, indent=1, sort_keys=True).encode()
    try:
        return (storage or Storage()).commit(str(folder), members, LINEAGE_FILE, lambda: lineage_blob)
    except FileExistsError:
        raise FileExistsError(f"checkpoint {folder} already exists") from None


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _read(folder: str | Path, name: str, storage: Storage | None) -> bytes:
    return (storage or Storage()).read_bytes(join(str(folder), name))


def read_lineage(folder: str | Path, storage: Storage | None = None) -> dict[str, Any]:
    """Read ``lineage.json`` of a checkpoint folder (path or URI).

    Raises:
        FileNotFoundError: if the checkpoint is missing or incomplete (no ``lineage.json``).
        StorageError: if its storage cannot be reached.
    """
    try:
        return json.loads(_read(folder, LINEAGE_FILE, storage))
    except FileNotFoundError:  # only a missing record: a store that cannot be reached stays a StorageError
        raise FileNotFoundError(f"checkpoint {folder} is missing or incomplete (no {LINEAGE_FILE})") from None


def verify_checkpoint(folder: str | Path, storage: Storage | None = None) -> None:
    """Check that a committed checkpoint's ``model.pt`` and ``strategy.safetensors`` match the sha256 its
    ``lineage.json`` records (nothing is parsed).

    Raises:
        FileNotFoundError: if the checkpoint is missing or incomplete (no ``lineage.json``).
        ValueError: a file is missing, has no recorded digest, or does not match it (naming the file).
    """
    _blobs(folder, read_lineage(folder, storage), storage)


def _blobs(folder: str | Path, lineage: dict[str, Any], storage: Storage | None) -> dict[str, bytes]:
    """The checkpoint's model and strategy files, each checked against its sha256 in ``lineage``."""
    return {name: _checked(folder, lineage, storage, name, key)
            for name, key in ((MODEL_FILE, "model_sha256"), (STRATEGY_FILE, "strategy_sha256"))}


def _checked(folder: str | Path, lineage: dict[str, Any], storage: Storage | None, name: str, key: str) -> bytes:
    """The bytes of the checkpoint's file ``name``, refused unless they match the sha256 ``lineage[key]``.

    Raises:
        ValueError: the file is missing, the record has no such digest, or the bytes do not match it.
    """
    if not lineage.get(key):
        raise ValueError(f"checkpoint {folder}: {LINEAGE_FILE} records no {key} for {name}")
    try:
        blob = _read(folder, name, storage)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {folder}: {name} is missing") from None
    if hashlib.sha256(blob).hexdigest() != lineage[key]:
        raise ValueError(f"checkpoint {folder}: {name} does not match the sha256 in {LINEAGE_FILE}")
    return blob


def load_trainer_state(folder: str | Path, lineage: dict[str, Any], storage: Storage | None = None) -> dict[str, Any]:
    """The optimizer state an in-stage checkpoint holds (``trainer.safetensors``), checked against the sha256 in its
    ``lineage`` (as :func:`load_checkpoint` returned it).

    Raises:
        ValueError: the file is missing, unrecorded, changed or not a tensor file (naming it).
    """
    return tensorfile.loads(_checked(folder, lineage, storage, TRAINER_FILE, "trainer_sha256"))


def load_checkpoint(folder: str | Path, storage: Storage | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Load ``(model_state, strategy_states, lineage)`` from a checkpoint folder (path or URI).

    Raises:
        FileNotFoundError: if the checkpoint is missing or incomplete (no ``lineage.json``).
        ValueError: if ``model.pt`` or ``strategy.safetensors`` does not match the sha256 recorded in
            ``lineage.json`` (checked before either is parsed), the record lacks a digest, or a file is not what it
            should be: ``model.pt`` holds anything but tensors, or the strategy file is not a tensor file.
    """
    lineage = read_lineage(folder, storage)  # first: an incomplete checkpoint is refused before anything is read
    blobs = _blobs(folder, lineage, storage)
    try:
        model_state = torch.load(io.BytesIO(blobs[MODEL_FILE]), map_location="cpu", weights_only=True)
        strategy_states = tensorfile.loads(blobs[STRATEGY_FILE])
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise ValueError(f"checkpoint {folder}: unreadable ({one_line(str(e))[:160]})") from None
    if not isinstance(strategy_states, list):
        raise ValueError(f"checkpoint {folder}: {STRATEGY_FILE} does not hold a list of strategy states")
    return model_state, strategy_states, lineage


class InStageCheckpoints:
    """The in-stage checkpoints of one stage (``training.checkpoint_every_n_steps``): ``<stage folder>/partial/
    step-<N>``, each a committed checkpoint (with the optimizer's state) whose ``lineage.json`` is the stage's own
    record plus ``partial`` (where training stood); ``partial/LATEST`` names the newest, and the one before it is
    deleted once LATEST names the new one.

    Args:
        folder: the stage's folder (``<root>/stage-k``). storage: how to reach it. lineage: the stage's record (its
            parent's URI identifies the attempt's starting point).
    """

    def __init__(self, folder: str, storage: Storage, lineage: dict[str, Any]) -> None:
        self.root, self.storage, self.lineage = join(folder, "partial"), storage, lineage

    def _latest_name(self) -> str | None:
        try:
            return self.storage.read_bytes(join(self.root, "LATEST")).decode().strip() or None
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def save(self, step: int, model_state: dict[str, torch.Tensor], strategy_states: list[dict[str, Any]],
             optimizer_state: dict[str, Any], position: dict[str, Any]) -> str:
        """Commit the checkpoint of optimizer step ``step``, point LATEST at it, delete the previous one; return its
        folder.

        Raises:
            StorageError: if the storage cannot be written (the previous checkpoint stays the latest).
        """
        name, previous = f"step-{step:09d}", self._latest_name()
        folder = join(self.root, name)
        if name != previous:
            self.storage.remove(folder)  # a leftover no LATEST names (written just before a crash)
        write_checkpoint(folder, model_state, strategy_states, {**self.lineage, "partial": position}, self.storage,
                         trainer_state=optimizer_state)
        self.storage.write_bytes(join(self.root, "LATEST"), name.encode(), overwrite=True)
        if previous and previous != name:
            self.storage.remove(join(self.root, previous))
        return folder

    def latest(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any], dict[str, Any]] | None:
        """``(model state, strategy states, optimizer state, position)`` of the newest in-stage checkpoint of this
        stage from the same parent, or None if there is none.

        Raises:
            ValueError: a file of it does not match its recorded sha256 (naming it).
        """
        name = self._latest_name()
        if name is None:
            return None
        folder = join(self.root, name)
        try:
            model_state, strategy_states, lineage = load_checkpoint(folder, self.storage)
        except FileNotFoundError:
            return None
        if (lineage.get("parent") or {}).get("uri") != (self.lineage.get("parent") or {}).get("uri"):
            return None  # written by an attempt from another parent
        return model_state, strategy_states, load_trainer_state(folder, lineage, self.storage), lineage["partial"]

    def clear(self) -> None:
        """Delete every in-stage checkpoint of the stage (once the stage itself is committed)."""
        self.storage.remove(self.root)


def lineage_record(pipeline_name: str, run_id: str, stage: int, domain: str, parent_checkpoint: str,
                   parent_lineage: dict[str, Any], shards: list[dict[str, Any]], spec_hash: str,
                   code: dict[str, str]) -> dict[str, Any]:
    """The ``lineage.json`` record of a stage checkpoint.

    Args:
        parent_checkpoint: the folder of the checkpoint the stage starts from.
        parent_lineage: that checkpoint's own lineage record (its ``model_sha256`` becomes the parent digest).
        shards: ``{"domain", "uri", "manifest_digest", "split", "digest", "shards": [{"path", "sha256", "rows"}]}``
            per input split (:meth:`orchestrator.plan.Domain.train_inputs`).
    """
    return {
        "pipeline": pipeline_name,
        "run_id": run_id,
        "stage": stage,
        "domain": domain,
        "parent": {"uri": parent_checkpoint, "model_sha256": parent_lineage.get("model_sha256"),
                   "stage": parent_lineage.get("stage")},
        "inputs": shards,
        "spec_sha256": spec_hash,
        "code": code,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
