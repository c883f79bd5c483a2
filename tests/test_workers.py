"""The persistent worker group: a stage whose worker process dies restarts from its parent checkpoint on a fresh
group (``training.max_failures``), writes a checkpoint of its own, and fails with a clear error when no restart is
left; the Ray Train executor runs the whole pipeline in one fit, with the same stage body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray

from orchestrator.dag import RunOptions, check_resources, run
from orchestrator.errors import LifelongError, TrainingError
from orchestrator.plan import StageSpec
from orchestrator.spec import validate_raw
from orchestrator.workers import StageRunner

pytestmark = pytest.mark.e2e


def digits(name: str, **training: Any) -> dict[str, Any]:
    return {"name": name, "scenario": "class_il",
            "domains": [{"name": f"digits-{2 * k}-{2 * k + 1}",
                         "source": {"kind": "sklearn_digits", "classes": [2 * k, 2 * k + 1]}} for k in range(2)],
            "model": {"name": "mlp", "hidden": [32]},
            "training": {"epochs": 10, "batch_size": 32, **training},
            "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25}}


def kill_first_worker(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Kill worker 0 of the group right after stage 1 is submitted (once); returns the stages it struck."""
    struck: list[int] = []
    start = StageRunner.start

    def start_and_kill(self: StageRunner, stage: StageSpec, *args: Any) -> Any:
        handle = start(self, stage, *args)
        if stage.task_id == 1 and not struck:
            ray.kill(self._group.workers[0])
            struck.append(stage.task_id)
        return handle

    monkeypatch.setattr(StageRunner, "start", start_and_kill)
    return struck


