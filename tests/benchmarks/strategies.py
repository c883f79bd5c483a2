"""Benchmark: every strategy on the Hsu et al. 2018 protocol, against the published numbers.

Scenarios: Split-MNIST task-IL, class-IL and domain-IL (5 x 2 digits; the three rows of Hsu et al.'s Table 2),
Split-Fashion-MNIST class-IL and Permuted-MNIST domain-IL (10 permutations). Protocol (Hsu et al. 2018): MLP
784-400-400, 4 epochs, batch 128, Adam lr 1e-3, except where a method's paper requires otherwise (SPG, HAT and
NCL: SGD, see ``OPTIMIZER``). Memory-based methods run at budgets of 1100 and 4400 samples.

The runs use the stage loop (``orchestrator.stage.fit_task``) and the strategy code that Ray Train workers run, on
in-memory tensors built by the shard builder's own functions (train minus the carved-out val split; test split for
R), so a table of many runs fits on a 2-core machine; the distributed path is covered by the tests.

Writes ``tests/benchmarks/results/strategies[-TAG].json`` (one row per run: ACC, BWT, FWT, forgetting, seconds
and milliseconds per optimizer step) and ``strategies.md`` (mean ± std over seeds beside the reference and the gap
to it; and, from the ``--cost`` pass run alone on the machine, each strategy's per-step time relative to finetune,
end-of-task work included), the tables built from every ``strategies*.json`` in the folder.
Runs already in those files are skipped, so a long table can be built by several processes (``--tag``) and resumed
after an interruption. Strengths that Hsu et al.'s scripts do not give were chosen on the val split with
``lifelong tune`` (``pipelines/tune_<strategy>_permuted_mnist.yaml``), never on the test split the table reports;
each search's leaderboard is kept as ``results/select-<pipeline>.json`` and summed up in ``strategies.md``. Not a
test:

    .venv/bin/python tests/benchmarks/strategies.py [--scenarios split_mnist_class ...] [--strategies ewc ...]
                                                    [--seeds 0 1 2] [--data-root DIR] [--tag A] [--threads 1]
    .venv/bin/python tests/benchmarks/strategies.py --cost --threads 1    # per-step cost, nothing else running
    .venv/bin/lifelong tune pipelines/tune_si_permuted_mnist.yaml --export si-best.yaml   # a strength, on val
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Run as a file, this script's folder comes first on sys.path and its name would shadow the `strategies` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.metrics import cl_metrics  # noqa: E402
from orchestrator.models import HeadLayout, build_model, masked_logits  # noqa: E402
from orchestrator.shards import load_raw, make_domain_splits  # noqa: E402
from orchestrator.spec import ModelSpec, SourceSpec  # noqa: E402
from orchestrator.stage import fit_task  # noqa: E402
from strategies import Batch, StageContext, build_strategies, train_domains_of  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {
    "split_mnist_task": ("mnist", "split", "task_il", 5),
    "split_mnist_class": ("mnist", "split", "class_il", 5),
    "split_mnist_domain": ("mnist", "split", "domain_il", 5),
    "split_fashion_class": ("fashion-mnist", "split", "class_il", 5),
    "permuted_mnist_domain": ("mnist", "permuted", "domain_il", 10),
}
# Hsu et al. 2018, Table 2 (Split-MNIST); rehearsal "a / b" = the two naive-rehearsal variants; finetune = "Adam".
REFERENCE = {
    "split_mnist_class": {"ewc": 19.80, "ewc_online": 19.77, "si": 19.67, "mas": 19.52, "lwf": 24.17, "gem": 92.20,
                          "replay": "90.78 / 95.59", "joint": 97.53, "finetune": 19.71},
    "split_mnist_task": {"ewc": 97.70, "ewc_online": 98.04, "si": 98.56, "mas": 99.22, "lwf": 99.60, "gem": 98.42,
                         "replay": "99.40 / 99.57", "joint": 99.52, "finetune": 93.46},
    "split_mnist_domain": {"ewc": 58.85, "ewc_online": 57.33, "si": 64.76, "mas": 68.57, "lwf": 71.02, "gem": 96.16,
                           "replay": "95.16 / 97.11", "joint": 98.59, "finetune": 55.16},
    "split_fashion_class": {},
    "permuted_mnist_domain": {},
}
MEMORY = {"replay", "derpp", "agem", "gem"}
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "finetune": ("finetune", {}), "joint": ("joint", {}), "replay": ("replay", {}), "ewc": ("ewc", {}),
    "ewc_online": ("ewc", {"mode": "online"}), "si": ("si", {}), "mas": ("mas", {}),
    "lwf": ("lwf", {"weighting": "tasks"}),
    "derpp": ("derpp", {}), "agem": ("agem", {}), "gem": ("gem", {}), "spg": ("spg", {}), "das": ("das", {}),
    "hat": ("hat", {}), "packnet": ("packnet", {}), "ncl": ("ncl", {}),
}
# Penalty strengths of Hsu et al.'s scripts (scripts/split_MNIST_incremental_{task,class,domain}.sh), carried over to
# our penalty forms: SI has the same form (c * sum Omega (theta - theta*)^2), so c is theirs; our EWC penalty has a
# 1/2 in front, so lambda is twice theirs; our MAS importance sums the squared outputs over the K units of a sample's
# head where theirs averages them, so lambda is theirs / K (task-IL K = 2, class-IL K = 10, domain-IL K = 2).
# Permuted-MNIST (domain-IL, same head width) takes the Split-MNIST domain-IL values for EWC and online EWC. Its 10
# domains, where Hsu et al.'s scripts tuned for 5, over-regularise SI and MAS at those values (new domains stop being
# learnt), so SI's, MAS's, LwF's and NCL's were chosen on the val split by ``lifelong tune`` (``SELECTIONS``).
_DOMAIN_IL = {"ewc": {"ewc_lambda": 200.0}, "ewc_online": {"ewc_lambda": 1400.0}, "si": {"si_lambda": 3000.0},
              "mas": {"mas_lambda": 5000.0}}
SCENARIO_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "split_mnist_task": {"ewc": {"ewc_lambda": 200.0}, "ewc_online": {"ewc_lambda": 800.0},
                         "si": {"si_lambda": 300.0}, "mas": {"mas_lambda": 0.5}},
    "split_mnist_class": {"ewc": {"ewc_lambda": 1200.0}, "ewc_online": {"ewc_lambda": 200.0},
                          "si": {"si_lambda": 600.0}, "mas": {"mas_lambda": 0.1}},
    "split_mnist_domain": _DOMAIN_IL,
    "split_fashion_class": {"ewc": {"ewc_lambda": 1200.0}, "ewc_online": {"ewc_lambda": 200.0},
                            "si": {"si_lambda": 600.0}, "mas": {"mas_lambda": 0.1}},
    "permuted_mnist_domain": {**_DOMAIN_IL, "si": {"si_lambda": 1.0}, "mas": {"mas_lambda": 0.005},
                              "lwf": {"weighting": "fixed", "alpha": 0.0},  # no distillation won on val
                              "ncl": {"strength": 1530.0, "damping": 0.0012}},
}
OPTIMIZER = {"spg": ("sgd", 0.05), "hat": ("sgd", 0.05), "ncl": ("sgd", 0.05)}
# The searches that chose SCENARIO_PARAMS's values (rounded there): pipeline stem, under pipelines/; each one's
# leaderboard is copied to results/select-<stem>.json.
SELECTIONS: dict[str, dict[str, str]] = {
    "permuted_mnist_domain": {"si": "tune_si_permuted_mnist", "mas": "tune_mas_permuted_mnist",
                              "lwf": "tune_lwf_permuted_mnist", "ncl": "tune_ncl_permuted_mnist"},
}


def strategy_params(scenario_key: str, key: str) -> dict[str, Any]:
    """The parameters a strategy runs with in a scenario (budget excluded)."""
    name, params = STRATEGIES[key]
    return {**params, **SCENARIO_PARAMS.get(scenario_key, {}).get(key, {})}
TASK_IL_ONLY = {"hat", "packnet"}


def build_domains(dataset: str, kind: str, n: int, data_root: Path) -> list[dict[str, Any]]:
    """The scenario's domains as raw splits, via the shard builder's functions (same val carving as shards)."""
    source_kind = "mnist" if dataset == "mnist" else "fashion_mnist"
    raw = load_raw(SourceSpec(kind=source_kind, path=dataset), data_root)
    out = []
    for k in range(n):
        spec = (SourceSpec(kind=source_kind, path=dataset, classes=[2 * k, 2 * k + 1]) if kind == "split"
                else SourceSpec(kind=source_kind, path=dataset, permutation_seed=k))
        out.append(make_domain_splits(raw, spec, f"{dataset}-{kind}-{k}"))
    return out


def tensors(split: Any, k: int, targets: torch.Tensor) -> Batch:
    """A raw split of domain k as a Batch of floats in [0, 1] with mapped targets."""
    x = torch.from_numpy(split.x.astype(np.float32)) / 255.0
    t = torch.full((len(split.y),), k, dtype=torch.long)
    return Batch(x.view(-1, 1, 28, 28), targets[t, torch.from_numpy(split.y)], t)


def run_one(domains: list[dict[str, Any]], scenario: str, key: str, budget: int | None, seed: int,
            base_params: dict[str, Any]) -> dict[str, Any]:
    """Train one strategy over the stream and return its metrics and timings."""
    torch.manual_seed(seed)
    name = STRATEGIES[key][0]
    params = {**base_params, **({"buffer_size": budget} if budget else {})}
    layout = HeadLayout.build(scenario, [sorted(set(d["train"].y.tolist())) for d in domains])
    targets, mask = layout.target_table(), layout.head_mask()
    train = [tensors(d["train"], k, targets) for k, d in enumerate(domains)]
    test = [tensors(d["test"], k, targets) for k, d in enumerate(domains)]
    model = build_model(ModelSpec(hidden=[400, 400]), (1, 28, 28), layout.num_outputs)
    strategies = build_strategies([(name, params)])
    opt_name, lr = OPTIMIZER.get(key, ("adam", 1e-3))

    def evaluate() -> list[float]:
        row = []
        with torch.no_grad():
            for j, b in enumerate(test):
                m = model
                for s in strategies:
                    m = s.inference_model(m, j)
                row.append(float((masked_logits(m(b.x), b.t, mask).argmax(1) == b.y).float().mean()))
        return row

    base = evaluate()
    R, seconds, steps = [], 0.0, 0
    for k in range(len(domains)):
        parts = [train[j] for j in train_domains_of(strategies, k)]
        data = Batch(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), torch.cat([p.t for p in parts]))
        g = torch.Generator().manual_seed(seed * 100 + k)

        def batches(data: Batch = data, g: torch.Generator = g) -> Any:
            order = torch.randperm(len(data), generator=g)
            for i in range(0, len(order), 128):
                idx = order[i:i + 128]
                yield data.select(idx)

        opt = (torch.optim.SGD(model.parameters(), lr=lr) if opt_name == "sgd"
               else torch.optim.Adam(model.parameters(), lr=lr))
        ctx = StageContext(model=model, train_model=model, optimizer=opt, task_id=k, num_tasks=len(domains),
                           head_mask=mask, seed=seed, iter_task_batches=batches,
                           steps_per_epoch=-(-len(data) // 128), rows_per_epoch=len(data),
                           domain_units=layout.domain_units(), target_table=targets)
        stats = fit_task(ctx, strategies, epochs=4)
        seconds += stats["train_seconds"]
        steps += ctx.step
        model.eval()
        R.append(evaluate())
        model.train()
    m = cl_metrics(R, base)
    return {"scenario": scenario, "strategy": key, "budget": budget, "seed": seed, "params": base_params,
            "acc": m["acc"], "bwt": m["bwt"],
            "fwt": m["fwt"], "forgetting": m["avg_forgetting"], "R": R, "train_seconds": seconds,
            "ms_per_step": 1000 * seconds / max(steps, 1)}


def load_rows(out: Path) -> list[dict[str, Any]]:
    """Every run recorded in ``out/strategies*.json`` (all tags)."""
    rows: list[dict[str, Any]] = []
    for f in sorted(out.glob("strategies*.json")):
        rows += json.loads(f.read_text())
    for r in rows:  # runs recorded before parameters were stored used the strategy's base parameters
        r.setdefault("params", STRATEGIES[r["strategy"]][1])
    return rows


def run_key(row: dict[str, Any]) -> tuple[str, str, str, int | None, int, str]:
    """What identifies a run: purpose (accuracy table or cost pass), scenario, strategy, budget, seed and the
    strategy's parameters (a run with other parameters is not reused)."""
    return (row.get("purpose", "accuracy"), row["scenario"], row["strategy"], row["budget"], row["seed"],
            json.dumps(row.get("params", {}), sort_keys=True))


