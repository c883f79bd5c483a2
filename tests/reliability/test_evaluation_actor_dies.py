"""Promise 3: an evaluation actor dies (SIGKILL on its pid) while the run goes on. A new actor takes its place, the
cells it was computing are computed again, and R is complete."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml

from tests.reliability.driver import DIGITS, Driver, events, session_pids


def actor_pids(sid: int, name: str) -> list[int]:
    """The processes of session ``sid`` that run a Ray actor of class ``name`` (Ray titles them ``ray::<name>``)."""
    out = []
    for pid in session_pids(sid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::{name}"):
            out.append(pid)
    return out


def test_a_killed_evaluation_actor_is_replaced_and_r_is_complete(tmp_path: Path) -> None:
    spec = {**DIGITS, "training": {**DIGITS["training"], "epochs": 40}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    workdir = tmp_path / "w"
    driver = Driver("run", str(path), "--workdir", str(workdir), "--no-progress", cwd=tmp_path, workdir=workdir)
    run_dir = driver.wait_for(lambda ev: any(e["event"] == "eval_cell" for e in ev))  # the actor has worked
    (actor,) = actor_pids(driver.proc.pid, "Evaluator")
    os.kill(actor, signal.SIGKILL)
    assert driver.proc.wait(300) == 0, driver.output()[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["evaluation_actor_restarts"] == 1
    assert len(report["R"]) == 5 and all(len(row) == 5 for row in report["R"]) and len(report["b"]) == 5
    assert report["R"][4][4] > 0.8
    cells = {(e["row"], e["col"]) for e in events(run_dir) if e["event"] == "eval_cell"}
    assert cells == {(i, j) for i in range(-1, 5) for j in range(5)}
