"""Benchmark: `lifelong tune` on Split-MNIST class-IL with replay and SPG composed, against the default config.

Runs, one after the other:

1. ``lifelong tune pipelines/tune_split_mnist.yaml --export best.yaml``: 16 trials (or ``--samples N``) over the
   replay ratio in [0.1, 0.9], the buffer size in {200, 500, 1100} and SPG's soft-mask strength in [0, 2], chosen on
   val ACC, with ASHA over domains finished;
2. ``lifelong run`` of the default config (the same YAML without ``tune:``: ratio 0.5, buffer 500, strength 1.0);
3. ``lifelong run best.yaml``.

Reports the best config, both configs' **test** ACC (from the two runs, never from the search), the search's wall
time and the compute ASHA saved (trial-domains trained against trial-domains that stopped trials did not train).
Prints a summary and writes ``tests/benchmarks/results/tune-split-mnist.json``. Not a test; run it with nothing
else on the machine:

    .venv/bin/python tests/benchmarks/tune_split_mnist.py [--samples N] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "tune_split_mnist.yaml"


def lifelong(*args: str, cwd: Path) -> tuple[dict[str, Any], float]:
    """Run a ``lifelong`` command with ``--json``; its last stdout line as JSON, and its process wall seconds."""
    t0 = time.time()
    out = subprocess.run([str(REPO / ".venv/bin/lifelong"), *args, "--json"], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"lifelong {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results/tune-split-mnist.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = ["--workdir", str(work / "w"), "--data-root", args.data_root]
        board, search_wall = lifelong("tune", str(PIPELINE), "--set", f"tune.num_samples={args.samples}",
                                      "--export", str(work / "best.yaml"), *common, cwd=work)
        default = yaml.safe_load(PIPELINE.read_text())
        default.pop("tune")
        (work / "default.yaml").write_text(yaml.safe_dump(default, sort_keys=False))
        default_run, default_wall = lifelong("run", str(work / "default.yaml"), "--no-progress", *common, cwd=work)
        best_run, best_wall = lifelong("run", str(work / "best.yaml"), "--no-progress", *common, cwd=work)
    rows = board["rows"]
    summary = {
        "trials": len(rows), "finished": sum(r["status"] == "finished" for r in rows),
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "trial_domains_run": board["domains_run"], "trial_domains_saved": board["domains_saved"],
        "search_wall_s": search_wall, "best_config": board["best"]["config"],
        "best_val_acc": board["best"]["val_acc"],
        "test_acc": {"default": default_run["acc"], "best": best_run["acc"]},
        "test_bwt": {"default": default_run["bwt"], "best": best_run["bwt"]},
        "run_wall_s": {"default": default_wall, "best": best_wall},
        "best_beats_default": best_run["acc"] > default_run["acc"],
    }
    for r in rows:
        print(f"{r['trial_id']}  {r['status']:13s} domains {r['domains']}  val ACC {r['val_acc']:.4f}  "
              f"{json.dumps(r['config'])}")
    print(f"\nsearch: {len(rows)} trials in {search_wall:.0f} s; {board['domains_run']} trial-domains trained, "
          f"{board['domains_saved']} saved by ASHA ({summary['stopped_early']} trials stopped early)")
    print(f"best (val ACC {summary['best_val_acc']:.4f}): {json.dumps(summary['best_config'])}")
    print(f"test ACC: default {default_run['acc']:.4f} (BWT {default_run['bwt']:.4f}), best {best_run['acc']:.4f} "
          f"(BWT {best_run['bwt']:.4f}); best beats default: {summary['best_beats_default']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "leaderboard": board}, indent=1))
    print(f"wrote {out}")
    if not summary["best_beats_default"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