def is_current(row: dict[str, Any]) -> bool:
    """Whether a recorded run used the parameters the benchmark now prescribes for its scenario."""
    return row.get("params", {}) == strategy_params(row["scenario"], row["strategy"])


def reference_gap(ref: Any, acc: float) -> str:
    """``acc - reference`` in points; for the two rehearsal variants ("a / b") the gap to both."""
    if isinstance(ref, (int, float)):
        return f"{acc - ref:+.2f}"
    if isinstance(ref, str) and "/" in ref:
        return " / ".join(f"{acc - float(v):+.2f}" for v in ref.split("/"))
    return "–"


def markdown(rows: list[dict[str, Any]], out: Path) -> str:
    """Up to three tables: mean ± std of ACC (%) per scenario, strategy and budget beside the reference and the gap
    to it; from the cost pass, each strategy's milliseconds per optimizer step relative to finetune; and from the
    ``lifelong tune`` leaderboards of ``SELECTIONS`` (``out/select-<pipeline>.json``), each search's best config
    and the compute ASHA saved."""
    lines = ["| scenario | strategy | budget | ACC % (mean ± std) | seeds | reference (Hsu et al. 2018) | Δ points |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    rows = [r for r in rows if is_current(r)]
    for r in rows:
        if r.get("purpose", "accuracy") == "accuracy":
            groups.setdefault((r["scenario"], r["strategy"], r["budget"]), []).append(r)
    for (scenario, strategy, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        accs = [100 * r["acc"] for r in rs]
        mean, std = statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        ref = REFERENCE.get(scenario, {}).get(strategy, "–")
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rs[0]["params"].items())
        label = f"{strategy} ({shown})" if shown else strategy
        lines.append(f"| {scenario} | {label} | {budget or '–'} | {mean:.2f} ± {std:.2f} | {len(rs)} | {ref} | "
                     f"{reference_gap(ref, mean)} |")
    cost = [r for r in rows if r.get("purpose") == "cost"]
    if cost:
        base = statistics.mean(r["ms_per_step"] for r in cost if r["strategy"] == "finetune" and
                               r["scenario"] == "split_mnist_class") if any(r["strategy"] == "finetune"
                                                                            for r in cost) else None
        lines += ["", "| cost pass (seed 0, alone on the machine) | budget | ms/step | × finetune | train s |",
                  "|---|---|---|---|---|"]
        for r in sorted(cost, key=lambda r: (r["strategy"], r["budget"] or 0)):
            rel = f"{r['ms_per_step'] / base:.2f}" if base else "–"
            lines.append(f"| {r['strategy']} ({r['scenario']}) | {r['budget'] or '–'} | {r['ms_per_step']:.1f} | "
                         f"{rel} | {r['train_seconds']:.1f} |")
    boards = [(scenario, key, stem, out / f"select-{stem}.json") for scenario, chosen in SELECTIONS.items()
              for key, stem in chosen.items()]
    boards = [b for b in boards if b[3].exists()]
    if boards:
        lines += ["", "| chosen on val by `lifelong tune` | pipeline (pipelines/*.yaml) | trials finished / "
                  "stopped | trial-domains run / saved | best config | best val ACC % |", "|---|---|---|---|---|---|"]
        for scenario, key, stem, f in boards:
            board = json.loads(f.read_text())
            status = [r["status"] for r in board["rows"]]
            best = ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                             for k, v in board["best"]["config"].items())
            lines.append(f"| {key} ({scenario}) | {stem} | {status.count('finished')} / "
                         f"{status.count('stopped early')} | {board['domains_run']} / {board['domains_saved']} | "
                         f"{best} | {100 * board['best']['val_acc']:.2f} |")
    return "\n".join(lines) + "\n"


