"""Promise 6: a crash at any point of any write never leaves a file that a later run would read as valid.

Every site that writes what a later run reads (shards, checkpoints, in-stage checkpoints, replay-buffer parts, the
report, the run record, the tune request, the committed cells) is written here once undisturbed, to count the
steps that commit something (a rename of a finished temporary file: ``mv`` on the filesystem, ``os.replace``), and
then once per step with the process "dying" (KeyboardInterrupt) at that step. Each time, the site's own reader must
see the previous complete version, or nothing, and never a partial one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from orchestrator import shards
from orchestrator.checkpoint import InStageCheckpoints, load_checkpoint, write_checkpoint
from orchestrator.engine import Cell
from orchestrator.errors import ShardError
from orchestrator.report import save_json
from orchestrator.resume import CommittedWork, committed_records, write_json
from orchestrator.spec import SourceSpec
from orchestrator.storage import Storage
from orchestrator.tuning import TuneRequest, read_request, write_request
from strategies.buffer import read_part, write_part


class Died(KeyboardInterrupt):
    """The process dies at this point (as a SIGKILL would, nothing after it runs)."""


class Commits:
    """Counts the commit steps (renames of finished temporary files) and dies at the ``die_at``-th (0-based)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, die_at: int | None) -> None:
        self.count, self.die_at = 0, die_at
        real_mv, real_replace = LocalFileSystem.mv, os.replace

        def step() -> None:
            if self.count == self.die_at:
                raise Died(f"killed at commit step {self.count}")
            self.count += 1

        def mv(fs: Any, *args: Any, **kwargs: Any) -> Any:
            step()
            return real_mv(fs, *args, **kwargs)

        def replace(*args: Any, **kwargs: Any) -> Any:
            step()
            return real_replace(*args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "mv", mv)
        monkeypatch.setattr(os, "replace", replace)


def _shards(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    uri = str(folder / "domain")

    def read() -> Any:
        try:
            return shards.read_manifest(uri)["digest"]
        except ShardError as e:
            assert "missing manifest" in str(e)
            return None

    return lambda: shards.build_domain(uri, "digits", SourceSpec(kind="sklearn_digits", classes=[0, 1]), None), read


def _checkpoint(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    def read() -> Any:
        try:
            model, states, lineage = load_checkpoint(folder / "ckpt")
        except FileNotFoundError:
            return None
        return float(model["w"].sum()), states, lineage["stage"]

    write = lambda: write_checkpoint(folder / "ckpt", {"w": torch.ones(3)}, [{"buf": torch.arange(4)}],  # noqa: E731
                                     {"stage": 0})
    return write, read


def _in_stage(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    store = InStageCheckpoints(str(folder / "stage-0"), Storage(), {"parent": {"uri": "init"}})
    save = lambda step: store.save(step, {"w": torch.full((2,), float(step))}, [{}], {"state": {}},  # noqa: E731
                                   {"step": step})
    save(100)  # the previous in-stage checkpoint

    def read() -> Any:
        found = store.latest()
        assert found is not None, "the newest committed in-stage checkpoint is always found"
        model, _, _, position = found
        assert float(model["w"][0]) == position["step"]
        return position["step"]

    return lambda: save(200), read


def _buffer_part(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    def read() -> Any:
        try:
            return read_part(Storage(), str(folder / "part-00000.parquet"))["y"].tolist()
        except OSError:
            return None

    return lambda: write_part(Storage(), str(folder), 0, {"x": torch.zeros(3, 2), "y": torch.arange(3)}), read


def _json_file(writer: Callable[[Path, Any], Any]) -> Callable[[Path], tuple[Callable[[], Any], Callable[[], Any]]]:
    def site(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
        path = folder / "record.json"
        writer(path, {"version": 1, "rows": list(range(100))})
        return lambda: writer(path, {"version": 2, "rows": list(range(1000))}), lambda: json.loads(path.read_text())

    return site


def _tune_request(folder: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    text = (Path(shards.__file__).parent / "default_pipeline.yaml").read_text()
    unsigned = TuneRequest(text, ("seed=1",), "p.yaml")
    request = TuneRequest(text, ("seed=1",), "p.yaml", unsigned.pipeline().spec_hash())
    return lambda: write_request(request, folder, {"mlflow_run": "abc"}), lambda: _tune_read(folder)


def _tune_read(folder: Path) -> Any:
    try:
        return read_request(folder)[1]
    except Exception as e:  # noqa: BLE001 - a missing request is refused with a LifelongError; nothing else may leak
        assert "not a lifelong tune folder" in str(e), e
        return None


SITES = {
    "shards": _shards,
    "checkpoint": _checkpoint,
    "in-stage checkpoint": _in_stage,
    "replay buffer part": _buffer_part,
    "report": _json_file(lambda path, obj: save_json(obj, path)),
    "run record": _json_file(write_json),
    "tune request": _tune_request,
}


@pytest.mark.parametrize("site", list(SITES))
def test_a_crash_at_every_commit_step_leaves_the_old_version_or_nothing(site: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    write, read = SITES[site](clean)
    before = read()
    with monkeypatch.context() as m:
        counter = Commits(m, None)
        write()
    steps, after = counter.count, read()
    assert steps >= 1 and after != before
    for k in range(steps):
        folder = tmp_path / f"die-{k}"
        folder.mkdir()
        write, read = SITES[site](folder)
        with monkeypatch.context() as m, pytest.raises(Died):
            Commits(m, k)
            write()
        assert read() in (before, after), f"{site}: a crash at commit step {k} of {steps} left {read()!r}"
        if k < steps - 1:
            assert read() == before, f"{site}: visible before its last commit step ({k} of {steps})"


def test_a_cell_record_cut_short_is_skipped(tmp_path: Path) -> None:
    """``cells.jsonl`` is appended to: a line a crash cut short is not read back; the complete ones are."""
    path = tmp_path / "cells.jsonl"
    log = CommittedWork(path)
    log.row_evaluated(0, [Cell(0, 0, 0.9, 10, 1.0, 2.0)])
    text = path.read_text()
    path.write_text(text + text[: len(text) // 2])  # the second record's write was cut short
    assert [r["cell"]["acc"] for r in committed_records(path)] == [0.9]
