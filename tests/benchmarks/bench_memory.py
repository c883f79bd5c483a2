"""Benchmark: the driver's peak memory (RSS) does not grow with the data: 1x against 10x the same stream.

Two Split-MNIST domains (digits 0-1 and 2-3, full MNIST, ~11,400 training rows each). The 10x stream lists ten
copies of every training shard file (real copies on disk, manifest rows, sha256 and digests rewritten), so that
every stage streams ten times the rows. Each pipeline runs through ``lifelong run`` in a fresh process (1 epoch,
finetune, evaluation on); the driver's peak RSS is its ``VmHWM`` (``/proc/<pid>/status``), read every 50 ms until it
exits. The training workers, Ray Data's read tasks and the object store are other processes: what the issue bounds
is the driver, which must never collect the data.

Prints both peaks and their ratio and writes ``tests/benchmarks/results/memory.json``. Not a test; run it with
nothing else on the machine: ``.venv/bin/python tests/benchmarks/bench_memory.py [--data-root DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a file, this script's folder comes first on sys.path and would shadow the `strategies` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import yaml  # noqa: E402

from orchestrator import shards  # noqa: E402
from orchestrator.spec import SourceSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def copies(src: Path, dst: Path, n: int) -> None:
    """A domain folder at ``dst`` whose train split is ``n`` copies of ``src``'s train shards (other splits kept)."""
    shutil.copytree(src, dst)
    manifest = json.loads((src / shards.MANIFEST).read_text())
    train = []
    for c in range(n):
        for shard in manifest["splits"]["train"]["shards"]:
            path = shard["path"].replace(".parquet", f"-copy{c}.parquet")
            blob = (src / shard["path"]).read_bytes()
            (dst / path).write_bytes(blob)
            train.append({**shard, "path": path, "sha256": hashlib.sha256(blob).hexdigest()})
    manifest["splits"]["train"] = {"rows": sum(s["rows"] for s in train), "shards": train,
                                   "digest": shards.digest(json.dumps(train, sort_keys=True))}
    manifest["digest"] = shards.digest(json.dumps(manifest["splits"], sort_keys=True))
    manifest.pop("source", None)
    (dst / shards.MANIFEST).write_text(json.dumps(manifest, indent=1))


def peak_rss(args: list[str], cwd: Path) -> tuple[int, dict[str, Any]]:
    """Run ``args``; return the process's peak RSS in bytes (VmHWM, polled) and its JSON report."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:"))
            peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"lifelong run failed with exit code {proc.returncode}")
    return peak, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results/memory.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in range(2):
            src = work / "x1" / f"digits-{2 * k}-{2 * k + 1}"
            shards.build_domain(str(src), src.name, SourceSpec(kind="mnist", path="mnist", classes=[2 * k, 2 * k + 1]),
                                Path(args.data_root))
            copies(src, work / "x10" / src.name, 10)
        for scale in ("x1", "x10"):
            spec = {"name": f"memory-{scale}", "scenario": "class_il",
                    "domains": [{"name": d.name, "uri": str(d)} for d in sorted((work / scale).iterdir())],
                    "model": {"name": "mlp", "hidden": [400, 400]},
                    "training": {"epochs": 1, "batch_size": 128},
                    "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25}}
            path = work / f"{scale}.yaml"
            path.write_text(yaml.safe_dump(spec))
            peak, report = peak_rss([str(REPO / ".venv/bin/lifelong"), "run", str(path), "--json", "--no-progress",
                                     "--workdir", str(work / "runs")], work)
            rows = sum(json.loads((Path(d["uri"]) / shards.MANIFEST).read_text())["splits"]["train"]["rows"]
                       for d in spec["domains"])
            results[scale] = {"driver_peak_rss_bytes": peak, "train_rows_streamed": rows, "acc": report["acc"],
                              "wall_seconds": report["wall_seconds"]}
            print(f"{scale:4s} {rows:8d} training rows streamed, driver peak RSS {peak / 2**20:7.1f} MiB, "
                  f"wall {report['wall_seconds']:.1f} s", flush=True)
    results["ratio_x10_to_x1"] = results["x10"]["driver_peak_rss_bytes"] / results["x1"]["driver_peak_rss_bytes"]
    print(f"driver peak RSS, 10x / 1x: {results['ratio_x10_to_x1']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
