"""Benchmark: ``lifelong run`` against a plain single-process PyTorch loop doing the same work, side by side.

Workloads (each with its plain script beside this file):

- ``split_finetune`` / ``split_replay``: ``pipelines/split_mnist.yaml`` (Hsu et al. 2018 protocol, 5 class-IL
  domains, 4 epochs), finetune and replay with 1,100 samples; plain: ``plain_split_mnist.py``;
- ``permuted_T10`` / ``permuted_T20``: the ``bench_scaling.py`` pipeline (18,000 training rows per domain, 2 epochs,
  T^2 + T evaluations on val); plain: ``plain_permuted_mnist.py``.

Each repeat runs, for every workload in turn: the plain script; ``lifelong run`` cold (the run starts and stops its
own local Ray: the dry run); and warm (``--address`` on a Ray cluster started with ``ray start --head`` just before,
after one untimed run on it, and stopped by its process ids just after: an idle cluster beside the other runs would
slow them). Wall times are process wall, from spawn to exit, data loading included.

Reported, per workload and session: the median wall time and the median of the per-repeat ratios to the plain loop,
ACC beside the plain loop's; the hot loop (an epoch's samples/s against the plain loop's epochs, same model, batch
size and 2 threads): cached epochs while the next stage's data streams in (epoch 2 of every stage but the last) and
cached epochs with nothing streaming (the last stage's later epochs); and the cold run's fixed costs, item by item,
from the report's ``timeline``. An in-process check of the training loop alone (``fit_task`` on cached batches
against the plain loop, alternating epochs in one process) comes first.

Prints tables and writes ``tests/benchmarks/results/pipeline.json``. Not a test; run it with nothing else on the
machine:

    .venv/bin/python tests/benchmarks/bench_pipeline.py [--repeats N] [--data-root DIR] [--only W ...] [--before REV]

``--before REV`` adds cold runs of ``split_finetune`` and ``permuted_T10`` with an earlier revision's code,
alternating with this checkout's, and reports what both can tell (process wall, training loops, stage overheads,
time outside the stages).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scaling import pipeline as permuted_pipeline  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from ray_nodes import processes_under, stop_processes  # noqa: E402

# Avalanche 0.6.0 (Naive) on the Permuted-MNIST T = 10 workload, alternating with the plain loop on this 2-core
# machine class (issue 11): 1.80-1.99x the plain loop.
AVALANCHE_PERMUTED_T10 = (1.80, 1.99)
WORKLOADS = ("split_finetune", "split_replay", "permuted_T10", "permuted_T20")


def workload_args(name: str, work: Path) -> tuple[list[str], list[str]]:
    """``(lifelong run arguments, plain script command)`` of a workload."""
    if name.startswith("split"):
        strategy = name.removeprefix("split_")
        sets = ["--set", "strategy.name=replay", "--set", "strategy.buffer_size=1100"] if strategy == "replay" else []
        return [str(REPO / "pipelines/split_mnist.yaml"), *sets], [str(HERE / "plain_split_mnist.py"), strategy]
    T = int(name.removeprefix("permuted_T"))
    spec = work / f"permuted-{T}.yaml"
    spec.write_text(yaml.safe_dump(permuted_pipeline(T)))
    return [str(spec)], [str(HERE / "plain_permuted_mnist.py"), str(T)]


def timed(cmd: list[str], cwd: Path) -> tuple[dict[str, Any], float]:
    """Run ``cmd``, parse the JSON object it prints last, and return it with the process wall seconds; a
    ``timeline`` in it gains ``process_start`` (unix seconds, just before the spawn)."""
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "timeline" in result:
        result["timeline"]["process_start"] = t0
    return result, wall


def lifelong(args: list[str], work: Path, data_root: str, *extra: str,
             code: Path | None = None) -> tuple[dict[str, Any], float]:
    """One ``lifelong run --json`` in a fresh process; with ``code``, that checkout's ``orchestrator`` and
    ``strategies`` run instead of this one's (through ``PYTHONPATH``, which the Ray workers inherit)."""
    cmd = [str(REPO / ".venv/bin/python"), "-m", "orchestrator.cli", "run", *args, "--json", "--no-progress",
           "--workdir", str(work), "--data-root", data_root, *extra]
    if code is None:
        return timed(cmd, work)
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), time.time() - t0


