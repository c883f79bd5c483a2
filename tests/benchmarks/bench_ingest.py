"""Benchmark: ingest throughput of the pipeline's reader against a raw pyarrow read of the same Parquet shards.

For one MNIST domain (all ten digits, the train split: ~54,000 rows in 8,192-row shards), stored once on local disk
and once on a loopback S3 server (moto's ThreadedMotoServer), streamed ``--copies`` (10) times per pass so that
start-up latency (counted in the per-stage overhead of ``bench_scaling.py``) does not hide throughput, it measures:

- ``raw``: ``pyarrow.parquet.read_table`` of every shard, one after the other (the floor any reader pays);
- ``pipeline``: a worker's part of the stage (``orchestrator/ingest.py``: ``WorkerShard.tables``, row group by row
  group, with the domain tag) as the Arrow tables of 2048 rows that the worker collates;
- ``tensors``: the same, continued as a training worker's first epoch streams it (``orchestrator.stage.
  stream_batches``: the workers' collate function to float tensors, cut into batches of 128);
- ``training``: the rows per second that training consumes (the Hsu et al. MLP, Adam, batch 128, on in-memory
  tensors), to show whether the reader can starve training.

Each figure is rows/s and MB/s (Parquet bytes on storage / seconds), the best of ``--repeats`` passes. Prints a table
and writes ``tests/benchmarks/results/ingest.json``. Not a test; run it with nothing else on the machine:

    .venv/bin/python tests/benchmarks/bench_ingest.py [--repeats 3] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a file, this script's folder comes first on sys.path and would shadow the `strategies` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from orchestrator import shards  # noqa: E402
from orchestrator.ingest import WorkerShard, stage_files  # noqa: E402
from orchestrator.models import HeadLayout  # noqa: E402
from orchestrator.spec import SourceSpec  # noqa: E402
from orchestrator.stage import ToBatch, stream_batches  # noqa: E402
from orchestrator.storage import Storage, join  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def raw_read(uri: str, manifest: dict[str, Any], storage: Storage, copies: int) -> tuple[int, float]:
    """Rows read and seconds for ``pq.read_table`` of every train shard, ``copies`` times over."""
    t0, rows = time.perf_counter(), 0
    for _ in range(copies):
        for full in shards.shard_uris(uri, manifest, "train"):
            fs, path = storage.arrow(full)
            rows += pq.read_table(path, filesystem=fs).num_rows
    return rows, time.perf_counter() - t0


def worker_shard(uri: str, manifest: dict[str, Any], storage: Storage, copies: int) -> WorkerShard:
    """One worker's part (all of it) of a stage that streams the domain's train split ``copies`` times."""
    files = stage_files([(uri, manifest)] * copies, list(range(copies)), "files", seed=0)
    return WorkerShard(files, ("x", "y"), storage)


def pipeline_arrow(uri: str, manifest: dict[str, Any], storage: Storage, copies: int) -> tuple[int, float]:
    """Rows and seconds through the stage dataset (the domain listed ``copies`` times), as the Arrow batches of
    2048 rows that the workers' iterator cuts from it."""
    t0, rows = time.perf_counter(), 0
    for table in worker_shard(uri, manifest, storage, copies).tables(2048):
        rows += table.num_rows
    return rows, time.perf_counter() - t0


def pipeline_tensors(uri: str, manifest: dict[str, Any], storage: Storage, copies: int) -> tuple[int, float]:
    """As :func:`pipeline_arrow`, continued into the workers' collate function: float tensor batches of 128."""
    layout = HeadLayout.build("domain_il", [manifest["label_set"]] * copies)
    collate = ToBatch("x", "y", tuple(manifest["schema"]["features"]["shape"]),
                      manifest["schema"]["features"]["scale"], layout.target_table())
    t0, rows = time.perf_counter(), 0
    for batch in stream_batches(worker_shard(uri, manifest, storage, copies), collate, 128):
        rows += len(batch)
    return rows, time.perf_counter() - t0


def training_rate(steps: int = 200) -> float:
    """Rows/s the Hsu et al. MLP consumes when training with Adam on in-memory batches of 128 (torch's default
    threads: all cores, the fastest training can go here)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 400), torch.nn.ReLU(),
                                torch.nn.Linear(400, 400), torch.nn.ReLU(), torch.nn.Linear(400, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * 128 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=10, help="times the domain's shards are streamed per pass")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results"))
    args = parser.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lifelong-bench")
    storage = Storage.from_settings()
    source = SourceSpec(kind="mnist", path="mnist")
    results: dict[str, Any] = {"training_rows_per_s": training_rate()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for where, uri in (("local", str(Path(tmp) / "mnist")), ("s3", join("s3://lifelong-bench", "mnist"))):
                manifest = shards.build_domain(uri, "mnist", source, Path(args.data_root), storage)
                size = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
                size *= args.copies
                for reader, fn in (("raw", raw_read), ("pipeline", pipeline_arrow), ("tensors", pipeline_tensors)):
                    best = min((fn(uri, manifest, storage, args.copies) for _ in range(args.repeats)),
                               key=lambda r: r[1])
                    rows, seconds = best
                    results[f"{where}_{reader}"] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                                                    "mb_per_s": size / seconds / 1e6, "parquet_bytes": size}
    finally:
        server.stop()
    for where in ("local", "s3"):
        for reader in ("pipeline", "tensors"):
            results[f"{where}_{reader}_vs_raw"] = (results[f"{where}_{reader}"]["rows_per_s"]
                                                   / results[f"{where}_raw"]["rows_per_s"])
            results[f"{where}_{reader}_vs_training"] = (results[f"{where}_{reader}"]["rows_per_s"]
                                                        / results["training_rows_per_s"])
    print(f"{'reader':22s} {'rows/s':>12s} {'MB/s':>8s} {'x raw':>6s} {'x training':>11s}")
    for where in ("local", "s3"):
        for reader in ("raw", "pipeline", "tensors"):
            r = results[f"{where}_{reader}"]
            ratios = ("", "") if reader == "raw" else (f"{results[f'{where}_{reader}_vs_raw']:.2f}",
                                                      f"{results[f'{where}_{reader}_vs_training']:.1f}")
            print(f"{where + '_' + reader:22s} {r['rows_per_s']:12.0f} {r['mb_per_s']:8.1f} {ratios[0]:>6s} "
                  f"{ratios[1]:>11s}")
    print(f"training consumes {results['training_rows_per_s']:.0f} rows/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
