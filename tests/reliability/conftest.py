"""The undisturbed runs that the fault and extension tests compare with, each run once per session."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.reliability.driver import LONG, PERMUTED, lifelong, write_spec


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of :data:`tests.reliability.driver.LONG` run once, undisturbed."""
    folder = tmp_path_factory.mktemp("undisturbed")
    proc = lifelong("run", str(write_spec(folder, LONG)), "--workdir", str(folder / "w"), "--no-progress", "--json",
                    cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def full_permuted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of :data:`tests.reliability.driver.PERMUTED` (4 domains) run from the start; its shards are under
    ``<report["workdir"]>/shards/p/``."""
    folder = tmp_path_factory.mktemp("full")
    proc = lifelong("run", str(write_spec(folder, PERMUTED)), "--workdir", str(folder / "w"), "--no-progress",
                    "--json", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout), "workdir": str(folder / "w")}
