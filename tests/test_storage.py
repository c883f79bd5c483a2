"""Storage against a real S3-compatible server on loopback (moto), through the same code path as production."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import shards
from orchestrator.errors import ShardError
from orchestrator.spec import SourceSpec, flatten, validate_raw
from orchestrator.storage import Storage, StorageError, join


def test_settings_fall_back_to_the_aws_environment_and_secrets_stay_hidden() -> None:
    env = {"AWS_ENDPOINT_URL": "http://env:1", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_PROFILE": "p"}
    assert Storage.from_settings(None, env) == Storage(endpoint_url="http://env:1", region="eu-west-1", profile="p")
    assert Storage.from_settings(None, {**env, "AWS_ENDPOINT_URL_S3": "http://s3only:2"}).endpoint_url == \
        "http://s3only:2"
    raw = {"name": "p", "domains": [{"name": "a", "uri": "s3://b/a"}],
           "storage": {"s3": {"endpoint_url": "http://spec:3", "access_key_id": "AKIA-SPEC",
                              "secret_access_key": "very-secret"}}}
    spec = validate_raw(raw, "test")
    storage = Storage.from_settings(spec.storage.s3, env)
    assert storage.endpoint_url == "http://spec:3" and storage.region == "eu-west-1"  # spec first, then env
    assert storage.key == "AKIA-SPEC" and storage.secret == "very-secret"
    for text in (repr(storage), str(storage), repr(spec), str(flatten(spec.model_dump(mode="json")))):
        assert "very-secret" not in text and "AKIA-SPEC" not in text
    assert pickle.loads(pickle.dumps(storage)) == storage  # travels to Ray workers with its settings


def test_s3_round_trip_through_fsspec_and_pyarrow(s3_bucket: str) -> None:
    storage = Storage.from_settings()
    uri = join(s3_bucket, "dir", "table.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [1, 2, 3]}), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    assert storage.exists(uri)
    fs, path = storage.arrow(uri)  # pyarrow ignores AWS_ENDPOINT_URL: the endpoint must have been passed
    assert pq.read_table(path, filesystem=fs)["a"].to_pylist() == [1, 2, 3]
    with pytest.raises(StorageError, match="already exists; refusing to overwrite"):
        storage.write_bytes(uri, b"other")
    assert pq.read_table(path, filesystem=fs).num_rows == 3
    fs2, _ = storage.fsspec(uri)
    assert [p.rsplit("/", 1)[1] for p in fs2.ls(join(s3_bucket, "dir").split("://")[1])] == ["table.parquet"]


def test_interrupted_s3_write_leaves_no_object(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    storage = Storage.from_settings()
    uri = join(s3_bucket, "ckpt", "model.pt")

    def killed(self, *a, **k):  # noqa: ANN001, ANN002, ANN003 - the process dies between upload and commit
        raise KeyboardInterrupt("killed before the commit")

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(s3fs.S3FileSystem, "mv", killed)
        storage.write_bytes(uri, b"x" * 1000)
    fs, path = storage.fsspec(uri)
    assert not storage.exists(uri) and fs.find(path.split("/")[0]) == []  # neither target nor temporary key


def test_unreachable_endpoint_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    storage = Storage(endpoint_url="http://127.0.0.1:9", region="us-east-1", retry_seconds=1)
    with pytest.raises(StorageError, match=r"cannot reach s3://nobucket/x \(endpoint http://127.0.0.1:9\) for 1 s "
                                           r"\(storage.s3.retry_seconds\)"):
        storage.exists("s3://nobucket/x")


def test_local_paths_work_alike(tmp_path: Path) -> None:
    storage = Storage()
    storage.write_bytes(str(tmp_path / "a" / "b.bin"), b"abc")
    assert storage.read_bytes(str(tmp_path / "a" / "b.bin")) == b"abc"
    assert storage.read_bytes(f"file://{tmp_path}/a/b.bin") == b"abc"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "missing"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_shards_build_writes_straight_to_s3(s3_bucket: str) -> None:
    out = join(s3_bucket, "shards")
    res = _cli("shards", "build", "--out", out, "--dataset", "sklearn_digits", "--tasks", "2")
    assert res.returncode == 0, res.stderr
    storage = Storage.from_settings()
    for name, labels in (("classes-0-1", [0, 1]), ("classes-2-3", [2, 3])):
        manifest = shards.read_manifest(join(out, name), storage)
        assert manifest["label_set"] == labels
        shards.verify_domain(join(out, name), manifest, storage=storage)  # every shard there, sha256 as listed
        assert len(shards.read_split(join(out, name), manifest, "test", storage).y) == \
            manifest["splits"]["test"]["rows"]
    again = _cli("shards", "build", "--out", out, "--dataset", "sklearn_digits", "--tasks", "1")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip() == f"error: {out}/classes-0-1 already holds a domain; refusing to overwrite it"


def test_interrupted_domain_build_is_invisible(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    real_mv = s3fs.S3FileSystem.mv

    def mv(self, src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003 - dies just before committing the manifest
        if str(dst).endswith(shards.MANIFEST):
            raise KeyboardInterrupt("killed before the commit record")
        return real_mv(self, src, dst, *a, **k)

    uri = join(s3_bucket, "shards", "digits")
    source = SourceSpec(kind="sklearn_digits", classes=[0, 1])
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(s3fs.S3FileSystem, "mv", mv)
        shards.build_domain(uri, "digits", source, None)
    with pytest.raises(ShardError, match="missing manifest"):
        shards.read_manifest(uri)  # no reader sees the domain
    fs, path = Storage.from_settings().fsspec(uri)
    assert not any(".tmp-" in p for p in fs.find(path.split("/")[0]))  # the temporary prefix was removed
    manifest = shards.build_domain(uri, "digits", source, None)  # a rebuild completes over the leftovers
    shards.verify_domain(uri, manifest)


def test_parquet_replay_buffer_on_s3(s3_bucket: str) -> None:
    import torch

    from orchestrator.stage import fit_task
    from strategies import Batch, StageContext, build_strategies

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    storage = Storage.from_settings()
    (replay,) = build_strategies([("replay", {"buffer_size": 30, "storage": "parquet"})])
    for task in range(2):
        x = torch.randn(64, 6)
        data = [Batch(x[i:i + 16], torch.full((16,), task), torch.full((16,), task)) for i in range(0, 64, 16)]
        ctx = StageContext(model=model, train_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           task_id=task, num_tasks=2, head_mask=torch.ones(2, 4, dtype=torch.bool),
                           iter_task_batches=lambda data=data: iter(data), state_uri=join(s3_bucket, f"stage-{task}"),
                           store=storage)
        fit_task(ctx, [replay], epochs=1)
    (part,) = replay.state_dict()["parts"]
    assert part["uri"].startswith(f"{s3_bucket}/stage-1/replay-") and part["rows"] == 30
    assert storage.exists(part["uri"])
    ctx.task_id = 2
    replay.before_task(ctx)  # the next stage reads it back from the bucket
    assert replay.size == 30 and set(replay.buffer.fields["t"][:30].tolist()) == {0, 1}


def test_domain_uris_under_an_object_store_prefix_stay_uris(tmp_path: Path) -> None:
    raw = {"name": "p", "domains": [{"name": "a", "source": {"kind": "sklearn_digits", "classes": [0, 1]}},
                                    {"name": "b", "uri": "s3://elsewhere/b"}],
           "storage": {"shards": "s3://bucket/prefix/"}}
    spec = validate_raw(raw, "test")
    assert shards.domain_uri(spec, 0, tmp_path) == "s3://bucket/prefix/p/a"
    assert shards.domain_uri(spec, 1, tmp_path) == "s3://elsewhere/b"
    local = validate_raw({**raw, "storage": {"shards": str(tmp_path / "sh")}}, "test")
    assert shards.domain_uri(local, 0, tmp_path) == str(tmp_path / "sh" / "p" / "a")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_round_trip_and_refusals(where: str, tmp_path: Path, request: pytest.FixtureRequest,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from orchestrator.checkpoint import LINEAGE_FILE, MODEL_FILE, load_checkpoint, write_checkpoint

    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    state = {"w": torch.arange(6.0).view(2, 3)}
    folder = write_checkpoint(join(base, "run", "stage-0"), state, [{"buf": torch.ones(2)}], {"stage": 0})
    model, strategies, lineage = load_checkpoint(folder)
    assert torch.equal(model["w"], state["w"]) and torch.equal(strategies[0]["buf"], torch.ones(2))
    assert lineage["stage"] == 0 and len(lineage["model_sha256"]) == 64
    with pytest.raises(FileExistsError, match="already exists"):
        write_checkpoint(folder, {"w": torch.zeros(1)}, [], {})
    assert torch.equal(load_checkpoint(folder)[0]["w"], state["w"])  # untouched
    # A write killed before its commit record leaves a checkpoint that every reader refuses.
    storage = Storage.from_settings()
    real = Storage.write_bytes

    def killed(self, uri, data, overwrite=False):  # noqa: ANN001 - dies just before lineage.json
        if uri.endswith(LINEAGE_FILE):
            raise KeyboardInterrupt("killed before the commit record")
        return real(self, uri, data, overwrite)

    half = join(base, "run", "stage-1")
    if where == "s3":
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(Storage, "write_bytes", killed)
            write_checkpoint(half, state, [], {"stage": 1})
        assert storage.exists(join(half, MODEL_FILE)) and not storage.exists(join(half, LINEAGE_FILE))
        with pytest.raises(FileNotFoundError, match="stage-1 is missing or incomplete"):
            load_checkpoint(half)
        write_checkpoint(half, state, [], {"stage": 1})  # the retry completes over the leftovers
        assert load_checkpoint(half)[2]["stage"] == 1
    # A model file that does not match its recorded digest is refused.
    storage.write_bytes(join(str(folder), MODEL_FILE), b"tampered", overwrite=True)
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_checkpoint(folder)
