"""Stage checkpoints: model weights, strategy state and ``lineage.json``.

A checkpoint is a folder::

    model.pt        the model's state_dict
    strategy.pt     list of each strategy's state_dict, in pipeline order
    lineage.json    parent checkpoint URI and digest, shard digests, spec hash, code version

It is written into a temporary folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.pt"
STRATEGY_FILE = "strategy.pt"
LINEAGE_FILE = "lineage.json"


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


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint(folder: str | Path, model_state: dict[str, torch.Tensor], strategy_states: list[dict[str, Any]],
                     lineage: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically (temporary folder, then rename) and return its path.

    ``lineage`` gains ``model_sha256``, the digest of ``model.pt``.

    Raises:
        FileExistsError: if ``folder`` already exists (nothing is overwritten).
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"checkpoint {folder} already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    torch.save(model_state, tmp / MODEL_FILE)
    torch.save(strategy_states, tmp / STRATEGY_FILE)
    lineage = {**lineage, "model_sha256": file_sha256(tmp / MODEL_FILE)}
    (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
    os.rename(tmp, folder)
    return folder


def read_lineage(folder: str | Path) -> dict[str, Any]:
    """Read ``lineage.json`` of a checkpoint folder."""
    return json.loads((Path(folder) / LINEAGE_FILE).read_text())


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    """Load ``(model_state, strategy_states, lineage)`` from a checkpoint folder."""
    folder = Path(folder)
    model_state = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    strategy_states = torch.load(folder / STRATEGY_FILE, map_location="cpu", weights_only=False)
    return model_state, strategy_states, read_lineage(folder)
