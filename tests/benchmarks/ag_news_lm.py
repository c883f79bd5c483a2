"""Benchmark: continual pre-training of a small GPT on AG News' four topics (``pipelines/ag_news_lm.yaml``).

Three comparisons on the same stream (World -> Sports -> Business -> Sci/Tech, UTF-8 bytes, 8 epochs per domain):

- ``strategies``: finetune, replay of 5% of each domain, DAS (the paper's gradient soft-mask), DAS with its mask on
  the optimizer's update (``apply_to: update``, what it takes to hold under Adam), ``[replay, das]``, and DAS on
  the update without the proxy-KL protection of the (here untrained) starting model, alone and after replay;
- ``paper-lr``: finetune and DAS (gradient mask) at DAS's paper learning rate, 1e-4;
- ``schedules``: finetune under the constant learning rate, cosine re-warming and re-decaying at every domain, and
  the infinite schedule (Ibrahim et al., TMLR 2024).

Each run is ``lifelong run`` with ``--set`` overrides; the benchmark reports, per run, the 4x4 perplexity matrix P
(validation split), its average on the last row, the mean rise in perplexity on earlier domains
(``ppl_rise``, forgetting) and the wall seconds, and writes ``tests/benchmarks/results/ag-news-lm.json`` and
each run's P heatmap (``ag-news-lm-<run>.png``). Not a test; run it with nothing else on the machine:

    .venv/bin/python tests/benchmarks/ag_news_lm.py [--part strategies schedules] [--runs finetune das] \\
        [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from runner import REPO, run_pipeline  # this folder, first on sys.path when run as a script

RESULTS = REPO / "tests" / "benchmarks" / "results"
REPLAY = "{name: replay, fraction: 0.05, ratio: 0.25}"
RUNS = {
    "strategies": {
        "finetune": ["strategy=finetune"],
        "replay-5%": [f"strategy={REPLAY}"],
        "das": ["strategy=das"],
        "das-update": ["strategy={name: das, apply_to: update}"],
        "replay+das": [f"strategy=[{REPLAY}, das]"],
        "das-update-no-init": ["strategy={name: das, apply_to: update, protect_initial: false}"],
        "replay+das-update": [f"strategy=[{REPLAY}, {{name: das, apply_to: update, protect_initial: false}}]"],
    },
    "paper-lr": {  # DAS's paper trains with Adam(W) at 1e-4: the gradient mask against finetune at that rate
        "finetune-lr1e-4": ["strategy=finetune", "training.optimizer.lr=0.0001"],
        "das-lr1e-4": ["strategy=das", "training.optimizer.lr=0.0001"],
    },
    "schedules": {
        "constant": ["strategy=finetune"],
        "cosine": ["strategy=finetune", "training.lr_schedule.name=cosine"],
        "infinite": ["strategy=finetune", "training.lr_schedule.name=infinite"],
    },
}


def main() -> None:
    """Run the benchmark and write its results (merged into an existing results file, run by run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--runs", nargs="*", default=None, help="only these runs of the parts")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "ag-news-lm.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.part:
            for name, overrides in RUNS[part].items():
                if args.runs and name not in args.runs:
                    continue
                same = [row for rows in results.values() for row in rows.values() if row["overrides"] == overrides]
                if same:  # the same run in the other part (constant = finetune): measured once
                    results.setdefault(part, {})[name] = {**same[0], "part": part}
                    print(f"{part:10s} {name:12s} = the run with the same overrides, measured once", flush=True)
                    continue
                start = time.time()
                report = run_pipeline(REPO / "pipelines" / "ag_news_lm.yaml", Path(tmp) / name, args.data_root,
                                      overrides)
                shutil.copy(Path(report["run_dir"]) / "perplexity_matrix.png", RESULTS / f"ag-news-lm-{name}.png")
                row = {"part": part, "overrides": overrides, "strategy": report["strategy"],
                       "P": report["P"], "P_b": report["P_b"], "avg_ppl": report["avg_ppl"],
                       "ppl_rise": report["ppl_rise"], "avg_ppl_forgetting": report["avg_ppl_forgetting"],
                       "ppl_fwt": report["ppl_fwt"], "bits_per_token": report["bits_per_token"],
                       "train_seconds": sum(s["train_seconds"] for s in report["stages"]),
                       "wall_seconds": time.time() - start}
                results.setdefault(part, {})[name] = row
                out.write_text(json.dumps(results, indent=1))
                print(f"{part:10s} {name:12s} avg PPL {row['avg_ppl']:.3f}  rise {row['ppl_rise']:+.3f}  "
                      f"forgetting {row['avg_ppl_forgetting']:+.3f}  wall {row['wall_seconds']:.0f} s", flush=True)
                for i, r in enumerate(row["P"]):
                    print("    " + " ".join(f"{v:7.3f}" for v in r), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
