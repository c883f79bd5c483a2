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
from typing import Any

import numpy as np

from tests.reliability.driver import EVERY, LONG, Driver, partial_step, write_spec
from tests.reliability.test_evaluation_actor_dies import actor_pids


def test_a_killed_worker_continues_from_its_last_in_stage_checkpoint(tmp_path: Path,
                                                                     undisturbed: dict[str, Any]) -> None:
    workdir = tmp_path / "w"
    driver = Driver("run", str(write_spec(tmp_path, LONG)), "--workdir", str(workdir), "--no-progress", cwd=tmp_path,
                    workdir=workdir)
    run_dir = driver.wait_for(lambda _: any((partial_step(r, 1) or (0, 0))[0] >= 2 * EVERY
                                            for r in workdir.glob("p/*")))
    step, written = partial_step(run_dir, 1) or (0, 0.0)
    (worker,) = actor_pids(driver.proc.pid, "StageWorker")
    os.kill(worker, signal.SIGKILL)
    killed_at = time.time()
    assert driver.proc.wait(300) == 0, driver.output()[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    stage = report["stages"][1]
    assert stage["checkpoint"].endswith("stage-1/checkpoint-retry1")
    assert stage["resumed_at_step"] >= step and stage["resumed_at_step"] % EVERY == 0
    assert report["stages"][0]["resumed_at_step"] == report["stages"][2]["resumed_at_step"] == 0
    assert not (run_dir / "stage-1" / "partial").exists()  # cleared once the stage committed
    print(f"\nworker killed {killed_at - written:.2f} s after stage 1's in-stage checkpoint at step {step}; the "
          f"restart continued from step {stage['resumed_at_step']} of {stage['steps']}; max |R - R_undisturbed| "
          f"{np.abs(np.array(report['R']) - np.array(undisturbed['R'])).max():.4f}")
    np.testing.assert_allclose(report["R"], undisturbed["R"], atol=0.02)
