"""The run report: the accuracy matrix and CL metrics as a terminal table, a JSON file and a PNG heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print the accuracy matrix R (rows: after stage i; columns: domain j), the metrics and per-stage timings."""
    names = report["domains"]
    if report["R"]:
        _print_matrix(report, console)
    else:
        console.print(f"evaluation disabled: no accuracy matrix (wall {report['wall_seconds']:.1f} s, MLflow run "
                      f"{report['mlflow_run_id']})")
    stages = Table(title="Stages")
    for col in ("stage", "domain", "wall s", "train s", "overhead s", "samples/s", "final loss"):
        stages.add_column(col, justify="right")
    for s in report["stages"]:
        stages.add_row(str(s["stage"]), names[s["stage"]], f"{s['wall_seconds']:.1f}", f"{s['train_seconds']:.1f}",
                       f"{s['overhead_seconds']:.1f}", f"{s['samples_per_second']:.0f}", f"{s['epoch_loss'][-1]:.4f}")
    console.print(stages)


def _print_matrix(report: dict[str, Any], console: Console) -> None:
    names = report["domains"]
    table = Table(title=f"Accuracy matrix R[i][j] ({report['pipeline']}, strategy {report['strategy']})")
    table.add_column("after stage")
    for n in names:
        table.add_column(n, justify="right")
    table.add_row("init (b)", *[f"{v:.3f}" for v in report["b"]], style="dim")
    for i, row in enumerate(report["R"]):
        table.add_row(f"{i}: {names[i]}", *[f"{v:.3f}" for v in row])
    console.print(table)
    summary = Table(title="Summary")
    for col in ("ACC", "BWT", "FWT", "forgetting", "wall s", "MLflow run"):
        summary.add_column(col, justify="right")
    summary.add_row(f"{report['acc']:.4f}", f"{report['bwt']:+.4f}", f"{report['fwt']:+.4f}",
                    f"{report['avg_forgetting']:.4f}", f"{report['wall_seconds']:.1f}", report["mlflow_run_id"])
    console.print(summary)


def save_heatmap(report: dict[str, Any], path: Path) -> Path:
    """Save R as a PNG heatmap (rows: after stage i, columns: domain j, values in [0, 1]) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["domains"]
    t = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * t + 2.5, 1.0 * t + 1.8))
    im = ax.imshow(report["R"], vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(t):
            v = report["R"][i][j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated on domain j")
    ax.set_title(f"{report['pipeline']} / {report['strategy']}: ACC {report['acc']:.3f}, BWT {report['bwt']:+.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(report: dict[str, Any], path: Path) -> Path:
    """Write the report as indented JSON and return the path."""
    path.write_text(json.dumps(report, indent=1))
    return path
