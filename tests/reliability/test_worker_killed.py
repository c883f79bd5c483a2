"""Promise 1: a training worker is killed (SIGKILL on its pid) in the middle of a stage. With
``training.checkpoint_every_n_steps`` the restarted stage (``training.max_failures``) continues from its newest
in-stage checkpoint, so at most one checkpoint interval of work is lost, and the run ends with the R of an
undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

from tests.reliability.driver import DIGITS, Driver, undisturbed
from tests.reliability.test_evaluation_actor_dies import actor_pids

EVERY = 200  # optimizer steps between in-stage checkpoints


def test_a_killed_worker_continues_from_its_last_in_stage_checkpoint(tmp_path: Path) -> None:
    spec = {**DIGITS, "domains": DIGITS["domains"][:3],
            "training": {**DIGITS["training"], "epochs": 100, "batch_size": 16, "max_failures": 1,
                         "checkpoint_every_n_steps": EVERY}}
    path, expected = undisturbed(tmp_path, spec)

    workdir = tmp_path / "w"
    driver = Driver("run", str(path), "--workdir", str(workdir), "--no-progress", cwd=tmp_path, workdir=workdir)
    latest = {}

    def stage_1_has_a_partial(_: list) -> bool:
        found = list(workdir.glob("p/*/stage-1/partial/LATEST"))
        if found:
            latest.update(name=found[0].read_text(), at=found[0].stat().st_mtime)
        return bool(found) and latest["name"] >= f"step-{2 * EVERY:09d}"

    run_dir = driver.wait_for(stage_1_has_a_partial)
    (worker,) = actor_pids(driver.proc.pid, "StageWorker")
    os.kill(worker, signal.SIGKILL)
    killed_at = time.time()
    assert driver.proc.wait(300) == 0, driver.output()[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    stage = report["stages"][1]
    assert stage["checkpoint"].endswith("stage-1/checkpoint-retry1")
    assert stage["resumed_at_step"] >= int(latest["name"].removeprefix("step-")) and stage["resumed_at_step"] % EVERY == 0
    assert report["stages"][0]["resumed_at_step"] == report["stages"][2]["resumed_at_step"] == 0
    assert not (run_dir / "stage-1" / "partial").exists()  # cleared once the stage committed
    print(f"\nworker killed {killed_at - latest['at']:.2f} s after stage 1's in-stage checkpoint {latest['name']}; "
          f"the restart continued from step {stage['resumed_at_step']} of {stage['steps']}; max |R - R_undisturbed| "
          f"{np.abs(np.array(report['R']) - np.array(expected['R'])).max():.4f}")
    np.testing.assert_allclose(report["R"], expected["R"], atol=0.02)
