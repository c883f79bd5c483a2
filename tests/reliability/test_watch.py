"""`lifelong watch`: a finished run of 3 domains is extended when a 4th lands on the loopback S3 server while
`watch` polls its prefix. A domain still being written (shards, no manifest) is never taken; the extended run's R
is that of a run given all 4 domains from the start; SIGINT stops the watcher cleanly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from orchestrator.shards import build_domain
from orchestrator.spec import SourceSpec
from orchestrator.storage import Storage
from tests.reliability.driver import PERMUTED, Driver, lifelong


def test_watch_extends_a_run_when_a_domain_lands(tmp_path: Path, s3_bucket: str, full_permuted: dict[str, Any]) -> None:
    env = dict(os.environ)  # the s3_bucket fixture put the loopback endpoint and credentials in the environment
    workdir = tmp_path / "w"
    three = tmp_path / "three.yaml"
    three.write_text(yaml.safe_dump({**PERMUTED, "domains": PERMUTED["domains"][:3]}))
    first = lifelong("run", str(three), "--workdir", str(workdir), "--no-progress", "--json", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run = json.loads(first.stdout)

    prefix = f"{s3_bucket}/landing"
    storage = Storage.from_settings()
    half = f"{prefix}/perm-9"  # a domain still being written: a shard, no manifest yet
    storage.write_bytes(f"{half}/train/part-00000.parquet", b"PAR1 not finished")
    watcher = Driver("watch", prefix, "--run", run["run_id"], "--interval", "0.5", "--workdir", str(workdir),
                     "--no-progress", cwd=tmp_path, workdir=workdir, env=env)
    watcher.wait_for_output("watching", timeout=120)
    build_domain(f"{prefix}/perm-3", "perm-3", SourceSpec(kind="sklearn_digits", permutation_seed=3), None, storage)
    watcher.wait_for_output("run folder:", timeout=300)  # the extension's report is printed
    watcher.proc.send_signal(signal.SIGINT)
    assert watcher.proc.wait(60) == 0, watcher.output()[-3000:]
    assert "watch stopped" in watcher.output()

    report = json.loads((Path(run["run_dir"]) / "report.json").read_text())
    assert report["domains"] == [f"perm-{i}" for i in range(4)]  # perm-9 was never taken
    np.testing.assert_allclose(report["R"], full_permuted["R"], atol=0.01)
    pipeline = json.loads((Path(run["run_dir"]) / "pipeline.json").read_text())
    assert pipeline["domains"][3]["uri"] == f"{prefix}/perm-3"
