"""Promise 4: the S3 endpoint goes away for 10 s in the middle of a stage (the test stops its loopback S3 server and
starts it again on the same port). Reads and writes retry with backoff and the run completes; with a retry budget
shorter than the outage the run fails with one error line naming the endpoint, and `lifelong resume` completes it
once the endpoint is back."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from moto.server import ThreadedMotoServer

from tests.reliability.driver import DIGITS, Driver, error_lines, lifelong

OUTAGE_SECONDS = 10.0


class Endpoint:
    """A loopback S3 server (moto, in this process) that can be stopped and started again on its port; the
    buckets it holds survive a restart."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    try:
        yield server
    finally:
        server.stop()


def _outage(driver: Driver, endpoint: Endpoint) -> None:
    """Stop the endpoint once stage 1 has started, keep it down for OUTAGE_SECONDS (while the run goes on), then
    start it again."""
    driver.wait_for(lambda ev: any(e["event"] == "stage_start" and e["stage"] == 1 for e in ev))
    endpoint.stop()
    down = time.time()
    while time.time() - down < OUTAGE_SECONDS and driver.proc.poll() is None:
        time.sleep(0.2)  # the outage's length, not a wait for the run
    endpoint.start()


def test_an_s3_outage_is_retried_and_one_past_the_budget_is_resumed(endpoint: Endpoint, tmp_path: Path) -> None:
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint.url)
    boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    spec = {**DIGITS, "domains": DIGITS["domains"][:2],
            "training": {**DIGITS["training"], "epochs": 100, "batch_size": 16},
            "storage": {"shards": f"s3://{bucket}/shards", "root": f"s3://{bucket}/runs"}}

    # Within the retry budget: the run waits the outage out.
    patient = tmp_path / "patient.yaml"
    patient.write_text(yaml.safe_dump({**spec, "storage": {**spec["storage"], "s3": {"retry_seconds": 60}}}))
    driver = Driver("run", str(patient), "--workdir", str(tmp_path / "a"), "--no-progress", cwd=tmp_path,
                    workdir=tmp_path / "a", env=env)
    _outage(driver, endpoint)
    assert driver.proc.wait(300) == 0, driver.output()[-3000:]
    (run_a,) = (tmp_path / "a" / "p").iterdir()
    done = json.loads((run_a / "report.json").read_text())
    assert len(done["R"]) == 2 and done["R"][1][1] > 0.8

    # Past the budget: one error line naming the endpoint; resumed once the endpoint is back.
    hasty = tmp_path / "hasty.yaml"
    hasty.write_text(yaml.safe_dump({**spec, "storage": {**spec["storage"], "s3": {"retry_seconds": 1}}}))
    workdir = tmp_path / "b"
    driver = Driver("run", str(hasty), "--workdir", str(workdir), "--no-progress", cwd=tmp_path, workdir=workdir,
                    env=env)
    _outage(driver, endpoint)
    assert driver.proc.wait(300) == 2, driver.output()[-3000:]
    errors = [line for line in driver.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and endpoint.url in errors[0] and "storage.s3.retry_seconds" in errors[0], errors
    (run_b,) = (workdir / "p").iterdir()
    resumed = lifelong("resume", run_b.name, "--workdir", str(workdir), "--no-progress", "--json", cwd=tmp_path,
                       env=env)
    assert resumed.returncode == 0 and not error_lines(resumed), resumed.stderr[-3000:]
    report = json.loads(resumed.stdout)
    np.testing.assert_allclose(report["R"], done["R"], atol=0.02)
