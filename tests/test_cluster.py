"""A pipeline submitted to a real two-node Ray cluster through the Jobs API (`lifelong submit | status | logs |
stop`): the job runs `lifelong run` on the cluster, its MLflow parent run is named after the job, a stopped job's
runs end KILLED, training and evaluation placed on different nodes give the R of a local run (with MLflow on a real
server, and `lineage` and `audit` of that run checked against the bucket), `lifelong tune --address` spreads its
trials over the nodes, and bad input (a bad pipeline, a missing token, an unknown job, a dead address) is refused
with one error line before anything reaches the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.mlflow_server import MlflowServer
from tests.ray_nodes import RayNodes, free_port
from tests.test_tune import run_search
from tests.test_tune import spec as tune_spec

pytestmark = pytest.mark.e2e


def lifelong(*args: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def on(cluster: RayNodes, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``lifelong <args> --address <the cluster's Jobs API>``, with the cluster's token."""
    return lifelong(*args, "--address", cluster.jobs_address, cwd=cwd, env=cluster.env, timeout=timeout)


def pipeline(tmp_path: Path, epochs: int = 1, rows: int = 3000, name: str = "p.yaml", **sections: Any) -> Path:
    """Two class-IL domains of Split-MNIST, a small MLP, replay; ``sections`` are merged into the top level (one
    level deep)."""
    source = {"kind": "mnist", "path": "mnist", "max_rows": rows}
    raw: dict[str, Any] = {
        "name": "submitted", "seed": 0, "scenario": "class_il",
        "domains": [{"name": "digits-0-1", "source": {**source, "classes": [0, 1]}},
                    {"name": "digits-2-3", "source": {**source, "classes": [2, 3]}}],
        "model": {"name": "mlp", "hidden": [100]},
        "strategy": {"name": "replay", "buffer_size": 200},
        "training": {"epochs": epochs, "batch_size": 64, "threads_per_worker": 1},
        "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def submit(tmp_path: Path, cluster: RayNodes, data_root: Path, *extra: str) -> str:
    proc = on(cluster, "submit", str(pipeline(tmp_path)), "--workdir", str(tmp_path / "w"), "--data-root",
              str(data_root), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    assert job_id.startswith("lifelong-submitted-") and job_id in proc.stderr
    return job_id


def job_status(job_id: str, cluster: RayNodes, cwd: Path) -> dict[str, Any]:
    proc = on(cluster, "status", job_id, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def mlflow_run(tmp_path: Path, name: str, log: str = "", uri: str = "") -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"attributes.run_name = '{name}'")
    assert len(runs) == 1, ([r.info.run_name for r in runs], log)
    return runs[0]


def test_submitted_pipeline_runs_on_the_cluster_and_is_followed(tmp_path: Path, data_root: Path,
                                                                ray_two_nodes: RayNodes) -> None:
    job_id = submit(tmp_path, ray_two_nodes, data_root)
    # `logs --follow` returns once the job has ended, with the run's whole output.
    follow = on(ray_two_nodes, "logs", job_id, "--follow", cwd=tmp_path)
    assert follow.returncode == 0, follow.stderr
    state = job_status(job_id, ray_two_nodes, tmp_path)
    assert state["status"] == "SUCCEEDED", (state, follow.stdout[-3000:])
    assert state["driver_node_id"] in ray_two_nodes.node_ids
    assert "lifelong run submitted" in follow.stdout and "ACC" in follow.stdout
    assert "stage 2/2 digits-2-3: committed in" in follow.stdout  # one line per stage event in a job's log
    run = mlflow_run(tmp_path, job_id)
    assert run.info.status == "FINISHED" and float(run.data.metrics["ACC"]) > 0.5
    # The run folder is under --workdir; the artifacts beside the sqlite store, not in the job's working folder.
    assert Path(run.data.tags["lifelong.run_dir"]).is_relative_to(tmp_path / "w")
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    logs = on(ray_two_nodes, "logs", job_id, cwd=tmp_path)
    assert logs.returncode == 0 and "ACC" in logs.stdout


def test_stopped_job_ends_its_runs_killed(tmp_path: Path, data_root: Path, ray_two_nodes: RayNodes) -> None:
    job_id = submit(tmp_path, ray_two_nodes, data_root, "--set", "training.epochs=50")
    follow = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "logs", job_id, "--address",
                               ray_two_nodes.jobs_address, "--follow"], cwd=tmp_path, env=ray_two_nodes.env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        for line in follow.stdout:  # wait until the run trains its first stage
            if "stage 1/2 digits-0-1: started" in line:
                break
        stopped = on(ray_two_nodes, "stop", job_id, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"{job_id}: STOPPED"
        follow.wait(timeout=120)
    finally:
        follow.kill()
    log = on(ray_two_nodes, "logs", job_id, cwd=tmp_path).stdout
    run = mlflow_run(tmp_path, job_id, log)
    assert run.info.status == "KILLED", log


def test_bad_input_is_refused_before_the_cluster(tmp_path: Path, ray_two_nodes: RayNodes) -> None:
    path = pipeline(tmp_path)
    # A bad pipeline: refused here, and no job reaches the cluster.
    proc = on(ray_two_nodes, "submit", str(path), "--set", "strategy.ratio=2", cwd=tmp_path)
    assert proc.returncode == 2 and "strategy" in proc.stderr and "ratio" in proc.stderr, proc.stderr
    listed = subprocess.run([sys.executable, "-c", "import json, sys; from ray.job_submission import "
                             "JobSubmissionClient as C; print(json.dumps([j.entrypoint for j in C(sys.argv[1])"
                             ".list_jobs()]))", ray_two_nodes.jobs_address], env=ray_two_nodes.env,
                            capture_output=True, text=True, timeout=120, check=True)
    assert not any("strategy.ratio=2" in e for e in json.loads(listed.stdout.strip().splitlines()[-1]))
    # Without the cluster's token, an unknown job, an address where nothing listens: one error line each, exit 2.
    no_token = {k: v for k, v in ray_two_nodes.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    cases = [(lifelong("submit", str(path), "--address", ray_two_nodes.jobs_address, cwd=tmp_path, env=no_token,
                       timeout=60), "RAY_AUTH_TOKEN"),
             (on(ray_two_nodes, "status", "lifelong-nope", cwd=tmp_path, timeout=60),
              "job lifelong-nope does not exist"),
             (on(ray_two_nodes, "logs", "lifelong-nope", cwd=tmp_path, timeout=60), "job lifelong-nope does not exist"),
             (lifelong("status", "lifelong-nope", "--address", f"http://127.0.0.1:{free_port()}", cwd=tmp_path,
                       env=ray_two_nodes.env, timeout=60), "is unreachable")]
    for proc, culprit in cases:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and culprit in errors[0], proc.stderr


def test_training_and_evaluation_on_two_nodes_match_a_local_run(tmp_path: Path, data_root: Path,
                                                               ray_two_nodes: RayNodes, s3_endpoint: str,
                                                               mlflow_server: MlflowServer) -> None:
    """Training workers pinned to the head (node_a), evaluation actors to the other node (node_b), shards,
    checkpoints and the replay buffer on the loopback S3 server, MLflow on a real server whose artifacts go to S3;
    R equals a local run's, and a run with Ray Train's executor (one fit for the pipeline). Then `lifelong lineage` lists both stages and every shard digest of the manifests, and
    `lifelong audit` passes, and names a checkpoint, then a shard, whose byte was flipped in the bucket."""
    import boto3

    bucket = f"lifelong-{uuid.uuid4().hex[:8]}"
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    storage = {"root": f"s3://{bucket}/runs", "shards": f"s3://{bucket}/shards"}
    spread = pipeline(tmp_path, name="spread.yaml", storage=storage, training={"resources": {"node_a": 0.01}},
                      evaluation={"resources": {"node_b": 0.01}}, strategy={"storage": "parquet"})
    proc = on(ray_two_nodes, "submit", str(spread), "--workdir", str(tmp_path / "w"), "--data-root", str(data_root),
              "--tracking-uri", mlflow_server.uri, *[arg for k, v in aws.items() for arg in ("--env", f"{k}={v}")],
              cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    follow = on(ray_two_nodes, "logs", job_id, "--follow", cwd=tmp_path)
    state = job_status(job_id, ray_two_nodes, tmp_path)
    assert state["status"] == "SUCCEEDED", (state, follow.stdout[-3000:])
    run = mlflow_run(tmp_path, job_id, uri=mlflow_server.uri)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server to its S3 bucket
    events = [json.loads(line) for line in
              (Path(run.data.tags["lifelong.run_dir"]) / "events.jsonl").read_text().splitlines()]
    head, other = ray_two_nodes.node_ids
    assert [e["node_id"] for e in events if e["event"] == "stage_end"] == [head, head]
    cells = [e["node_id"] for e in events if e["event"] == "eval_cell"]
    assert cells and set(cells) == {other}
    report = json.loads((Path(run.data.tags["lifelong.run_dir"]) / "report.json").read_text())
    assert report["stages"][-1]["checkpoint"].startswith(f"s3://{bucket}/runs/")
    # The same pipeline on a local Ray instance (no custom resources there), its shards and state on local disk.
    local = pipeline(tmp_path, name="local.yaml", strategy={"storage": "parquet"})
    proc = lifelong("run", str(local), "--json", "--no-progress", "--workdir", str(tmp_path / "local"),
                    "--data-root", str(data_root), cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(mine["acc"] - report["acc"]) <= 0.01
    for row_local, row_cluster in zip(mine["R"], report["R"]):
        assert all(abs(a - b) <= 0.01 for a, b in zip(row_local, row_cluster)), (mine["R"], report["R"])
    # Ray Train's executor on the same cluster: one fit for both stages, its workers on node_a too, the same R.
    proc = on(ray_two_nodes, "submit", str(spread), "--set", "training.executor=ray_train", "--workdir",
              str(tmp_path / "fit"), "--data-root", str(data_root), "--tracking-uri", mlflow_server.uri,
              *[arg for k, v in aws.items() for arg in ("--env", f"{k}={v}")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fit_job = proc.stdout.strip().splitlines()[-1]
    follow = on(ray_two_nodes, "logs", fit_job, "--follow", cwd=tmp_path)
    assert job_status(fit_job, ray_two_nodes, tmp_path)["status"] == "SUCCEEDED", follow.stdout[-3000:]
    fit_run = mlflow_run(tmp_path, fit_job, uri=mlflow_server.uri)
    fit = json.loads((Path(fit_run.data.tags["lifelong.run_dir"]) / "report.json").read_text())
    assert [s["node_id"] for s in fit["stages"]] == [head, head]
    assert all(s["checkpoint"].startswith(f"s3://{bucket}/runs/") for s in fit["stages"])
    for row_fit, row_cluster in zip(fit["R"], report["R"]):
        assert all(abs(a - b) <= 0.01 for a, b in zip(row_fit, row_cluster)), (fit["R"], report["R"])
    check_lineage_and_audit(tmp_path, run, s3, bucket, {**os.environ, **aws, "MLFLOW_TRACKING_URI": mlflow_server.uri})


def check_lineage_and_audit(tmp_path: Path, run: Any, s3: Any, bucket: str, env: dict[str, str]) -> None:
    """`lineage` of the run's last model against the manifests in the bucket; `audit` clean, then with one flipped
    byte in a checkpoint, then in a shard."""
    run_id = run.data.tags["lifelong.run_id"]
    manifests = {d: json.loads(s3.get_object(Bucket=bucket, Key=f"shards/submitted/{d}/manifest.json")["Body"].read())
                 for d in ("digits-0-1", "digits-2-3")}
    proc = lifelong("lineage", "models:/submitted/2", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    chain = json.loads(proc.stdout)
    assert [(s["stage"], s["domain"], s["run_id"]) for s in chain["stages"]] == [
        (1, "digits-2-3", run_id), (0, "digits-0-1", run_id)]
    for stage in chain["stages"]:
        manifest = manifests[stage["domain"]]
        (data,) = stage["data"]
        assert data["manifest_digest"] == manifest["digest"]
        assert [s["sha256"] for s in data["shards"]] == [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    text = lifelong("lineage", run.info.run_id, cwd=tmp_path, env=env)  # the MLflow run id works too
    assert text.returncode == 0, text.stderr
    for manifest in manifests.values():
        assert all(s["sha256"] in text.stdout for s in manifest["splits"]["train"]["shards"])
    assert text.stdout.count("stage 1 'digits-2-3'") == 1 and text.stdout.count("stage 0 'digits-0-1'") == 1

    clean = lifelong("audit", run_id, cwd=tmp_path, env=env)
    assert clean.returncode == 0 and "audit passed" in clean.stderr, clean.stderr
    stage_1 = chain["stages"][0]["checkpoint"].removeprefix(f"s3://{bucket}/")
    shard = f"shards/submitted/digits-0-1/{manifests['digits-0-1']['splits']['train']['shards'][0]['path']}"
    for key in (f"{stage_1}/model.pt", shard):
        original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(flipped))
        try:
            bad = lifelong("audit", run_id, cwd=tmp_path, env=env)
        finally:
            s3.put_object(Bucket=bucket, Key=key, Body=original)
        mismatches = [line for line in bad.stderr.splitlines() if line.startswith("MISMATCH")]
        assert bad.returncode == 1 and len(mismatches) == 1 and f"s3://{bucket}/{key}" in mismatches[0], bad.stderr
        assert "audit FAILED: 1 of" in bad.stderr


@pytest.mark.e2e
def test_trials_spread_over_the_nodes_of_a_cluster(tmp_path: Path, data_root: Path, ray_two_nodes: RayNodes,
                                                    mlflow_server: MlflowServer) -> None:
    """`lifelong tune --address`: trials run on the cluster's nodes: each trial reserves 1.5 of a node's 2 CPUs,
    so the two concurrent trials cannot share a node. Each trial logs its MLflow run, from its node, to a real MLflow server."""
    from mlflow import MlflowClient

    raw = tune_spec(num_samples=1, max_concurrent_trials=2, trial_cpus=0.5, asha={"enabled": False})
    raw["tune"]["space"] = {"strategy.ratio": {"grid": [0.3, 0.7]}}
    raw["training"].update(cpus_per_worker=0.75, threads_per_worker=1)
    assert 0.5 + 0.75 + raw["evaluation"]["cpus_per_actor"] > ray_two_nodes.num_cpus / 2
    board = run_search(tmp_path, tmp_path / "w", "--data-root", str(data_root), "--address", ray_two_nodes.address,
                       "--tracking-uri", mlflow_server.uri, raw=raw, env=ray_two_nodes.env)
    assert [r["status"] for r in board["rows"]] == ["finished", "finished"], [r["error"] for r in board["rows"]]
    assert sorted(r["node_id"] for r in board["rows"]) == sorted(ray_two_nodes.node_ids)
    client = MlflowClient(mlflow_server.uri)
    trials = client.search_runs([client.get_experiment_by_name("tune-split").experiment_id],
                                f"tags.mlflow.parentRunId = '{board['tune_run_id']}'")
    assert sorted(r.info.run_name for r in trials) == sorted(f"trial-{r['trial_id']}" for r in board["rows"])
    assert all(r.info.status == "FINISHED" and "ACC" in r.data.metrics for r in trials)
