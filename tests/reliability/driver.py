"""Running ``lifelong`` as a user would, and killing it as a fault would: a driver process in its own session, the
events it has logged, and the processes it leaves behind (found by session id, killed by their own pids)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIGITS = {  # the embedded default's stream (scikit-learn's digits), small enough to run several times per test
    "name": "p", "seed": 0, "scenario": "class_il",
    "domains": [{"name": f"digits-{a}-{a + 1}", "source": {"kind": "sklearn_digits", "classes": [a, a + 1]}}
                for a in range(0, 10, 2)],
    "model": {"name": "mlp", "hidden": [64]},
    "strategy": {"name": "replay", "buffer_size": 200, "ratio": 0.5},
    "training": {"epochs": 10, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.001}},
    "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25},
}


PERMUTED = {**DIGITS, "scenario": "domain_il",  # one label set, so that a new domain leaves the model's shape as it is
            "domains": [{"name": f"perm-{i}", "source": {"kind": "sklearn_digits", "permutation_seed": i}}
                        for i in range(4)],
            "training": {**DIGITS["training"], "epochs": 5}}

# Three domains of about 0.7 s of training each, with in-stage checkpoints every 200 steps and one restart allowed
# after a dead worker: the run the fault tests disturb (tests/reliability/conftest.py runs it once undisturbed).
EVERY = 200
LONG = {**DIGITS, "domains": DIGITS["domains"][:3],
        "training": {**DIGITS["training"], "epochs": 60, "batch_size": 16, "max_failures": 1,
                     "checkpoint_every_n_steps": EVERY}}


def partial_step(run_dir: Path, stage: int) -> tuple[int, float] | None:
    """``(step, unix time written)`` of the newest in-stage checkpoint of ``stage``, or None."""
    latest = run_dir / f"stage-{stage}" / "partial" / "LATEST"
    try:
        return int(latest.read_text().removeprefix("step-")), latest.stat().st_mtime
    except (OSError, ValueError):
        return None


def lifelong(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """``lifelong <args>`` to completion, output captured."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_spec(tmp_path: Path, spec: dict[str, Any]) -> Path:
    """``<tmp_path>/p.yaml``."""
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a command's stderr."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def events(run_dir: Path) -> list[dict[str, Any]]:
    """The complete lines of a run's ``events.jsonl``."""
    path = run_dir / "events.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: a driver started with ``start_new_session`` and every process
    it started (Ray's GCS, raylet, agents and workers keep its session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


class Driver:
    """``lifelong <args>`` in the background, in a session of its own, its output going to files.

    Args:
        args: the command's arguments. cwd: where it runs. workdir: its ``--workdir`` (where its run folder
            appears).
    """

    def __init__(self, *args: str, cwd: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.workdir, self.log = workdir, cwd / f"driver-{time.time_ns()}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 300) -> Path:
        """Poll the run's event log until ``done(events)``; return the run folder.

        Raises:
            AssertionError: the driver exited first, or ``timeout`` seconds passed (with its output).
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            runs = [p.parent for p in self.workdir.glob("*/*/events.jsonl")]
            if runs and done(events(max(runs, key=lambda p: p.stat().st_mtime))):
                return max(runs, key=lambda p: p.stat().st_mtime)
            assert self.proc.poll() is None, f"the driver exited with {self.proc.returncode}: {self.output()[-3000:]}"
            time.sleep(0.05)  # polling the event log, not waiting for it
        raise AssertionError(f"timed out after {timeout} s: {self.output()[-3000:]}")

    def wait_for_output(self, text: str, timeout: float = 300) -> None:
        """Poll the driver's output until it holds ``text``.

        Raises:
            AssertionError: the driver exited first, or ``timeout`` seconds passed (with its output).
        """
        deadline = time.time() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"the driver exited with {self.proc.returncode}: {self.output()[-3000:]}"
            assert time.time() < deadline, f"timed out after {timeout} s: {self.output()[-3000:]}"
            time.sleep(0.05)  # polling the output, not waiting for it

    def kill(self) -> float:
        """SIGKILL the driver and every process of its session at once; returns the unix time of the kill."""
        at = time.time()
        kill_session(self.proc.pid)
        self.proc.wait(30)
        return at

    def output(self) -> str:
        """What the driver printed so far."""
        return self.log.read_text(errors="replace")


def kill_session(sid: int, timeout: float = 30) -> None:
    """SIGKILL every process of session ``sid`` and wait until none is left.

    Raises:
        AssertionError: if some are still alive after ``timeout`` seconds.
    """
    deadline = time.time() + timeout
    while (pids := session_pids(sid)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert not session_pids(sid), f"processes of session {sid} survived SIGKILL: {session_pids(sid)}"


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """``relative path -> (size, mtime ns)`` of every file under ``folder``: what a refused command must leave as
    it was."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
