"""Pipeline spec: validation with field paths, overrides, and the validate command."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import SpecError
from orchestrator.plan import bind
from orchestrator.spec import apply_overrides, flatten, load_pipeline, validate_raw
from strategies import Strategy

REPO = Path(__file__).resolve().parents[1]
GOOD = {"name": "p", "domains": [{"name": "a", "source": {"kind": "sklearn_digits", "classes": [0, 1]}}]}


def test_shipped_pipelines_validate() -> None:
    for path in [*(REPO / "pipelines").glob("*.yaml"), REPO / "orchestrator" / "default_pipeline.yaml"]:
        spec = load_pipeline(path)
        assert spec.domains and spec.strategy


def test_unknown_keys_are_rejected_with_their_path() -> None:
    raw = {**GOOD, "training": {"epochs": 2, "epoch": 3}, "extra": 1}
    with pytest.raises(SpecError) as e:
        validate_raw(raw, "x.yaml")
    paths = {p for p, _ in e.value.problems}
    assert paths == {"training.epoch", "extra"}
    assert all(msg == "unknown key" for _, msg in e.value.problems)


def test_every_problem_is_reported() -> None:
    raw = {"name": "bad name!", "domains": [{"name": "a", "source": {"kind": "mnist"}}],
           "training": {"epochs": 0}, "strategy": {"name": ""}}
    with pytest.raises(SpecError) as e:
        validate_raw(raw, "x.yaml")
    by_path = dict(e.value.problems)
    assert "name" in by_path and "training.epochs" in by_path and "strategy.0.name" in by_path
    assert "needs a 'path'" in by_path["domains.0.source"]


def test_the_spec_imports_neither_torch_nor_the_strategies() -> None:
    code = "import orchestrator.spec, sys; assert 'torch' not in sys.modules and 'strategies' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strategies_are_bound_once_after_parsing() -> None:
    spec = validate_raw({**GOOD, "strategy": [{"name": "replay", "buffer_size": 7}, "ewc"]}, "x")
    replay, ewc = bind(spec, "x")
    assert replay.name == "replay" and replay.config.buffer_size == 7 and ewc.build().name == "ewc"
    with pytest.raises(SpecError, match=r"^x: strategy\.1: unknown strategy 'nope' \(known: .*replay"):
        bind(validate_raw({**GOOD, "strategy": ["finetune", {"name": "nope"}]}, "x"), "x")


class SingleWorkerOnly(Strategy):
    """A third-party strategy that is not correct under DDP."""

    name = "single-worker-only"
    supports_distributed = False


def test_a_strategy_that_cannot_run_on_several_workers_is_refused_there() -> None:
    raw = {**GOOD, "strategy": "tests.test_spec:SingleWorkerOnly"}
    (bound,) = bind(validate_raw(raw, "x"), "x")  # one worker: fine
    assert bound.name == "single-worker-only"
    refused = r"strategy\.0: 'single-worker-only' does not support training\.num_workers > 1"
    with pytest.raises(SpecError, match=refused):
        bind(validate_raw({**raw, "training": {"num_workers": 2}}, "x"), "x")


def test_strategy_parameters_are_checked_against_the_plugin() -> None:
    with pytest.raises(SpecError, match=r"strategy\.0: buffer_size: Input should be greater than or equal to 1"):
        bind(validate_raw({**GOOD, "strategy": {"name": "replay", "buffer_size": 0}}, "x"))
    with pytest.raises(SpecError, match="bufer_size: Extra inputs are not permitted"):
        bind(validate_raw({**GOOD, "strategy": {"name": "replay", "bufer_size": 10}}, "x"))


def test_overrides_set_any_field_with_yaml_types() -> None:
    raw = {**GOOD, "strategy": {"name": "finetune"}}
    apply_overrides(raw, ["strategy.name=replay", "strategy.buffer_size=1100", "training.optimizer.lr=1e-4",
                          "domains.0.uri=/data/a", "seed=7"])
    spec = validate_raw(raw, "x")
    assert spec.strategy[0].name == "replay" and spec.strategy[0].params() == {"buffer_size": 1100}
    assert spec.training.optimizer.lr == 1e-4 and spec.domains[0].uri == "/data/a" and spec.seed == 7


def test_override_replaces_strategy_and_addresses_a_list() -> None:
    raw = {**GOOD, "strategy": [{"name": "ewc", "ewc_lambda": 5.0}]}
    apply_overrides(raw, ["strategy=joint"])
    assert validate_raw(raw, "x").strategy[0].name == "joint"
    raw = {**GOOD, "strategy": [{"name": "replay"}, {"name": "ewc"}]}
    apply_overrides(raw, ["strategy.1.ewc_lambda=3"])
    assert validate_raw(raw, "x").strategy[1].params() == {"ewc_lambda": 3}
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        apply_overrides(raw, ["strategy"])


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndomains: [\n  {name: a\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML: line \d+, column \d+"):
        load_pipeline(bad)


def test_flatten_masks_secrets() -> None:
    flat = flatten({"a": {"b": 1, "secret_key": "s3cr3t", "list": [1, 2]}})
    assert flat == {"a.b": "1", "a.secret_key": "***", "a.list": "[1, 2]"}


def test_spec_hash_is_stable_and_sensitive() -> None:
    a, b = validate_raw(dict(GOOD), "x"), validate_raw({**GOOD, "seed": 1}, "x")
    assert a.spec_hash() == validate_raw(dict(GOOD), "x").spec_hash() != b.spec_hash()


def test_validate_command_lists_problems_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: p\ndomains: [{name: a, uri: /nowhere}]\ntraining: {epochs: -1, bogus: 1}\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "training.epochs" in result.output and "training.bogus: unknown key" in result.output
    ok = CliRunner().invoke(app, ["validate", str(REPO / "pipelines" / "split_mnist.yaml")])
    assert ok.exit_code == 0 and "OK" in ok.output
