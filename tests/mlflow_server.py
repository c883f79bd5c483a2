"""A real ``mlflow server`` on loopback for tests: a sqlite backend in its own temp folder and its artifact root on
an S3 endpoint (proxied, so clients need no S3 credentials for artifacts), stopped by the ids of its processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.ray_nodes import free_port, processes_under, stop_processes

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@dataclass
class MlflowServer:
    """``mlflow server`` with ``--backend-store-uri sqlite:///<temp>/mlflow.db`` and ``--artifacts-destination
    s3://<bucket>/artifacts`` on ``s3_endpoint``.

    Attributes:
        uri: ``http://127.0.0.1:PORT``. temp: its own folder (its command line names it, so that its processes and
            their children are found by it).
    """

    s3_endpoint: str
    bucket: str
    uri: str = ""
    temp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mlflow-server-", dir="/tmp")))
    log: Path | None = None

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start the server and return once ``/health`` answers.

        Raises:
            RuntimeError: if it exits or does not answer within ``timeout_s`` seconds (its log's tail included).
        """
        port = free_port()
        self.uri, self.log = f"http://127.0.0.1:{port}", self.temp / "server.log"
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "wb") as out:
            proc = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                     "--backend-store-uri", f"sqlite:///{self.temp / 'mlflow.db'}",
                                     "--artifacts-destination", f"s3://{self.bucket}/artifacts"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.temp)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)  # polling until the server answers, not synchronising a test
        raise RuntimeError(f"mlflow server at {self.uri} did not answer in {timeout_s} s: "
                           f"{self.log.read_text()[-2000:]}")

    def pids(self) -> list[int]:
        """The server's live processes (its own and its workers)."""
        return processes_under([self.temp])

    def stop(self) -> list[int]:
        """Stop the server's processes by their ids and remove its folder; return the ids of any left alive."""
        left = stop_processes(self.pids())
        shutil.rmtree(self.temp, ignore_errors=True)
        return left
