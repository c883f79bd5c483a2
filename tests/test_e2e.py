"""End to end on local Ray (2 CPUs) with a subset of real MNIST: forgetting, replay, MLflow lineage, overlap,
and strategy state with 2 Ray Train workers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from orchestrator import shards
from orchestrator.checkpoint import MODEL_FILE, STRATEGY_FILE, load_checkpoint, read_lineage
from orchestrator.dag import RunOptions, run
from orchestrator.models import HeadLayout, build_model
from orchestrator.spec import validate_raw
from orchestrator.storage import Storage
from strategies import Batch, StageContext, build_strategies
from strategies.buffer import read_part
from strategies.ewc import diagonal_fisher

pytestmark = pytest.mark.e2e


def split_mnist(n_domains: int, max_rows: int, **overrides: Any) -> dict[str, Any]:
    raw = {
        "name": "mini-split-mnist",
        "scenario": "class_il",
        "domains": [{"name": f"digits-{2 * k}-{2 * k + 1}",
                     "source": {"kind": "mnist", "path": "mnist", "classes": [2 * k, 2 * k + 1], "max_rows": max_rows}}
                    for k in range(n_domains)],
        "model": {"name": "mlp", "hidden": [100]},
        "training": {"epochs": 2, "batch_size": 64},
        "evaluation": {"num_actors": 2, "cpus_per_actor": 0.2},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reports(ray_local: None, data_root: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for label, strategy in (("finetune", {"name": "finetune"}), ("replay", {"name": "replay", "buffer_size": 300})):
        spec = validate_raw(split_mnist(2, 2000, strategy=strategy), "test")
        out[label] = run(spec, RunOptions(workdir=workdir, data_root=str(data_root), show_progress=False))
    return out


def test_finetune_forgets_and_replay_remembers(reports: dict[str, dict[str, Any]]) -> None:
    ft, rp = reports["finetune"]["R"], reports["replay"]["R"]
    assert ft[0][0] > 0.97 and ft[1][1] > 0.9  # each domain is learned ...
    assert ft[1][0] < 0.2  # ... and finetuning forgets domain 0 in class-IL
    assert rp[1][0] > 0.8 and rp[1][1] > 0.8  # replay remembers it
    assert reports["replay"]["acc"] > reports["finetune"]["acc"] + 0.3
    assert reports["finetune"]["bwt"] < -0.7 and reports["finetune"]["avg_forgetting"] > 0.7


def test_mlflow_records_runs_inputs_and_artifacts(reports: dict[str, dict[str, Any]], workdir: Path) -> None:
    rep = reports["replay"]
    mlflow.set_tracking_uri(rep["tracking_uri"])
    parent = mlflow.get_run(rep["mlflow_run_id"])
    assert parent.data.tags["lifelong.run_id"] == rep["run_id"]
    assert parent.data.metrics["ACC"] == pytest.approx(rep["acc"])
    assert parent.data.params["strategy.0.name"] == "replay" and parent.data.params["strategy.0.buffer_size"] == "300"
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{rep['mlflow_run_id']}'")
    assert len(children) == 2
    for child in children:
        k = int(child.data.tags["lifelong.stage"])
        uri = str(workdir / "shards" / "mini-split-mnist" / rep["domains"][k])
        manifest = shards.read_manifest(uri)
        (ds_input,) = child.inputs.dataset_inputs
        assert ds_input.dataset.digest == manifest["splits"]["train"]["digest"]
        assert ds_input.dataset.name == f"{rep['domains'][k]}/train"
        assert uri in ds_input.dataset.source
        history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history] == [0, 1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(rep["mlflow_run_id"])}
    assert {"accuracy_matrix.json", "accuracy_matrix.png", "events.jsonl"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=rep["mlflow_run_id"], artifact_path="accuracy_matrix.json")
    assert json.loads(Path(local).read_text())["R"] == rep["R"]


def test_lineage_chains_checkpoints(reports: dict[str, dict[str, Any]]) -> None:
    rep = reports["replay"]
    s0, s1 = (Path(s["checkpoint"]) for s in rep["stages"])
    lin0, lin1 = read_lineage(s0), read_lineage(s1)
    assert lin1["parent"]["uri"] == str(s0) and lin1["parent"]["model_sha256"] == lin0["model_sha256"]
    assert lin0["parent"]["uri"].endswith("/init") and lin0["stage"] == 0
    assert lin1["inputs"][0]["digest"] == shards.read_manifest(lin1["inputs"][0]["uri"])["splits"]["train"]["digest"]
    assert len(lin1["spec_sha256"]) == 64 and lin1["code"]["lifelong"]
    _, strategy_states, _ = load_checkpoint(s1)
    assert len(strategy_states[0]["y"]) == 300  # the replay buffer travels in the checkpoint


def test_each_row_is_evaluated_once_its_stage_is_committed(reports: dict[str, dict[str, Any]]) -> None:
    events = [json.loads(line) for line in (Path(reports["finetune"]["run_dir"]) / "events.jsonl").open()]
    stage_end = {e["stage"]: e["t"] for e in events if e["event"] == "stage_end"}
    cells = {row: [e for e in events if e["event"] == "eval_cell" and e["row"] == row] for row in (-1, 0, 1)}
    assert [len(c) for c in cells.values()] == [2, 2, 2]
    # Row k of R is computed from stage k's committed checkpoint, by actors that run beside the next stage at
    # background priority (on these 2 cores they take the cycles training leaves idle; the overlap itself is measured
    # in tests/benchmarks/bench_pipeline.py): every cell of row k starts after stage k ends, and the rows are started
    # in stage order (two actors share a row's cells, so a slow-booting actor's cell of row -1 may start after the
    # other actor has begun row 1).
    assert all(stage_end[k] <= c["start"] for k in (0, 1) for c in cells[k])
    assert min(c["start"] for c in cells[-1]) <= min(c["start"] for c in cells[1])


def test_two_workers_average_fisher_and_share_one_buffer(ray_local: None, data_root: Path, workdir: Path) -> None:
    raw = split_mnist(1, 1000, strategy=[{"name": "replay", "buffer_size": 64},
                                         {"name": "ewc", "fisher_samples": None}, {"name": "spg"},
                                         {"name": "ncl", "fisher_samples": None},
                                         {"name": "mas", "importance_samples": None},
                                         {"name": "derpp", "buffer_size": 40, "storage": "parquet"}],
                      training={"epochs": 1, "batch_size": 50, "num_workers": 2, "cpus_per_worker": 0.25})
    raw["name"] = "two-workers"
    rep = run(validate_raw(raw, "test"), RunOptions(workdir=workdir, data_root=str(data_root), show_progress=False))
    model_state, states, _ = load_checkpoint(rep["stages"][0]["checkpoint"])
    replay_state, ewc_state, spg_state, ncl_state, mas_state, derpp_state = states
    uri = str(workdir / "shards" / "two-workers" / "digits-0-1")
    manifest = shards.read_manifest(uri)
    train = shards.read_split(uri, manifest, "train")
    assert manifest["splits"]["train"]["rows"] % 2 == 0  # equal split: every row reaches one worker
    # The buffer holds 64 distinct training samples gathered from both workers.
    x = torch.from_numpy(train.x.astype("float32")) * manifest["schema"]["features"]["scale"]
    rows = {int(((x - b.reshape(-1)).abs().max(1).values < 1e-6).nonzero()[0]) for b in replay_state["x"]}
    assert len(replay_state["y"]) == 64 and len(rows) == 64 and replay_state["n_seen"] == len(train.y)
    # Fisher of 2 workers == Fisher computed in one process on the same samples with the same weights.
    layout = HeadLayout.build("class_il", [manifest["label_set"]])
    model = build_model(validate_raw(raw, "t").model, (1, 28, 28), layout.num_outputs)
    model.load_state_dict(model_state)
    y = layout.target_table()[0, torch.from_numpy(train.y)]
    batch = Batch(x.reshape(-1, 1, 28, 28), y, torch.zeros(len(y), dtype=torch.long))
    ctx = StageContext(model=model, train_model=model, optimizer=None, task_id=0, num_tasks=1,
                       head_mask=layout.head_mask(), iter_task_batches=lambda: iter([batch]))
    fisher = diagonal_fisher(ctx, chunk=64, max_samples=None)
    for name, f in fisher.items():
        torch.testing.assert_close(ewc_state["fishers"][0][name], f, atol=1e-5, rtol=0.0)
    # SPG importance and NCL precision (Kronecker factors) of 2 workers == 1 process on the same samples.
    spg, ncl, mas = build_strategies([("spg", {}), ("ncl", {"fisher_samples": None}),
                                      ("mas", {"importance_samples": None})])
    spg.before_task(ctx)
    for s in (spg, ncl, mas):
        s.after_task(ctx)
    for name, omega in mas.omega.items():
        torch.testing.assert_close(mas_state["omega"][name], omega, atol=1e-5, rtol=0.0)
    # DER++'s buffer went to Parquet on the run's storage: one part per worker, 40 samples with their logits; the
    # checkpoint holds only the list of parts.
    parts = derpp_state["parts"]
    assert len(parts) == 2 and sum(p["rows"] for p in parts) == 40 and "x" not in derpp_state
    assert all(Path(p["uri"]).is_relative_to(Path(rep["run_dir"]) / "state" / "stage-0") for p in parts)
    pq_buffer = torch.cat([read_part(Storage(), p["uri"])["logits"] for p in parts])
    assert pq_buffer.shape == (40, layout.num_outputs) and bool(torch.isfinite(pq_buffer).all())
    assert set(spg_state["a_max"]) == set(spg.a_max) and set(ncl_state["kron"]) == set(ncl.kron)
    for name, imp in spg.a_max.items():
        torch.testing.assert_close(spg_state["a_max"][name], imp, atol=1e-5, rtol=0.0)
    for name, (A, G) in ncl.kron.items():
        torch.testing.assert_close(ncl_state["kron"][name][0], A, atol=1e-5, rtol=0.0)
        torch.testing.assert_close(ncl_state["kron"][name][1], G, atol=1e-5, rtol=0.0)


def lifelong_cli(*args: str) -> Any:
    """``lifelong <args>`` in this process (click's runner: stdout and stderr apart)."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_each_stage_is_a_registered_version_and_lineage_walks_back(reports: dict[str, dict[str, Any]],
                                                                   workdir: Path) -> None:
    from orchestrator.registry import TAG

    rep = reports["replay"]
    client = mlflow.MlflowClient(rep["tracking_uri"])
    versions = client.search_model_versions(f"name = 'mini-split-mnist' and tags.`{TAG}run_id` = '{rep['run_id']}'")
    by_stage = {int(v.tags[f"{TAG}stage"]): v for v in versions}
    assert sorted(by_stage) == [0, 1]
    v0, v1 = by_stage[0], by_stage[1]
    assert v1.tags[f"{TAG}parent_version"] == str(v0.version) and v0.tags[f"{TAG}parent_version"] == ""
    assert v0.tags[f"{TAG}parent_checkpoint"].endswith("/init")
    for k, v in by_stage.items():
        checkpoint = rep["stages"][k]["checkpoint"]
        lineage = read_lineage(checkpoint)
        assert v.tags[f"{TAG}checkpoint"] == checkpoint
        for name, file in (("model", MODEL_FILE), ("strategy", STRATEGY_FILE)):
            blob = (Path(checkpoint) / file).read_bytes()
            assert v.tags[f"{TAG}{name}_sha256"] == lineage[f"{name}_sha256"] == hashlib.sha256(blob).hexdigest()
        manifest = shards.read_manifest(str(workdir / "shards" / "mini-split-mnist" / rep["domains"][k]))
        assert v.tags[f"{TAG}manifest_digests"] == f"{rep['domains'][k]}={manifest['digest']}"
        assert all(s["sha256"] in v.tags[f"{TAG}shards"] for s in manifest["splits"]["train"]["shards"])
        assert v.tags[f"{TAG}spec_sha256"] == lineage["spec_sha256"] and lineage["code"]["git_commit"] in \
            v.tags[f"{TAG}code_version"]
        assert v.run_id != rep["mlflow_run_id"]  # the stage's own run
        assert client.get_run(v.run_id).data.tags["mlflow.parentRunId"] == rep["mlflow_run_id"]

    result = lifelong_cli("lineage", f"models:/mini-split-mnist/{v1.version}", "--json",
                          "--tracking-uri", rep["tracking_uri"])
    assert result.exit_code == 0, result.output
    chain = json.loads(result.stdout)
    assert [s["stage"] for s in chain["stages"]] == [1, 0]
    assert chain["stages"][0]["parent_model_id"] == chain["stages"][1]["model_id"]
    assert chain["stages"][0]["hyperparameters"]["strategy.0.buffer_size"] == "300"
    assert chain["root"]["checkpoint"] == v0.tags[f"{TAG}parent_checkpoint"]


