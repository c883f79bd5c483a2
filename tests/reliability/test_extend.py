"""`lifelong extend`: a finished run of 3 domains takes a 4th that landed later. The new stage starts from the run's
last checkpoint and strategy state, the old checkpoints are scored on the new domain, everything stays in the same
run folder and MLflow run, and the result is the R of a run given all 4 domains from the start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml

from tests.reliability.driver import PERMUTED, error_lines, lifelong, tree

def test_extend_appends_a_domain_to_a_finished_run(tmp_path: Path, full_permuted: dict[str, Any]) -> None:
    workdir, expected = tmp_path / "w", full_permuted
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({**PERMUTED, "domains": PERMUTED["domains"][:3]}))
    first = lifelong("run", str(three), "--workdir", str(workdir), "--no-progress", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = json.loads(first.stdout)
    run_dir = Path(run["run_dir"])

    new_uri = str(Path(expected["workdir"]) / "shards" / "p" / "perm-3")  # built by the 4-domain run
    before = tree(workdir)
    for bad, culprit in ((["--domain", f"perm-0={new_uri}"], "perm-0"), (["--domain", "perm-3"], "NAME=URI"),
                         (["--domain", f"perm-3={workdir}/nowhere"], "nowhere")):
        refused = lifelong("extend", run["run_id"], *bad, "--workdir", str(workdir), cwd=tmp_path)
        assert refused.returncode == 2 and len(error_lines(refused)) == 1, refused.stderr
        assert culprit in error_lines(refused)[0]
    assert tree(workdir) == before
    # A tampered strategy file (one bit of stage 1's) is caught by its sha256 before anything is read or written.
    strategy = run_dir / "stage-1" / "checkpoint" / "strategy.safetensors"
    original = strategy.read_bytes()
    strategy.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    before = tree(workdir)
    refused = lifelong("extend", run["run_id"], "--domain", f"perm-3={new_uri}", "--workdir", str(workdir),
                       cwd=tmp_path)
    assert refused.returncode == 2 and len(error_lines(refused)) == 1, refused.stderr
    assert "strategy.safetensors does not match the sha256" in error_lines(refused)[0]
    assert str(strategy.parent) in error_lines(refused)[0] and tree(workdir) == before
    strategy.write_bytes(original)

    extended = lifelong("extend", run["run_id"], "--domain", f"perm-3={new_uri}", "--workdir", str(workdir),
                        "--no-progress", "--json", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    report = json.loads(extended.stdout)
    print(f"\nextend: {report['wall_seconds']:.1f} s; the 4-domain run from scratch: {expected['wall_seconds']:.1f} s; "
          f"max |R - R_full| {np.abs(np.array(report['R']) - np.array(expected['R'])).max():.4f}")
    assert report["run_id"] == run["run_id"] and report["domains"] == [f"perm-{i}" for i in range(4)]
    np.testing.assert_allclose(report["R"], expected["R"], atol=0.01)
    np.testing.assert_allclose(report["b"], expected["b"], atol=0.01)
    assert [s["checkpoint"] for s in report["stages"][:3]] == [s["checkpoint"] for s in run["stages"]]
    assert json.loads((run_dir / "report-3.json").read_text())["R"] == run["R"]  # the 3-domain report is kept
    assert len(json.loads((run_dir / "pipeline.json").read_text())["domains"]) == 4
    assert (run_dir / "accuracy_matrix.png").stat().st_size > 0

    client = mlflow.MlflowClient(report["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`lifelong.run_id` = '{run['run_id']}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [run["mlflow_run_id"]] == [report["mlflow_run_id"]]
    assert parents[0].info.status == "FINISHED" and float(parents[0].data.metrics["ACC"]) == report["acc"]
    assert parents[0].data.params["domains.3.name"] == "perm-3"
    assert sorted(r.data.tags["lifelong.stage"] for r in runs if r is not parents[0]) == ["0", "1", "2", "3"]
    versions = {int(v.tags["lifelong.stage"]): v for v in client.search_model_versions("name='p'")}
    assert sorted(versions) == [0, 1, 2, 3]
    assert versions[3].tags["lifelong.parent_version"] == str(versions[2].version)
    assert versions[3].tags["lifelong.parent_checkpoint"] == run["stages"][2]["checkpoint"]

    again = lifelong("resume", run["run_id"], "--workdir", str(workdir), cwd=tmp_path)
    assert again.returncode == 2 and "finished" in error_lines(again)[0]