def coarse_costs(report: dict[str, Any], wall: float) -> dict[str, float]:
    """What any version's report tells: process wall, the training loops, stage 0's overhead (its wall minus its
    training loop: worker start, first read) and everything outside the stages (imports, Ray's start and stop,
    validation, the last evaluation row, the report, the exit), in seconds."""
    stages = report["stages"]
    return {"process wall": wall, "training loops": sum(s["train_seconds"] for s in stages),
            "stage 0 overhead": stages[0]["overhead_seconds"],
            "stages 1.. overhead": sum(s["overhead_seconds"] for s in stages[1:]),
            "outside the stages": wall - sum(s["wall_seconds"] for s in stages)}


def before_and_after(rev: str, work: Path, data_root: str, repeats: int) -> dict[str, Any]:
    """Cold runs of ``split_finetune`` and ``permuted_T10`` with the code at git revision ``rev`` (a worktree under
    /tmp) and with this checkout, alternating; medians of :func:`coarse_costs`."""
    tree = Path(tempfile.gettempdir()) / f"lifelong-{rev[:12]}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    out: dict[str, Any] = {"revision": rev}
    # Each revision reads shards that it built itself (the shard format may differ between revisions).
    workdirs = {"before": work / "before", "after": work}
    workdirs["before"].mkdir(exist_ok=True)
    for name in ("split_finetune", "permuted_T10"):
        args = workload_args(name, work)[0]
        lifelong(args, workdirs["before"], data_root, "--set", "training.epochs=1", code=tree)  # untimed: shards
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for _ in range(repeats):
            for label, code in (("before", tree), ("after", REPO)):
                report, wall = lifelong(args, workdirs[label], data_root, code=code)
                runs[label].append(coarse_costs(report, wall))
        out[name] = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
        print(f"{name}: " + " | ".join(f"{label} " + ", ".join(f"{k} {v:.1f}" for k, v in out[name][label].items())
                                      for label in ("before", "after")), flush=True)
    return out