def test_audit_names_each_file_that_changed(reports: dict[str, dict[str, Any]], workdir: Path) -> None:
    rep = reports["replay"]
    args = ("audit", rep["run_id"], "--tracking-uri", rep["tracking_uri"])
    clean = lifelong_cli(*args)
    assert clean.exit_code == 0 and "audit passed: all 11 files" in clean.stderr, clean.output
    stage_0 = Path(rep["stages"][0]["checkpoint"])
    manifest = shards.read_manifest(str(workdir / "shards" / "mini-split-mnist" / rep["domains"][1]))
    shard = workdir / "shards" / "mini-split-mnist" / rep["domains"][1] / manifest["splits"]["train"]["shards"][0]["path"]
    for path in (stage_0 / "strategy.safetensors", stage_0 / "lineage.json", shard):
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            bad = lifelong_cli(*args)
        finally:
            path.write_bytes(original)
        mismatches = [line for line in bad.stderr.splitlines() if line.startswith("MISMATCH")]
        assert bad.exit_code == 1 and len(mismatches) == 1 and str(path) in mismatches[0], bad.stderr
    unknown = lifelong_cli("audit", "no-such-run", "--tracking-uri", rep["tracking_uri"])
    assert unknown.exit_code == 2 and "no-such-run" in unknown.stderr
