"""End to end on a real S3 endpoint: ``lifelong run pipelines/split_mnist.yaml`` with its shards, checkpoints,
strategy state and Parquet replay buffer all on the loopback S3 server and its MLflow records on a loopback MLflow
server, through the CLI as a user runs it; the AWS secret key and session token, the password in the tracking URI
and the MLflow token it was given appear in no log line, record or file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from orchestrator.checkpoint import load_checkpoint, read_lineage
from orchestrator.storage import Storage
from strategies.buffer import read_part
from tests.mlflow_server import MlflowServer

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def test_split_mnist_runs_with_everything_on_s3(s3_endpoint: str, data_root: Path, tmp_path: Path,
                                                mlflow_server: MlflowServer) -> None:
    bucket = f"lifelong-{uuid.uuid4().hex[:8]}"
    secret = f"s3cr3t-{uuid.uuid4().hex}"  # moto accepts any credentials; this one must never be written anywhere
    token = f"t0ken-{uuid.uuid4().hex}"  # nor this session token
    password = f"pa55-{uuid.uuid4().hex}"  # nor the tracking URI's password (the test server ignores it)
    mlflow_token = f"ml-{uuid.uuid4().hex}"  # nor MLflow's own bearer token
    tracking = mlflow_server.uri.replace("http://", f"http://alice:{password}@")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key=secret).create_bucket(Bucket=bucket)
    # The standard AWS environment: pyarrow ignores AWS_ENDPOINT_URL, so reaching the server at all shows that the
    # endpoint is passed through explicitly to every reader and writer (driver, workers, Ray Data, evaluators).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=token,
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=s3_endpoint, MLFLOW_TRACKING_TOKEN=mlflow_token)
    workdir = tmp_path / "work"
    res = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(REPO / "pipelines/split_mnist.yaml"), "--json",
         "--no-progress", "--workdir", str(workdir), "--data-root", str(data_root), "--tracking-uri", tracking,
         "--set", f"storage.shards=s3://{bucket}/shards", "--set", f"storage.root=s3://{bucket}/runs",
         "--set", "strategy.name=replay", "--set", "strategy.buffer_size=1100", "--set", "strategy.storage=parquet",
         "--set", "training.epochs=1"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)

    keys = {o["Key"] for page in boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                                              aws_access_key_id="testing", aws_secret_access_key=secret)
            .get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])}
    run_prefix = f"runs/split-mnist/{report['run_id']}"
    for d in report["domains"]:  # the shards were built straight into the bucket
        assert f"shards/split-mnist/{d}/manifest.json" in keys
    for k in range(5):  # every stage's checkpoint is complete on S3, and its replay buffer went to Parquet there
        assert {f"{run_prefix}/stage-{k}/checkpoint/{f}" for f in ("model.pt", "strategy.safetensors", "lineage.json")} <= keys
        assert f"{run_prefix}/stage-{k}/_COMPLETED" in keys
        assert any(key.startswith(f"{run_prefix}/state/stage-{k}/replay") and key.endswith(".parquet") for key in keys)
    assert not [key for key in keys if ".tmp-" in key]  # every write was committed; no temporary key is left

    storage = Storage(endpoint_url=s3_endpoint, key="testing", secret=secret)
    last = report["stages"][-1]["checkpoint"]
    assert last == f"s3://{bucket}/{run_prefix}/stage-4/checkpoint"
    _, states, lineage = load_checkpoint(last, storage)
    assert lineage["parent"]["uri"] == report["stages"][-2]["checkpoint"] and lineage["parent"]["stage"] == 3
    assert read_lineage(lineage["parent"]["uri"], storage)["model_sha256"] == lineage["parent"]["model_sha256"]
    parts = states[0]["parts"]
    assert sum(p["rows"] for p in parts) == 1100
    assert sum(len(read_part(storage, p["uri"])["y"]) for p in parts) == 1100
    assert report["R"][4][0] > 0.5 and report["acc"] > 0.6  # replay from the S3 buffer remembers domain 0
    assert report["tracking_uri"] == mlflow_server.uri.replace("http://", "http://alice:***@")

    # The secrets reached no log line, no report or run record, no event log, no file of the run, here or in the
    # bucket (lineage records, manifests), and nothing on the MLflow server (its database: params, tags, registered
    # versions; its artifacts, in their own bucket).
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key=secret)
    artifacts = [(mlflow_server.bucket, o["Key"]) for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=mlflow_server.bucket) for o in page.get("Contents", [])]
    assert any(key.endswith("report.json") for _, key in artifacts)  # the run's artifacts went to the server
    files = [path for root in (workdir, mlflow_server.temp) for path in root.rglob("*") if path.is_file()]
    for hidden in (secret, token, password, mlflow_token):
        assert hidden not in res.stdout + res.stderr
        for path in files:
            assert hidden.encode() not in path.read_bytes(), path
        for where, key in [*((bucket, key) for key in keys), *artifacts]:
            assert hidden.encode() not in client.get_object(Bucket=where, Key=key)["Body"].read(), key
