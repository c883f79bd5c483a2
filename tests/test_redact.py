"""Secrets kept out of what lifelong prints and writes (``orchestrator/redact.py``), and given back where a run or a
search continues: a tune folder's saved request, a resumed run's MLflow tracking URI. The end-to-end greps are in
``test_s3_e2e.py`` (a run on S3 and an MLflow server) and ``test_tune.py`` (a search and its export)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import LifelongError
from orchestrator.redact import (is_secret_key, redact_command, redact_overrides, redact_text, redact_uri,
                                 restore_secrets)
from orchestrator.resume import new_record, spec_changes, tracking_uri
from orchestrator.spec import flatten, load_pipeline, validate_raw
from orchestrator.tuning import TrialRow, TuneRequest, export_best, read_request, write_request

SECRET, TOKEN, PASSWORD = "s3cr3t-Zq9", "t0ken-Xw7", "pa55-Yv4"
SPEC: dict[str, Any] = {
    "name": "p", "domains": [{"name": "a", "source": {"kind": "sklearn_digits", "classes": [0, 1]}}],
    "model": {"name": "mlp", "hidden": [8]}, "strategy": {"name": "replay"},
    "tracking": {"uri": f"http://alice:{PASSWORD}@mlflow.internal:5000"},
    "storage": {"s3": {"access_key_id": "AKIATESTING", "secret_access_key": SECRET, "session_token": TOKEN,
                       "endpoint_url": "http://minio:9000"}},
    "tune": {"space": {"strategy.ratio": {"uniform": [0.1, 0.9]}}},
}


def assert_hidden(text: str) -> None:
    for hidden in (SECRET, TOKEN, PASSWORD):
        assert hidden not in text


@pytest.mark.parametrize("name, secret", [
    ("secret_access_key", True), ("storage.s3.session_token", True), ("access_key_id", True), ("password", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("MLFLOW_TRACKING_TOKEN", True), ("api_key", True),
    ("tokenizer", False), ("max_tokens", False), ("model.tokenizer", False), ("keys", False), ("endpoint_url", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret


def test_uris_lose_their_password_and_secret_query_values() -> None:
    assert redact_uri(f"http://alice:{PASSWORD}@h:5000/x") == "http://alice:***@h:5000/x"
    assert redact_uri(f"https://h/api?token={TOKEN}&x=1") == "https://h/api?token=***&x=1"
    for plain in ("http://h:5000", "sqlite:////tmp/w/mlflow.db", "s3://bucket/prefix", "not a uri", "http://h:bad"):
        assert redact_uri(plain) == plain
    assert redact_text(f"cannot reach http://alice:{PASSWORD}@h:5/api (s3://k:{SECRET}@b)") == \
        "cannot reach http://alice:***@h:5/api (s3://k:***@b)"
    command = (f"lifelong run p.yaml --set storage.s3.secret_access_key={SECRET} --tracking-uri "
               f"http://a:{PASSWORD}@h:5 --set training.epochs=2")
    assert redact_command(command) == ("lifelong run p.yaml --set 'storage.s3.secret_access_key=***' --tracking-uri "
                                       "'http://a:***@h:5' --set training.epochs=2")
    assert redact_overrides([f"storage.s3.session_token={TOKEN}", f"tracking.uri=http://a:{PASSWORD}@h",
                             "training.epochs=2"]) == ("tracking.uri=http://a:***@h", "training.epochs=2")


def test_spec_dumps_and_mlflow_params_hold_no_secret() -> None:
    pipeline = validate_raw(SPEC, "p.yaml")
    assert pipeline.tracking.uri == SPEC["tracking"]["uri"]  # the run itself uses the real URI
    dump = pipeline.model_dump(mode="json")
    assert_hidden(json.dumps(dump))
    params = flatten(dump)
    assert_hidden(json.dumps(params))
    assert params["tracking.uri"] == "http://alice:***@mlflow.internal:5000"
    assert params["storage.s3.secret_access_key"] == "***" and params["storage.s3.endpoint_url"] == "http://minio:9000"
    assert params["domains.0.source.tokenizer"] == "bytes"  # a field merely named like a token stays readable
    # The dump's hash does not depend on the secrets' values (a rotated key is the same pipeline).
    other = json.loads(json.dumps(SPEC).replace(SECRET, "other").replace(PASSWORD, "other"))
    assert validate_raw(other, "p.yaml").spec_hash() == pipeline.spec_hash()
    # What was masked comes back from the same spec with its secrets, and is unset without it.
    restored = restore_secrets(dump, pipeline.model_dump())
    assert restored["storage"]["s3"]["secret_access_key"] == SECRET and restored["tracking"]["uri"] == \
        SPEC["tracking"]["uri"]
    gone = restore_secrets(dump, None)
    assert gone["storage"]["s3"]["session_token"] is None and gone["tracking"]["uri"] is None
    assert gone["storage"]["s3"]["endpoint_url"] == "http://minio:9000"


def test_run_record_keeps_no_secret_and_resume_gets_the_tracking_uri_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_file = tmp_path / "p.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "storage": {}}))
    overrides = [f"storage.s3.session_token={TOKEN}", "training.epochs=2"]
    pipeline = load_pipeline(spec_file, overrides)
    record = new_record("r1", pipeline, spec_file, overrides, SPEC["tracking"]["uri"], "p")
    assert_hidden(record.model_dump_json())
    assert record.overrides == ("training.epochs=2",) and record.tracking_uri.endswith(":***@mlflow.internal:5000")
    # A resume compares the spec file with its recorded overrides to the recorded spec: the secret --set that was
    # not recorded is no change (nor would a rotated key be).
    assert spec_changes(record.spec, load_pipeline(spec_file, list(record.overrides)).model_dump(mode="json")) == []
    pipeline = validate_raw(SPEC, "p.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(record, pipeline) == SPEC["tracking"]["uri"]  # from the spec (restored from its file)
    bare = validate_raw({k: v for k, v in SPEC.items() if k != "tracking"}, "p.yaml")
    with pytest.raises(LifelongError, match=r"run r1: its MLflow tracking URI http://alice:\*\*\*@mlflow"):
        tracking_uri(record, bare)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:wrong@elsewhere:5000")  # another server: not taken
    with pytest.raises(LifelongError, match="set MLFLOW_TRACKING_URI"):
        tracking_uri(record, bare)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SPEC["tracking"]["uri"])
    assert tracking_uri(record, bare) == SPEC["tracking"]["uri"]


def test_tune_folder_masks_its_request_and_gets_the_secrets_back_from_the_spec_file(tmp_path: Path) -> None:
    source = tmp_path / "p.yaml"
    source.write_text(yaml.safe_dump(SPEC))
    request = TuneRequest(source.read_text(), ("training.epochs=2",), str(source),
                          load_pipeline(source, ["training.epochs=2"]).spec_hash())
    write_request(request, tmp_path, {"tune_run_id": "t1"})
    saved = (tmp_path / "lifelong-tune.json").read_text()
    assert_hidden(saved)
    back, extra = read_request(tmp_path)
    assert extra == {"tune_run_id": "t1"}
    pipeline = back.pipeline()
    assert pipeline.storage.s3.secret_access_key.get_secret_value() == SECRET
    assert pipeline.tracking.uri == SPEC["tracking"]["uri"] and pipeline.training.epochs == 2
    source.unlink()  # the spec file is gone: the secrets are unset, for the environment to supply
    gone = read_request(tmp_path)[0].pipeline()
    assert gone.storage.s3.secret_access_key is None and gone.training.epochs == 2
    # A folder saved before the masking (the spec's text in it) is still resumed.
    (tmp_path / "lifelong-tune.json").write_text(json.dumps({
        "yaml_text": yaml.safe_dump(SPEC), "overrides": ["training.epochs=2"], "source": str(source),
        "spec_sha256": request.spec_sha256, "tune_run_id": "t1"}))
    assert read_request(tmp_path)[0].pipeline().storage.s3.secret_access_key.get_secret_value() == SECRET


def test_exported_best_config_leaves_the_secrets_out_and_says_so(tmp_path: Path) -> None:
    best = TrialRow("t_1", {"strategy.ratio": 0.4}, 1, 0.9, 0.0, 0.9, "finished", "", "")
    path = export_best(json.loads(json.dumps(SPEC)), best, tmp_path / "best.yaml", "best trial")
    text = path.read_text()
    assert_hidden(text)
    exported = yaml.safe_load(text)
    assert exported["storage"]["s3"] == {"endpoint_url": "http://minio:9000"} and "tune" not in exported
    assert exported["tracking"]["uri"] == "http://alice@mlflow.internal:5000"
    assert "storage.s3.secret_access_key" in text and "tracking.uri (credentials in the URI)" in text
    assert math.isclose(exported["strategy"]["ratio"], 0.4)
    validate_raw(exported, str(path))
