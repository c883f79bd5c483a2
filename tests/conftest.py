"""Shared fixtures: the real datasets beside the checkout, a local 2-CPU Ray instance, a two-node Ray cluster on
loopback, an S3 endpoint, and an MLflow server whose artifacts go to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.ray_nodes import RayNodes

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """``../shared/data`` beside the checkout (or $LIFELONG_DATA_ROOT); tests needing MNIST skip without it."""
    from orchestrator.shards import find_data_root

    root = find_data_root(None, [REPO])
    if root is None or not (root / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST not found: put ../shared/data beside the checkout or set LIFELONG_DATA_ROOT")
    return root


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray instance with 2 CPUs, no dashboard and no worker logs on the driver; shut down afterwards."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024**2,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes() -> Iterator[RayNodes]:
    """A real Ray cluster of two nodes on this machine (``tests/ray_nodes.py``): a head with its Jobs API on
    127.0.0.1 and a worker node, 2 logical CPUs and a custom resource (``node_a``, ``node_b``) each, token
    authentication on. Stopped by its own process ids; the test fails if one is left."""
    nodes = RayNodes()
    try:
        yield nodes.start()
    finally:
        left = nodes.stop()
        assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server on loopback (moto's ThreadedMotoServer, as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback server, reachable through the standard AWS environment variables
    (dummy credentials, ``AWS_ENDPOINT_URL``); returns ``s3://<bucket>``."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"lifelong-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint: str) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` on loopback (``tests/mlflow_server.py``): sqlite backend, artifacts proxied to a
    bucket on the loopback S3 server. Stopped by its own process ids; the session fails if one is left."""
    import uuid

    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    server = MlflowServer(s3_endpoint, bucket)
    try:
        yield server.start()
    finally:
        left = server.stop()
        assert not left, f"MLflow server processes left behind: {left}"
