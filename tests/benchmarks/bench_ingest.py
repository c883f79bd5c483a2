"""Benchmark: ingest throughput of the pipeline's reader against a raw pyarrow read of the same Parquet shards.

For one MNIST domain (all ten digits, the train split: ~54,000 rows in 8,192-row shards), stored once on local disk
and once on a loopback S3 server (moto's ThreadedMotoServer), it measures:

- ``raw``: ``pyarrow.parquet.read_table`` of every shard, one after the other (the floor any reader pays);
- ``pipeline``: the stage dataset of ``orchestrator/ingest.py`` (Ray Data ``read_parquet`` + domain tag), iterated with
  ``iter_torch_batches(batch_size=128)`` and the workers' own collate function (``orchestrator.stage.ToBatch``),
  i.e. tensors ready for the model, as a Ray Train worker receives them;
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
from orchestrator.ingest import stage_dataset  # noqa: E402
from orchestrator.models import HeadLayout  # noqa: E402
from orchestrator.spec import SourceSpec  # noqa: E402
from orchestrator.stage import ToBatch  # noqa: E402
from orchestrator.storage import Storage, join  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def raw_read(uri: str, manifest: dict[str, Any], storage: Storage) -> tuple[int, float]:
    """Rows read and seconds for ``pq.read_table`` of every train shard."""
    t0, rows = time.perf_counter(), 0
    for full in shards.shard_uris(uri, manifest, "train"):
        fs, path = storage.arrow(full)
        rows += pq.read_table(path, filesystem=fs).num_rows
    return rows, time.perf_counter() - t0


def pipeline_read(uri: str, manifest: dict[str, Any], storage: Storage) -> tuple[int, float]:
    """Rows and seconds through the stage dataset and the workers' collate function, as torch batches."""
    layout = HeadLayout.build("class_il", [manifest["label_set"]])
    collate = ToBatch("x", "y", tuple(manifest["schema"]["features"]["shape"]),
                      manifest["schema"]["features"]["scale"], layout.target_table())
    t0, rows = time.perf_counter(), 0
    ds = stage_dataset([(uri, manifest)], [0], "files", seed=0, storage=storage)
    for batch in ds.iter_torch_batches(batch_size=128, collate_fn=collate):
        rows += len(batch)
    return rows, time.perf_counter() - t0


def training_rate(steps: int = 200) -> float:
    """Rows/s the Hsu et al. MLP consumes when training with Adam on in-memory batches of 128."""
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
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results"))
    args = parser.parse_args()

    import boto3
    import ray
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                   "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[str, Any] = {"training_rows_per_s": training_rate()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for where, uri in (("local", str(Path(tmp) / "mnist")), ("s3", join("s3://lifelong-bench", "mnist"))):
                manifest = shards.build_domain(uri, "mnist", source, Path(args.data_root), storage)
                size = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
                for reader, fn in (("raw", raw_read), ("pipeline", pipeline_read)):
                    best = min((fn(uri, manifest, storage) for _ in range(args.repeats)), key=lambda r: r[1])
                    rows, seconds = best
                    results[f"{where}_{reader}"] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                                                    "mb_per_s": size / seconds / 1e6, "parquet_bytes": size}
    finally:
        ray.shutdown()
        server.stop()
    for where in ("local", "s3"):
        results[f"{where}_pipeline_vs_raw"] = (results[f"{where}_pipeline"]["rows_per_s"]
                                               / results[f"{where}_raw"]["rows_per_s"])
        results[f"{where}_pipeline_vs_training"] = (results[f"{where}_pipeline"]["rows_per_s"]
                                                    / results["training_rows_per_s"])
    print(f"{'reader':22s} {'rows/s':>12s} {'MB/s':>8s}")
    for key in ("local_raw", "local_pipeline", "s3_raw", "s3_pipeline"):
        print(f"{key:22s} {results[key]['rows_per_s']:12.0f} {results[key]['mb_per_s']:8.1f}")
    print(f"training consumes {results['training_rows_per_s']:.0f} rows/s; pipeline/raw: local "
          f"{results['local_pipeline_vs_raw']:.2f}, s3 {results['s3_pipeline_vs_raw']:.2f}; pipeline/training: local "
          f"{results['local_pipeline_vs_training']:.1f}x, s3 {results['s3_pipeline_vs_training']:.1f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