def test_a_dead_worker_restarts_its_stage_from_the_parent(ray_local: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec = validate_raw(digits("restart", max_failures=1), "test")
    undisturbed = run(spec, RunOptions(workdir=tmp_path, show_progress=False))
    struck = kill_first_worker(monkeypatch)
    report = run(spec, RunOptions(workdir=tmp_path, show_progress=False))
    assert struck == [1]
    first, second = report["stages"]
    assert first["checkpoint"].endswith("stage-0/checkpoint")
    # The restarted stage wrote a checkpoint of its own; the failed attempt left none behind.
    assert second["checkpoint"].endswith("stage-1/checkpoint-retry1")
    assert not (Path(second["checkpoint"]).parent / "checkpoint").exists()
    # It started again from stage 0's checkpoint: the same training as in the undisturbed run.
    assert second["epoch_loss"] == pytest.approx(undisturbed["stages"][1]["epoch_loss"], rel=1e-5)
    assert report["R"] == undisturbed["R"] and report["R"][0][0] > 0.9 and report["R"][1][1] > 0.6


def test_a_dead_worker_without_restarts_fails_the_run(ray_local: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kill_first_worker(monkeypatch)
    with pytest.raises(TrainingError, match=r"stage 1 \(digits-2-3\) failed: a training worker died"):
        run(validate_raw(digits("no-restart"), "test"), RunOptions(workdir=tmp_path, show_progress=False))


def test_the_ray_train_executor_runs_the_whole_pipeline_in_one_fit(ray_local: None, tmp_path: Path) -> None:
    """One Ray Train fit runs both stages (each reported with its checkpoint, committed in the run's folder, which
    is the fit's experiment folder) and gives the R of the worker group on the same seed."""
    group = run(validate_raw(digits("group"), "test"), RunOptions(workdir=tmp_path, show_progress=False))
    report = run(validate_raw(digits("ray-train", executor="ray_train"), "test"),
                 RunOptions(workdir=tmp_path, show_progress=False))
    run_dir = Path(report["run_dir"])
    assert [s["checkpoint"] for s in report["stages"]] == [str(run_dir / f"stage-{k}" / "checkpoint") for k in (0, 1)]
    # Ray Train's own record of the one fit lists both stages' checkpoints, where the stages committed them.
    snapshots = list(run_dir.glob("checkpoint_manager_snapshot*.json"))
    assert len(snapshots) == 1, sorted(p.name for p in run_dir.iterdir())
    recorded = json.loads(snapshots[0].read_text())["checkpoint_results"]
    assert [r["checkpoint_dir_name"] for r in recorded] == ["stage-0/checkpoint", "stage-1/checkpoint"]
    assert [r["metrics"]["task_id"] for r in recorded] == [0, 1]
    for mine, theirs in zip(report["R"], group["R"]):
        assert mine == pytest.approx(theirs, abs=0.01), (report["R"], group["R"])
    assert report["R"][1][1] > 0.6


def test_a_diverging_stage_names_its_domain_and_step(ray_local: None, tmp_path: Path) -> None:
    raw = digits("diverge", optimizer={"name": "sgd", "lr": 1e12})
    with pytest.raises(TrainingError, match=r"^stage 0 \(digits-0-1\) failed: domain 0: loss is (nan|inf) at epoch "):
        run(validate_raw(raw, "test"), RunOptions(workdir=tmp_path, show_progress=False))
    events = (next(tmp_path.glob("diverge/*/events.jsonl"))).read_text()
    assert '"stage_failed"' in events and "_COMPLETED" not in [p.name for p in tmp_path.glob("diverge/*/*")]


def test_a_training_only_run_has_stages_and_no_matrix(ray_local: None, tmp_path: Path) -> None:
    raw = digits("train-only")
    raw["evaluation"] = {"enabled": False}
    report = run(validate_raw(raw, "test"), RunOptions(workdir=tmp_path, show_progress=False))
    assert report["R"] == [] and report["acc"] is None and len(report["stages"]) == 2
    run_dir = Path(report["run_dir"])
    assert (run_dir / "_COMPLETED").exists() and not (run_dir / "accuracy_matrix.json").exists()
    assert '"eval_cell"' not in (run_dir / "events.jsonl").read_text()


def test_resources_the_cluster_cannot_hold_are_refused(ray_local: None) -> None:
    raw = digits("too-big", num_workers=2, cpus_per_worker=0.75)
    raw["evaluation"] = {"num_actors": 2, "cpus_per_actor": 0.5}
    with pytest.raises(LifelongError, match=r"= 2\.5 CPUs, more than this Ray cluster's 2; the run would wait"):
        check_resources(validate_raw(raw, "test"))
    raw["evaluation"] = {"num_actors": 1, "cpus_per_actor": 0.5}  # 2.0 of 2: fits
    assert check_resources(validate_raw(raw, "test")).num_workers == 2


def test_continual_evaluation_scores_the_model_in_training(ray_local: None, tmp_path: Path) -> None:
    """Every 10 steps (and at each stage's end) rank 0's weights are scored on a fixed subsample of every domain
    seen so far; the report has the curve and the stability-gap metrics, MLflow the step metrics, the run folder
    the PNG. Training is the same as without it."""
    import mlflow

    raw = digits("continual", epochs=3, batch_size=16)
    raw["evaluation"].update(every_n_steps=10, subsample=100, window_steps=30)
    report = run(validate_raw(raw, "test"), RunOptions(workdir=tmp_path, show_progress=False))
    steps = [s["stage"] for s in report["stages"]]
    curve = report["curve"]
    assert report["curve_snapshots_dropped"] == 0
    ends = [p for p in curve if p["end"]]
    assert sorted({(p["stage"], p["col"]) for p in ends}) == [(0, 0), (1, 0), (1, 1)]  # each stage's end, domains seen
    assert {p["col"] for p in curve if p["stage"] == 0} == {0}
    assert len({p["n"] for p in curve if p["col"] == 0}) == 1 and 0 < curve[0]["n"] <= 100  # one fixed subsample
    first_stage_steps = max(p["step"] for p in curve if p["stage"] == 0)
    assert min(p["global_step"] for p in curve if p["stage"] == 1) == first_stage_steps + 10
    gap = report["stability"]
    assert 0.0 <= gap["min_acc"] <= gap["task_end_acc"] <= 1.0 and gap["gap"] == pytest.approx(
        gap["task_end_acc"] - gap["min_acc"])
    assert (Path(report["run_dir"]) / "continual_evaluation.png").stat().st_size > 10_000
    history = mlflow.MlflowClient(report["tracking_uri"]).get_metric_history(report["mlflow_run_id"],
                                                                            "continual_acc.digits-0-1")
    assert sorted(m.step for m in history) == sorted(p["global_step"] for p in curve if p["col"] == 0)
    plain = run(validate_raw(digits("continual", epochs=3, batch_size=16), "test"),
                RunOptions(workdir=tmp_path, show_progress=False))
    assert plain["R"] == report["R"] and steps == [0, 1]  # snapshots do not change training
