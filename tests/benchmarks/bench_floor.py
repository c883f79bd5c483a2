"""Benchmark: the floor under any run on local Ray, against a plain PyTorch process, side by side.

Three tiny processes alternate, each timed from spawn to exit:

- ``plain``: ``import torch``, then one Adam step on a 2x2 layer: what every plain training script pays before its
  first batch (the first optimizer imports ``torch._dynamo``);
- ``cold``: ``ray.init`` of a new local Ray instance (2 CPUs, no dashboard), one training worker of
  :class:`orchestrator.workers.WorkerGroup` (1 worker, 0.5 CPU) until it is ready to train (``warm_up``: the same
  Adam step, in the worker), then ``ray.shutdown``: the least a dry run does;
- ``warm``: the same on a running cluster (``ray start --head``, started for each repeat, used once untimed, and
  stopped by its process ids), connecting with ``--address auto`` and disconnecting.

``cold - plain`` and ``warm - plain`` are the seconds a pipeline on Ray pays before and after its training whatever
it does, and, with the plain loops' wall times from ``results/pipeline.json``, the lowest ratio to the plain loop
that each ``bench_pipeline.py`` workload could reach with training, evaluation and everything else at the plain
loop's speed: ``(plain wall + floor) / plain wall``.

Prints a table and writes ``tests/benchmarks/results/floor.json``. Not a test; run it with nothing else on the
machine:

    .venv/bin/python tests/benchmarks/bench_floor.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_pipeline import RayCluster, write_results  # noqa: E402

sys.path.remove(str(HERE))  # strategies.py in this folder would shadow the package in the scripts below

PLAIN = r'''
import torch
layer = torch.nn.Linear(2, 2)
optimizer = torch.optim.Adam(layer.parameters())
layer(torch.zeros(1, 2)).sum().backward()
optimizer.step()
'''

ON_RAY = r'''
import sys, ray
from orchestrator.dag import init_ray
from orchestrator.plan import Resources
from orchestrator.workers import WorkerGroup
init_ray(sys.argv[1] if len(sys.argv) > 1 else None)
group = WorkerGroup(Resources(num_workers=1, cpus_per_worker=0.5, use_gpu=False, threads=2))
ray.get(group.warm_up())
group.shutdown()
ray.shutdown()
'''


def timed(*args: str) -> float:
    """Process wall seconds of ``python -c`` with ``args``, run from the repository root."""
    t0 = time.time()
    subprocess.run([str(REPO / ".venv/bin/python"), "-c", *args], check=True, cwd=REPO, capture_output=True)
    return time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-json", default=str(HERE / "results/pipeline.json"),
                        help="bench_pipeline.py's results, for the plain loops' wall times")
    parser.add_argument("--out", default=str(HERE / "results/floor.json"))
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"plain": [], "cold": [], "warm": []}
    for rep in range(args.repeats):
        runs["plain"].append(timed(PLAIN))
        runs["cold"].append(timed(ON_RAY))
        # An idle cluster beside the other runs would slow them: it runs for the warm run only.
        cluster = RayCluster(Path(tempfile.gettempdir()))
        try:
            timed(ON_RAY, "auto")  # untimed: the cluster's first worker process
            runs["warm"].append(timed(ON_RAY, "auto"))
        finally:
            cluster.stop()
        print(f"{rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    floor = {s: statistics.median(r - p for r, p in zip(runs[s], runs["plain"])) for s in ("cold", "warm")}
    print(f"\nmedian process wall: plain {medians['plain']:.2f} s, cold {medians['cold']:.2f} s, "
          f"warm {medians['warm']:.2f} s; floor (median of per-repeat differences): cold +{floor['cold']:.2f} s, "
          f"warm +{floor['warm']:.2f} s")
    lowest: dict[str, dict[str, float]] = {}
    pipeline_json = Path(args.pipeline_json)
    if pipeline_json.exists():
        summary = json.loads(pipeline_json.read_text())["summary"]
        print(f"\n{'workload':15s} {'plain s':>8s} | lowest reachable ratio: cold / warm")
        for name, entry in summary.items():
            plain = entry["plain_wall_s"]
            lowest[name] = {s: (plain + floor[s]) / plain for s in ("cold", "warm")}
            print(f"{name:15s} {plain:8.1f} | {lowest[name]['cold']:.2f} / {lowest[name]['warm']:.2f}")
    write_results(Path(args.out), {"runs": runs, "median_wall_s": medians, "floor_s": floor,
                                   "lowest_ratio": lowest, "pipeline_json": str(pipeline_json)})


if __name__ == "__main__":
    main()
