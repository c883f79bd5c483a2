"""`lifelong extend` against re-running the whole stream: Permuted-MNIST (domain-IL, replay), 4 domains run first and
a 5th appended with `extend`, side by side with the 5 domains run from scratch. Prints the wall times (each command
from its start to its exit, and each run's own wall_seconds), their ratio and the largest difference between the
two accuracy matrices; writes results/extend-vs-rerun.json.

    .venv/bin/python tests/benchmarks/extend_vs_rerun.py --data-root ../shared/data [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.runner import REPO, run_pipeline

PIPELINE = REPO / "pipelines" / "permuted_mnist.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    common = [f"training.epochs={args.epochs}", "strategy={name: replay, buffer_size: 1000}"]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        start = time.time()
        full = run_pipeline(PIPELINE, work / "full", args.data_root, common)
        full_command = time.time() - start
        first = run_pipeline(PIPELINE, work / "first", args.data_root, [*common, "domains=" + json.dumps(
            [{"name": f"perm-{i}", "source": {"kind": "mnist", "path": "mnist", "permutation_seed": i}}
             for i in range(4)])])
        start = time.time()
        out = subprocess.run([str(REPO / ".venv/bin/lifelong"), "extend", first["run_id"], "--domain",
                              f"perm-4={work / 'full' / 'shards' / 'permuted-mnist' / 'perm-4'}", "--workdir",
                              str(work / "first"), "--json", "--no-progress"], capture_output=True, text=True)
        extend_wall = time.time() - start
        if out.returncode != 0:
            raise SystemExit(f"lifelong extend failed: {out.stderr[-2000:]}")
        extended = json.loads(out.stdout.strip().splitlines()[-1])
    diff = float(np.abs(np.array(extended["R"]) - np.array(full["R"])).max())
    result = {"stream": "Permuted-MNIST, 5 domains, replay 1000, epochs " + str(args.epochs),
              "full_rerun_command_seconds": full_command, "full_rerun_wall_seconds": full["wall_seconds"],
              "first_4_wall_seconds": first["wall_seconds"], "extend_command_seconds": extend_wall,
              "extend_run_wall_seconds": extended["wall_seconds"],
              "ratio_extend_to_rerun": extend_wall / full_command, "max_abs_R_difference": diff,
              "acc_extended": extended["acc"], "acc_full": full["acc"]}
    print(json.dumps(result, indent=1))
    out_path = REPO / "tests" / "benchmarks" / "results" / "extend-vs-rerun.json"
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
