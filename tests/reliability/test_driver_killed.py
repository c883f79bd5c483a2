"""Promise 2: the driver is killed (SIGKILL) mid-stage and between stages; `lifelong resume RUN_ID` continues from the
last committed stage, runs no committed stage or cell of R again, continues the same MLflow run, and ends with the
R of an undisturbed run. A resume whose spec file changed is refused, naming the changed field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from tests.reliability.driver import EVERY, LONG, Driver, error_lines, events, lifelong, partial_step, tree, write_spec


def _stage_events(evs: list[dict], name: str) -> Counter:
    return Counter(e["stage"] for e in evs if e["event"] == name)


def test_a_killed_driver_resumes_from_its_last_committed_stage(tmp_path: Path, undisturbed: dict[str, Any]) -> None:
    spec, expected = LONG, undisturbed
    path = write_spec(tmp_path, spec)

    # 1. Killed mid-stage: stage 1 trains, with an in-stage checkpoint of at least 2 intervals.
    workdir = tmp_path / "w"
    driver = Driver("run", str(path), "--workdir", str(workdir), "--no-progress", cwd=tmp_path, workdir=workdir)
    run_dir = driver.wait_for(lambda _: any((partial_step(r, 1) or (0, 0))[0] >= 2 * EVERY
                                            for r in workdir.glob("p/*")))
    step, written = partial_step(run_dir, 1) or (0, 0.0)
    killed_at = driver.kill()
    assert not (run_dir / "stage-1" / "checkpoint" / "lineage.json").exists(), "killed too late: stage 1 committed"
    started = max(e["t"] for e in events(run_dir) if e["event"] == "stage_start")
    run_id = run_dir.name

    # A changed spec file is refused, naming the field; nothing is written.
    path.write_text(yaml.safe_dump({**spec, "training": {**spec["training"], "batch_size": 64}}))
    before = tree(workdir)
    refused = lifelong("resume", run_id, "--workdir", str(workdir), cwd=tmp_path)
    assert refused.returncode == 2 and len(error_lines(refused)) == 1, refused.stderr
    assert "training.batch_size" in error_lines(refused)[0] and "p.yaml" in error_lines(refused)[0]
    assert tree(workdir) == before
    path.write_text(yaml.safe_dump(spec))

    # 2. Killed between stages: as soon as stage 1 is committed.
    driver = Driver("resume", run_id, "--workdir", str(workdir), "--no-progress", cwd=tmp_path, workdir=workdir)
    driver.wait_for(lambda ev: any(e["event"] == "stage_end" and e["stage"] == 1 for e in ev))
    driver.kill()

    # 3. Resumed to the end.
    done = lifelong("resume", run_id, "--workdir", str(workdir), "--no-progress", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    resumed_at = report["stages"][1]["resumed_at_step"]
    print(f"\ndriver killed {killed_at - started:.2f} s into stage 1, {killed_at - written:.2f} s after its in-stage "
          f"checkpoint at step {step}; resumed from step {resumed_at} of {report['stages'][1]['steps']}; final R - "
          f"undisturbed R: max |diff| {np.abs(np.array(report['R']) - np.array(expected['R'])).max():.4f}")
    np.testing.assert_allclose(report["R"], expected["R"], atol=0.02)
    assert report["run_id"] == run_id and len(report["stages"]) == 3 and resumed_at >= step

    evs = events(run_dir)
    assert max(_stage_events(evs, "stage_end").values()) == 1
    for k in range(3):  # once committed (its end seen, or restored), a stage never starts again
        first = next(i for i, e in enumerate(evs) if e.get("stage") == k and e["event"] in ("stage_end",
                                                                                            "stage_restored"))
        assert not [e for e in evs[first:] if e["event"] == "stage_start" and e["stage"] == k], k
    assert _stage_events(evs, "stage_start")[1] == 2  # the stage the first kill interrupted ran again
    cells = Counter((e["row"], e["col"]) for e in evs if e["event"] == "eval_cell")
    assert set(cells) == {(i, j) for i in range(-1, 3) for j in range(3)} and set(cells.values()) == {1}, cells
    assert sum(e["event"] == "stage_restored" for e in evs) >= 2

    client = mlflow.MlflowClient(report["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`lifelong.run_id` = '{run_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == report["mlflow_run_id"]
    assert parents[0].info.status == "FINISHED" and float(parents[0].data.metrics["ACC"]) == report["acc"]
    finished = Counter(r.data.tags["lifelong.stage"] for r in runs if r is not parents[0]
                       and r.info.status == "FINISHED")
    assert finished == Counter({str(k): 1 for k in range(3)}), finished
    # The attempt the first kill interrupted, if its run had been created by then, was marked KILLED on resume.
    assert {r.data.tags["lifelong.stage"] for r in runs if r.info.status == "KILLED"} <= {"1"}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    versions = {int(v.tags["lifelong.stage"]): v for v in client.search_model_versions("name='p'")}
    assert sorted(versions) == list(range(3))
    for k in range(1, 3):  # the registered chain is unbroken across the kills
        assert versions[k].tags["lifelong.parent_version"] == str(versions[k - 1].version)

    again = lifelong("resume", run_id, "--workdir", str(workdir), cwd=tmp_path)
    assert again.returncode == 2 and "finished" in error_lines(again)[0]
    unknown = lifelong("resume", "20200101-000000-abcdef", "--workdir", str(workdir), cwd=tmp_path)
    assert unknown.returncode == 2 and len(error_lines(unknown)) == 1
    assert "20200101-000000-abcdef" in error_lines(unknown)[0]
