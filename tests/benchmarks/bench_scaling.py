"""Benchmark: how the whole-pipeline wall time grows with the number of domains T, and what evaluation adds.

Permuted-MNIST domain-IL with T = 5, 10 and 20 domains (each domain: the first 20,000 MNIST training images with
its own pixel permutation, 18,000 for training; MLP 784-400-400-10, Adam 1e-3, batch 128, 2 epochs), each run
twice through ``lifelong run`` in a fresh process:

- ``full``: with the accuracy matrix (T^2 + T cells, on each domain's 2,000-row validation split, by one evaluation
  actor while the next stage trains);
- ``train_only``: ``evaluation.enabled=false``.

Reports process wall seconds, the mean per-stage overhead (stage wall minus training-loop seconds), the least-squares
slope and intercept of wall time against T with the largest relative residual (linearity), and the evaluation cost
``full / train_only - 1`` at each T. Prints a table and writes ``tests/benchmarks/results/scaling.json``. Not a test;
run it with nothing else on the machine:

    .venv/bin/python tests/benchmarks/bench_scaling.py [--data-root DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]


def pipeline(T: int) -> dict[str, Any]:
    """The permuted-MNIST pipeline with T domains (shards built on first use, cached in the work folder)."""
    return {"name": "permuted-mnist", "scenario": "domain_il",  # one name: every T reads the same shards
            "domains": [{"name": f"perm-{k}", "source": {"kind": "mnist", "path": "mnist", "permutation_seed": k,
                                                         "max_rows": 20000}} for k in range(T)],
            "model": {"name": "mlp", "hidden": [400, 400]},
            "training": {"epochs": 2, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.001}},
            "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25, "split": "val"},
            "storage": {"shards": "shards"}}


def run(spec: Path, work: Path, data_root: str, *sets: str) -> dict[str, Any]:
    """One ``lifelong run --json`` in a fresh process; adds ``process_wall_seconds``."""
    args = [str(REPO / ".venv/bin/lifelong"), "run", str(spec), "--json", "--no-progress", "--workdir", str(work),
            "--data-root", data_root]
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=work)
    report = json.loads(out.stdout)
    report["process_wall_seconds"] = time.time() - t0
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=None, help="training.threads_per_worker (default: the spec's)")
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results/scaling.json"))
    args = parser.parse_args()
    sets = [f"training.threads_per_worker={args.threads}"] if args.threads else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for T in (5, 10, 20):
            spec = work / f"permuted-{T}.yaml"
            spec.write_text(yaml.safe_dump(pipeline(T)))
            if T == 5:  # untimed: builds the 20 domains' shards once (and warms the file cache)
                big = work / "permuted-20.yaml"
                big.write_text(yaml.safe_dump(pipeline(20)))
                run(big, work, args.data_root, "training.epochs=1", "evaluation.enabled=false")
            for mode, extra in (("full", []), ("train_only", ["evaluation.enabled=false"])):
                report = run(spec, work, args.data_root, *sets, *extra)
                stages = report["stages"]
                rows.append({"T": T, "mode": mode, "wall_s": report["process_wall_seconds"],
                             "run_wall_s": report["wall_seconds"],
                             "train_s": sum(s["train_seconds"] for s in stages),
                             "mean_stage_overhead_s": float(np.mean([s["overhead_seconds"] for s in stages])),
                             "acc": report["acc"]})
                r = rows[-1]
                print(f"T={T:2d} {mode:10s} wall {r['wall_s']:6.1f}s  training loops {r['train_s']:6.1f}s  "
                      f"overhead {r['mean_stage_overhead_s']:.2f}s/stage  ACC {r['acc']}", flush=True)
    summary: dict[str, Any] = {}
    for mode in ("full", "train_only"):
        T = np.array([r["T"] for r in rows if r["mode"] == mode], dtype=float)
        wall = np.array([r["wall_s"] for r in rows if r["mode"] == mode])
        slope, intercept = np.polyfit(T, wall, 1)
        residual = float(np.max(np.abs(wall - (slope * T + intercept)) / wall))
        summary[mode] = {"slope_s_per_domain": float(slope), "intercept_s": float(intercept),
                         "max_relative_residual": residual}
        print(f"{mode:10s} wall = {slope:.2f} s/domain x T + {intercept:.1f} s (largest residual {residual:.1%})")
    by = {(r["T"], r["mode"]): r["wall_s"] for r in rows}
    summary["evaluation_adds"] = {T: by[(T, "full")] / by[(T, "train_only")] - 1 for T in (5, 10, 20)}
    print("evaluation adds " + ", ".join(f"T={T}: {v:+.1%}" for T, v in summary["evaluation_adds"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary, "threads_per_worker": args.threads},
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
