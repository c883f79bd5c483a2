"""What the benchmarks that drive ``lifelong run`` share: one run of a pipeline through the CLI, its report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_pipeline(pipeline: Path, workdir: Path, data_root: str | None, overrides: list[str]) -> dict[str, Any]:
    """``lifelong run PIPELINE --json`` with ``--set`` ``overrides`` under ``workdir``; the run's report.json.

    Raises:
        SystemExit: if the run fails (with the end of its stderr).
    """
    args = [str(REPO / ".venv/bin/lifelong"), "run", str(pipeline), "--json", "--no-progress", "--workdir",
            str(workdir), *(["--data-root", data_root] if data_root else [])]
    for o in overrides:
        args += ["--set", o]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"lifelong run failed: {out.stderr[-2000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return json.loads((Path(summary["run_dir"]) / "report.json").read_text())
