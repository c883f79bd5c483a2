"""The undisturbed run that the fault tests compare with, run once per session."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.reliability.driver import LONG, lifelong, write_spec


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of :data:`tests.reliability.driver.LONG` run once, undisturbed."""
    folder = tmp_path_factory.mktemp("undisturbed")
    proc = lifelong("run", str(write_spec(folder, LONG)), "--workdir", str(folder / "w"), "--no-progress", "--json",
                    cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
