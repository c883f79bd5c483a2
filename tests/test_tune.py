"""`lifelong tune`: bad search spaces refused before any trial, a real search with ASHA on local Ray, the exported
best config runnable, no read of a test split, and an interrupted search resumed without redoing finished trials."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from orchestrator.engine import RunStopped
from orchestrator.metrics import SeenSoFar, seen_metrics
from orchestrator.shards import digest
from orchestrator.spec import TuneSpec, validate_raw
from orchestrator.tuning import TuneReporter, check_space, objective

REPO = Path(__file__).resolve().parents[1]


def spec(**tune: Any) -> dict[str, Any]:
    """Two class-IL domains of Split-MNIST (3,000 rows per raw split), a small MLP, replay, one epoch; a search
    over ``strategy.ratio`` and a learning rate that cannot learn in one epoch (ASHA's first rung sees it)."""
    source = {"kind": "mnist", "path": "mnist", "max_rows": 3000}
    return {
        "name": "tune-split", "seed": 0, "scenario": "class_il",
        "domains": [{"name": "digits-0-1", "source": {**source, "classes": [0, 1]}},
                    {"name": "digits-2-3", "source": {**source, "classes": [2, 3]}}],
        "model": {"name": "mlp", "hidden": [100]},
        "strategy": {"name": "replay", "buffer_size": 200},
        "training": {"epochs": 1, "batch_size": 64},
        "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25},
        "tune": {"space": {"strategy.ratio": {"uniform": [0.1, 0.9]},
                           "training.optimizer.lr": {"grid": [0.001, 1e-7]}},
                 "num_samples": 2, "asha": {"grace_period": 1}, **tune},
    }


def lifelong(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Refused before any trial: one line naming the key, exit 2, nothing written


@pytest.mark.parametrize("space, culprit", [
    ({"strategy.ratioo": {"uniform": [0.1, 0.9]}}, "tune.space.strategy.ratioo"),
    ({"strategy.ratio": {"choice": []}}, "tune.space.strategy.ratio: choice is empty"),
    ({"training.optimizer.lr": {"loguniform": [0, 0.1]}}, "tune.space.training.optimizer.lr: loguniform needs "
                                                          "bounds > 0"),
    ({"strategy.ratio": {"uniform": [0.5, 1.5]}}, "tune.space.strategy.ratio: value 1.5"),
    ({"domains.5.uri": {"choice": ["x"]}}, "tune.space.domains.5.uri"),
])
def test_bad_space_is_refused_naming_the_key(tmp_path: Path, space: dict[str, Any], culprit: str) -> None:
    raw = spec()
    raw["tune"]["space"] = space
    proc = lifelong("tune", str(write(tmp_path / "p.yaml", raw)), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], proc.stderr
    assert not (tmp_path / "w").exists(), "something was written before the search started"


def test_metric_needing_a_missing_val_split_is_refused(tmp_path: Path) -> None:
    raw = spec()
    raw["domains"][1]["source"]["val_fraction"] = 0.0
    proc = lifelong("tune", str(write(tmp_path / "p.yaml", raw)), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tune.metric" in errors[0] and "domains.1 (digits-2-3)" in errors[0], proc.stderr
    assert not (tmp_path / "w").exists()


def test_malformed_yaml_is_refused_like_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: p\ndomains:\n  - {name: a\n")
    proc = lifelong("tune", str(bad), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.yaml" in errors[0] and "malformed YAML: line" in errors[0], proc.stderr
    assert not (tmp_path / "w").exists()


def test_space_values_are_checked_at_their_bounds() -> None:
    raw = spec()
    raw["tune"]["space"] = {"strategy.buffer_size": {"randint": [0, 5]}}  # 0 is below ge=1
    with pytest.raises(Exception, match=r"tune.space.strategy.buffer_size: value 0: strategy.0: buffer_size"):
        check_space(validate_raw(raw, "p.yaml"), "p.yaml")
    raw["tune"]["space"] = {"strategy.buffer_size": {"randint": [1, 5]}}
    check_space(validate_raw(raw, "p.yaml"), "p.yaml")


# ---------------------------------------------------------------------------------------------------------------
# The reporter, without Ray


def test_reporter_reports_seen_so_far_in_order_and_turns_a_stop_into_run_stopped() -> None:
    from types import SimpleNamespace

    from orchestrator.engine import Cell

    tune = TuneSpec.model_validate({"space": {"a": {"choice": [1]}}, "metric": "acc_minus_forgetting",
                                    "forgetting_weight": 0.5})
    reports: list[dict[str, float]] = []
    reporter = TuneReporter(tune, reports.append)
    reporter.run_started(SimpleNamespace(plan=SimpleNamespace(num_stages=3), flush=lambda: None))  # type: ignore
    R = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]]

    def row(i: int) -> list[Cell]:
        return [Cell(i, j, R[i][j], 10, 0.0, 0.0) for j in range(3)]

    reporter.row_evaluated(-1, row(0))  # the initial model: no report
    reporter.row_evaluated(1, row(1))  # arrives before row 0: held back
    assert reports == []
    reporter.row_evaluated(0, row(0))
    assert [r["domains"] for r in reports] == [1, 2]
    m = seen_metrics(R[:2])
    assert reports[1]["val_acc"] == pytest.approx((0.6 + 0.8) / 2) == pytest.approx(m["acc"])
    assert reports[1]["objective"] == pytest.approx(m["acc"] - 0.5 * m["forgetting"]) == objective(m, tune)
    reporter.row_evaluated(2, row(2))  # the last domain is kept for the trial to report once the run is written
    assert len(reports) == 2 and reporter.final is not None and reporter.final["domains"] == 3

    def stop(_: dict[str, float]) -> None:
        raise SystemExit(0)  # what ray.tune.report does in a trial its scheduler has stopped

    stopped = TuneReporter(tune, stop)
    stopped.run_started(SimpleNamespace(plan=SimpleNamespace(num_stages=3), flush=lambda: None))  # type: ignore
    with pytest.raises(RunStopped, match="after 1 domain"):
        stopped.row_evaluated(0, row(0))


def test_seen_so_far_waits_for_missing_rows() -> None:
    seen = SeenSoFar()
    assert seen.add(2, [0.1, 0.2, 0.3]) == []
    assert seen.add(0, [1.0, 0.0, 0.0])[0][0] == 0
    assert [k for k, _ in seen.add(1, [0.5, 0.5, 0.0])] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Real searches on local Ray


def run_search(tmp_path: Path, workdir: Path, *extra: str, name: str = "p.yaml",
               raw: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               out: list[str] | None = None) -> dict[str, Any]:
    """Run ``lifelong tune --json`` and return its leaderboard; ``out`` receives its stdout and stderr."""
    proc = lifelong("tune", str(write(tmp_path / name, raw or spec())), "--workdir", str(workdir), "--json",
                    *extra, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if out is not None:
        out.append(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_search_stops_a_trial_early_and_exports_a_runnable_best(tmp_path: Path, data_root: Path) -> None:
    # S3 credentials in the spec and in a --set (unused: the data is local); they must reach no file of the search.
    secret, token = f"s3cr3t-{uuid.uuid4().hex}", f"t0ken-{uuid.uuid4().hex}"
    raw = spec()
    raw["storage"] = {"s3": {"access_key_id": "AKIATESTING", "secret_access_key": secret}}
    output: list[str] = []
    board = run_search(tmp_path, tmp_path / "w", "--data-root", str(data_root), "--export",
                       str(tmp_path / "best.yaml"), "--set", f"storage.s3.session_token={token}", raw=raw, out=output)
    rows = board["rows"]
    assert len(rows) == 4
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["domains"] == 1 for r in stopped)
    assert all(r["config"]["training.optimizer.lr"] == 1e-7 for r in stopped)
    assert board["domains_saved"] == len(stopped) and board["domains_run"] == 8 - len(stopped)
    best = board["best"]
    assert best["status"] == "finished" and best["config"]["training.optimizer.lr"] == 0.001
    assert best["objective"] == max(r["objective"] for r in rows if r["status"] == "finished")
    # The exported YAML: the user's spec, the best values, no tune: section, the user's evaluation split (test).
    exported = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert "tune" not in exported and exported["strategy"]["ratio"] == pytest.approx(best["config"]["strategy.ratio"])
    assert exported["storage"]["s3"] == {} and "secrets left out" in (tmp_path / "best.yaml").read_text()
    files = [tmp_path / "best.yaml", *(p for p in (tmp_path / "w").rglob("*") if p.is_file())]
    for hidden in (secret, token):  # not in the output, the export, the search folder, the trials' runs, mlflow.db
        assert hidden not in output[0] and not [p for p in files if hidden.encode() in p.read_bytes()]
    assert exported["training"]["optimizer"]["lr"] == 0.001 and "split" not in exported.get("evaluation", {})
    proc = lifelong("validate", str(tmp_path / "best.yaml"), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = lifelong("run", str(tmp_path / "best.yaml"), "--workdir", str(tmp_path / "w"), "--data-root",
                    str(data_root), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["acc"] > 0.5
    # MLflow: the tune run is the parent of every trial's run, each the parent of its stage runs.
    assert_mlflow_tree(tmp_path / "w" / "mlflow.db", board, n_trials=4)
    # Exporting again never overwrites the file.
    proc = lifelong("tune", str(tmp_path / "p.yaml"), "--workdir", str(tmp_path / "w"), "--export",
                    str(tmp_path / "best.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "best.yaml" in proc.stderr and "exists" in proc.stderr


def assert_mlflow_tree(db: Path, board: dict[str, Any], n_trials: int) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("tune-split")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == board["tune_run_id"]]
    assert len(trials) == n_trials
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    for trial in trials:
        row = next(row for row in board["rows"] if trial.info.run_name == f"trial-{row['trial_id']}")
        assert float(trial.data.params["tune.strategy.ratio"]) == pytest.approx(row["config"]["strategy.ratio"])
        assert trial.data.params["evaluation.split"] == "val"
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trial.info.run_id]
        assert len(stages) >= row["domains"]
        assert trial.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")
        # A trial trains no stage beyond the domains it reported (evaluation.max_lag 0 in trials).
        events = Path(trial.data.tags["lifelong.run_dir"], "events.jsonl").read_text().splitlines()
        assert sum(json.loads(e)["event"] == "stage_end" for e in events) == row["domains"]
        history = client.get_metric_history(trial.info.run_id, "acc_seen")
        assert [m.step for m in sorted(history, key=lambda m: m.step)][:row["domains"]] == list(range(row["domains"]))


def poison_test_splits(shards_root: Path) -> None:
    """Give every test row a wrong label (the next one in the domain's label set) and re-sign the shards, so that
    the manifests still validate: a search that read a test split would see different accuracies."""
    for manifest_path in shards_root.glob("*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        labels = manifest["label_set"]
        column = manifest["schema"]["label"]["column"]
        for shard in manifest["splits"]["test"]["shards"]:
            path = manifest_path.parent / shard["path"]
            table = pq.read_table(path)
            wrong = [labels[(labels.index(y) + 1) % len(labels)] for y in table.column(column).to_pylist()]
            table = table.set_column(table.schema.get_field_index(column), column, pa.array(wrong, pa.int64()))
            pq.write_table(table, path)
            blob = path.read_bytes()
            shard.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        test = manifest["splits"]["test"]
        test["digest"] = digest(json.dumps(test["shards"], sort_keys=True))
        manifest["digest"] = digest(json.dumps(manifest["splits"], sort_keys=True))
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


@pytest.mark.e2e
def test_objective_never_reads_a_test_split(tmp_path: Path, data_root: Path) -> None:
    """Every test label is made wrong before the search: `lifelong run`, which scores on test, then scores below
    0.2, while the search, which must score on val only, still sees a model that learned."""
    from orchestrator.dag import RunOptions, prepare_domains
    from orchestrator.storage import Storage

    raw = spec(num_samples=1)
    raw["tune"]["space"] = {"strategy.ratio": {"grid": [0.8]}}
    options = RunOptions(workdir=tmp_path / "w", data_root=str(data_root), search_from=[tmp_path])
    prepare_domains(validate_raw(raw, "p.yaml"), options, Storage.from_settings(), lambda m: None)
    poison_test_splits(tmp_path / "w" / "shards" / "tune-split")
    board = run_search(tmp_path, tmp_path / "w", "--data-root", str(data_root), raw=raw)
    (row,) = board["rows"]
    assert row["status"] == "finished" and row["val_acc"] > 0.8, row
    proc = lifelong("run", str(tmp_path / "p.yaml"), "--workdir", str(tmp_path / "w"), "--data-root",
                    str(data_root), "--json", "--no-progress", "--set", "strategy.ratio=0.8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["acc"] < 0.2


@pytest.mark.e2e
def test_interrupted_search_resumes_without_redoing_finished_trials(tmp_path: Path, data_root: Path) -> None:
    raw = spec()
    raw["tune"]["space"] = {"strategy.ratio": {"grid": [0.2, 0.5, 0.8]}}
    raw["tune"].update(num_samples=1, asha={"enabled": False})  # every trial runs to the end
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "orchestrator.cli", "tune", str(write(tmp_path / "p.yaml", raw)), "--workdir",
           str(workdir), "--data-root", str(data_root)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # the leaderboard's live lines; stop once the first trial has ended
        if line.startswith("trial ") and line.split()[2] == "finished":
            finished.append(line.split()[1])
            break
    assert finished, "no trial finished"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    experiment = next((workdir / "tune").iterdir())
    assert f"lifelong tune --resume {experiment}" in err
    resumed = lifelong("tune", "--resume", str(experiment), "--workdir", str(workdir), "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    board = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert len(board["rows"]) == 3 and all(r["status"] == "finished" for r in board["rows"])
    assert sorted(r["config"]["strategy.ratio"] for r in board["rows"]) == [0.2, 0.5, 0.8]
    # The trial that had finished was not run again: one run folder and one MLflow run for it.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-split")
    names = [r.info.run_name for r in client.search_runs([exp.experiment_id], max_results=1000)]
    assert names.count(f"trial-{finished[0]}") == 1
    assert all(names.count(f"trial-{r['trial_id']}") >= 1 for r in board["rows"])


@pytest.mark.e2e
def test_optuna_search(tmp_path: Path, data_root: Path) -> None:
    pytest.importorskip("optuna")
    raw = spec(num_samples=2, search="optuna", asha={"enabled": False})
    raw["tune"]["space"] = {"strategy.ratio": {"uniform": [0.1, 0.9]}, "strategy.buffer_size": {"choice": [100, 200]}}
    board = run_search(tmp_path, tmp_path / "w", "--data-root", str(data_root), raw=raw)
    assert len(board["rows"]) == 2 and all(r["status"] == "finished" for r in board["rows"])
    assert all(0.1 <= r["config"]["strategy.ratio"] <= 0.9 for r in board["rows"])
    assert board["best"]["objective"] == max(r["objective"] for r in board["rows"])