class RayCluster:
    """A local Ray cluster (``ray start --head``, 2 CPUs, no dashboard) in its own temp folder, stopped by the ids
    of the processes it started (never ``ray stop``, which stops every Ray process on the host)."""

    def __init__(self, work: Path) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        subprocess.run([str(REPO / ".venv/bin/ray"), "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                        "--disable-usage-stats", f"--temp-dir={self.temp}"], check=True, capture_output=True)

    def stop(self) -> None:
        """Stop this cluster's processes by their ids (``tests/ray_nodes.py``)."""
        stop_processes(processes_under([self.temp]))


def epoch_ratios(report: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """The hot loop: plain epoch seconds over ours (= our samples/s over the plain loop's, same rows per epoch),
    medians over (a) epoch 2 of every stage but the last (cached, the next stage streaming in) and (b) the last
    stage's epochs after the first (cached, nothing streaming)."""
    stages = report["stages"]
    epochs = len(stages[0]["epoch_seconds"])
    plain_epoch = statistics.median(plain["epoch_seconds"][e] for e in range(len(plain["epoch_seconds"]))
                                    if e % epochs > 0)  # the plain loop's epochs after each domain's first
    prefetching = [s["epoch_seconds"][1] for s in stages[:-1]]
    alone = stages[-1]["epoch_seconds"][1:]
    return {"while_prefetching": plain_epoch / statistics.median(prefetching),
            "cached_alone": plain_epoch / statistics.median(alone)}


def fixed_costs(report: dict[str, Any], wall: float) -> dict[str, float]:
    """The cold run's costs outside training, in seconds, from the report's ``timeline`` (unix seconds)."""
    t = report["timeline"]
    s0 = report["stages"][0]
    last = report["stages"][-1]["end"]
    return {"python start and imports": t["imports_done"] - t["process_start"],
            "spec, strategies, manifests": t["ray_init_start"] - t["imports_done"],
            "ray.init": t["ray_ready"] - t["ray_init_start"],
            "worker process start (beside validate)": t["workers_ready"] - t["workers_start"],
            "validate": t["validated"] - t["ray_ready"],
            "run folder, MLflow run, initial model": s0["start"] - t["validated"],
            "stage 0 to its first batch": t["first_batch"] - s0["start"],
            "stages (training and stage changes)": last - t["first_batch"],
            "last evaluation row, report": t["report_written"] - last,
            "ray.shutdown": t["shutdown_end"] - t["shutdown_start"],
            "process exit": wall - (t["shutdown_end"] - t["process_start"])}


def one_repeat(name: str, work: Path, data_root: str) -> dict[str, Any]:
    """Plain, cold and warm runs of one workload."""
    args, plain_cmd = workload_args(name, work)
    plain, plain_wall = timed([str(REPO / ".venv/bin/python"), *plain_cmd, data_root], REPO)
    row: dict[str, Any] = {"workload": name, "plain": {"wall_s": plain_wall, "acc": plain["acc"],
                                                       "epoch_s": plain["epoch_seconds"]}}
    for session in ("cold", "warm"):
        cluster = RayCluster(work) if session == "warm" else None
        extra = ["--address", "auto"] if cluster else []
        try:
            if cluster:  # one untimed run: a session that has run a pipeline before
                lifelong(args, work, data_root, *extra, "--set", "training.epochs=1")
            report, wall = lifelong(args, work, data_root, *extra)
        finally:
            if cluster:
                cluster.stop()
        row[session] = {"wall_s": wall, "ratio": wall / plain_wall, "acc": report["acc"],
                        "train_s": sum(s["train_seconds"] for s in report["stages"]),
                        "hot_loop": epoch_ratios(report, plain), "fixed_costs": fixed_costs(report, wall)}
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per workload and session."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]
        entry: dict[str, Any] = {"plain_wall_s": statistics.median(r["plain"]["wall_s"] for r in mine),
                                 "plain_acc": statistics.median(r["plain"]["acc"] for r in mine)}
        for session in ("cold", "warm"):
            runs = [r[session] for r in mine]
            entry[session] = {
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "ratio": statistics.median(r["ratio"] for r in runs),
                "acc": statistics.median(r["acc"] for r in runs),
                "hot_loop": {k: statistics.median(r["hot_loop"][k] for r in runs) for k in runs[0]["hot_loop"]},
                "fixed_costs": {k: statistics.median(r["fixed_costs"][k] for r in runs)
                                for k in runs[0]["fixed_costs"]}}
        out[name] = entry
    return out


HOT_LOOP = r'''
import json, statistics, sys, time, torch
from orchestrator.models import HeadLayout, MLP
from orchestrator.stage import EpochCache, fit_task
from strategies import Batch, StageContext, build_strategies
torch.set_num_threads(int(sys.argv[1]))
N, B = 18000, 128
x, y = torch.rand(N, 1, 28, 28), torch.randint(0, 10, (N,))
data = Batch(x, y, torch.zeros(N, dtype=torch.long))
layout = HeadLayout.build("domain_il", [list(range(10))])
def ours(model, optimizer):
    cache = EpochCache(lambda: iter([data.select(slice(i, i + B)) for i in range(0, N, B)]), 2**31, B, True, 0)
    cache.cached = data  # an epoch over cached data
    ctx = StageContext(model=model, train_model=model, optimizer=optimizer, task_id=0, num_tasks=1,
                       head_mask=layout.head_mask(), iter_task_batches=cache)
    return fit_task(ctx, build_strategies([("finetune", {})]), 1)["epoch_seconds"][0]
def plain(model, optimizer):
    t0 = time.perf_counter()
    order = torch.randperm(N)
    for i in range(0, N, B):
        idx = order[i:i + B]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    return time.perf_counter() - t0
torch.manual_seed(0)
m1, m2 = MLP(784, [400, 400], 10), MLP(784, [400, 400], 10)
o1, o2 = torch.optim.Adam(m1.parameters(), 1e-3), torch.optim.Adam(m2.parameters(), 1e-3)
plain(m1, o1); ours(m2, o2)
pairs = [(plain(m1, o1), ours(m2, o2)) for _ in range(int(sys.argv[2]))]
print(json.dumps({"plain_epoch_s": [p for p, _ in pairs], "ours_epoch_s": [o for _, o in pairs],
                  "ratio": statistics.median(p / o for p, o in pairs)}))
'''


def print_summary(summary: dict[str, Any]) -> None:
    """The tables of the module docstring."""
    print(f"\n{'workload':15s} {'plain s':>8s} {'ACC':>6s} | {'cold s':>7s} {'x':>5s} {'ACC':>6s} | "
          f"{'warm s':>7s} {'x':>5s} {'ACC':>6s} | hot loop cold: prefetching / alone")
    for name, e in summary.items():
        c, w = e["cold"], e["warm"]
        print(f"{name:15s} {e['plain_wall_s']:8.1f} {e['plain_acc']:6.3f} | {c['wall_s']:7.1f} {c['ratio']:5.2f} "
              f"{c['acc']:6.3f} | {w['wall_s']:7.1f} {w['ratio']:5.2f} {w['acc']:6.3f} | "
              f"{c['hot_loop']['while_prefetching']:.2f} / {c['hot_loop']['cached_alone']:.2f}")
    print(f"(Avalanche 0.6.0 on permuted_T10: {AVALANCHE_PERMUTED_T10[0]:.2f}-{AVALANCHE_PERMUTED_T10[1]:.2f}x)")
    for name, e in summary.items():
        print(f"\nfixed costs, cold {name} (median s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in e["cold"]["fixed_costs"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also compare cold runs with the code at this git revision (e.g. 9ba694b)")
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results/pipeline.json"))
    args = parser.parse_args()
    # First, with nothing else running: the training loop alone, in one process.
    hot = json.loads(subprocess.run([str(REPO / ".venv/bin/python"), "-c", HOT_LOOP, "2", "7"], capture_output=True,
                                    text=True, check=True, cwd=REPO).stdout)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.only:  # untimed: builds each workload's shards once and warms the file cache
            lifelong(workload_args(name, work)[0], work, args.data_root, "--set", "training.epochs=1")
        for rep in range(args.repeats):
            for name in args.only:
                rows.append({"repeat": rep, **one_repeat(name, work, args.data_root)})
                r = rows[-1]
                head = f"{rep} {name:15s} plain {r['plain']['wall_s']:5.1f}s ACC {r['plain']['acc']:.3f} | "
                print(head + " | ".join(
                    f"{s} {r[s]['wall_s']:5.1f}s x{r[s]['ratio']:.2f} ACC {r[s]['acc']:.3f} hot "
                    f"{r[s]['hot_loop']['while_prefetching']:.2f}/{r[s]['hot_loop']['cached_alone']:.2f}"
                    for s in ("cold", "warm")), flush=True)
        summary = summarise(rows)
        print_summary(summary)
        print(f"\ntraining loop alone, in one process (2 threads, cached epochs of 18,000 rows): fit_task at "
              f"{hot['ratio']:.2f}x the plain loop's samples/s (median of {len(hot['plain_epoch_s'])} alternating "
              f"pairs)")
        results = {"rows": rows, "summary": summary, "hot_loop_in_process": hot, "before_and_after": None,
                   "machine": {"cpus": os.cpu_count()}}
        write_results(Path(args.out), results)  # written now: the comparison below may fail on an old revision
        if args.before:
            results["before_and_after"] = before_and_after(args.before, work, args.data_root, args.repeats)
            write_results(Path(args.out), results)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write the benchmark's JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