def planned_runs(args: argparse.Namespace, scenario_key: str
                 ) -> list[tuple[str, int | None, int, dict[str, Any]]]:
    """The runs one invocation asks for in a scenario: (strategy, budget, seed, params). The cost pass is seed 0 of
    each strategy; otherwise every seed with the prescribed parameters."""
    scenario = SCENARIOS[scenario_key][2]
    runs = []
    for key in args.strategies:
        if (key in TASK_IL_ONLY) != (scenario == "task_il") and (args.cost or key in TASK_IL_ONLY):
            continue  # hat/packnet are task-IL only; the cost pass times the others in class-IL
        params = strategy_params(scenario_key, key)
        for budget in ((1100, 4400) if key in MEMORY else (None,)):
            runs += [(key, budget, seed, params) for seed in ([0] if args.cost else args.seeds)]
    return runs


def main() -> None:
    """Run what the command line asks for (table runs or ``--cost``), skipping runs already recorded,
    and rewrite this process's JSON and ``strategies.md`` after every run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(REPO / "tests/benchmarks/results"))
    parser.add_argument("--tag", default="", help="suffix of this process's JSON file, for parallel processes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--cost", action="store_true",
                        help="cost pass: seed 0 of Split-MNIST class-IL (task-IL for hat/packnet), for the per-step "
                             "time relative to finetune; run it with nothing else on the machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    purpose = "cost" if args.cost else "accuracy"
    tag = "cost" if args.cost else args.tag
    mine = out / f"strategies{'-' + tag if tag else ''}.json"
    rows: list[dict[str, Any]] = json.loads(mine.read_text()) if mine.exists() else []
    done = {run_key(r) for r in load_rows(out)}
    scenarios = ["split_mnist_class", "split_mnist_task"] if args.cost else args.scenarios
    for scenario_key in scenarios:
        runs = [(key, budget, seed, params) for key, budget, seed, params in planned_runs(args, scenario_key)
                if run_key({"purpose": purpose, "scenario": scenario_key, "strategy": key, "budget": budget,
                            "seed": seed, "params": params}) not in done]
        if not runs:
            continue
        dataset, kind, scenario, n = SCENARIOS[scenario_key]
        domains = build_domains(dataset, kind, n, Path(args.data_root))
        for key, budget, seed, params in runs:
            t0 = time.time()
            row = run_one(domains, scenario, key, budget, seed, params)
            row.update(scenario=scenario_key, purpose=purpose)
            rows.append(row)
            print(f"{purpose:8s} {scenario_key:22s} {key:10s} budget={budget or '-':>5} seed={seed} "
                  f"ACC {100 * row['acc']:6.2f}  {row['ms_per_step']:.1f} ms/step  ({time.time() - t0:.0f}s)  "
                  f"{json.dumps(params)}", flush=True)
            mine.write_text(json.dumps(rows, indent=1))
            (out / "strategies.md").write_text(markdown(load_rows(out), out))
    print(markdown(load_rows(out), out))


if __name__ == "__main__":
    main()
