"""Benchmark: the stability gap on Split-MNIST class-IL, seen by continual evaluation.

Runs ``pipelines/split_mnist.yaml`` (MLP 400-400, Adam, 4 epochs per domain) with each strategy given (default:
replay with 1,100 samples, and finetune for contrast) and ``evaluation.every_n_steps`` (default 50), then once more
without continual evaluation, to measure what it costs the training loop. Reports, per strategy, the accuracy at
each task's end, min-ACC, WC-ACC and windowed forgetting (De Lange et al., ICLR 2023, §3; see
``orchestrator.metrics.stability_gap``), the dropped snapshots, and the training seconds with and without continual
evaluation. Writes ``tests/benchmarks/results/stability-gap.json`` and copies each run's curve to
``tests/benchmarks/results/stability-gap-<strategy>.png``. Not a test; run it with nothing else on the machine:

    .venv/bin/python tests/benchmarks/stability_gap.py [--every 50] [--strategies replay finetune] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from runner import REPO, run_pipeline  # this folder, first on sys.path when run as a script

RESULTS = REPO / "tests" / "benchmarks" / "results"
PIPELINE = REPO / "pipelines" / "split_mnist.yaml"
STRATEGIES = {"replay": ["strategy.name=replay", "strategy.buffer_size=1100"], "finetune": ["strategy.name=finetune"]}


def main() -> None:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            report = run_pipeline(PIPELINE, Path(tmp) / name, args.data_root,
                                  [*STRATEGIES[name], f"evaluation.every_n_steps={args.every}"])
            plain = run_pipeline(PIPELINE, Path(tmp) / f"{name}-plain", args.data_root, STRATEGIES[name])
            shutil.copy(Path(report["run_dir"]) / "continual_evaluation.png", RESULTS / f"stability-gap-{name}.png")
            rows.append({"strategy": name, "every_n_steps": args.every, "acc": report["acc"], "R": report["R"],
                         **report["stability"], "points": len(report["curve"]),
                         "snapshots_dropped": report["curve_snapshots_dropped"],
                         "train_seconds": sum(s["train_seconds"] for s in report["stages"]),
                         "train_seconds_without": sum(s["train_seconds"] for s in plain["stages"]),
                         "wall_seconds": report["wall_seconds"], "wall_seconds_without": plain["wall_seconds"],
                         "acc_without": plain["acc"], "curve": report["curve"]})
    (RESULTS / "stability-gap.json").write_text(json.dumps(rows, indent=1))
    print(f"{'strategy':10} {'ACC':>7} {'task-end':>9} {'min-ACC':>8} {'gap':>7} {'WC-ACC':>7} {'WF':>7} "
          f"{'dropped':>7} {'train s (w/o)':>14}")
    for r in rows:
        print(f"{r['strategy']:10} {r['acc']:7.4f} {r['task_end_acc']:9.4f} {r['min_acc']:8.4f} {r['gap']:7.4f} "
              f"{r['wc_acc']:7.4f} {r['windowed_forgetting']:7.4f} {r['snapshots_dropped']:7d} "
              f"{r['train_seconds']:6.1f} ({r['train_seconds_without']:.1f})")


if __name__ == "__main__":
    main()
