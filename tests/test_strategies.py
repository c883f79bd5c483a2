"""Strategies: their maths on tiny models, state round-trips, and correctness with 2 distributed workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from strategies import BUILTIN, Batch, LossTerms, StageContext, build_strategies, resolve_strategy, train_domains_of
from strategies.ewc import EWC, EWCConfig, diagonal_fisher, ewc_penalty
from strategies.buffer import fields_to_table, read_part, reservoir_update, table_to_fields, write_part
from strategies.replay import Replay, ReplayConfig, replay_count
from orchestrator import tensorfile
from orchestrator.errors import TrainingError
from orchestrator.stage import fit_task
from tests.ray_nodes import free_port
from strategies.finetune import Finetune


def make_data(n: int = 96, task: int = 0, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed + task)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * task
    return Batch(x, y, torch.full((n,), task))


def make_ctx(model: nn.Module, data: Batch, task: int = 0, world: int = 1, rank: int = 0,
             batch_size: int = 16) -> StageContext:
    def it() -> Iterator[Batch]:
        for i in range(0, len(data), batch_size):
            yield Batch(data.x[i:i + batch_size], data.y[i:i + batch_size], data.t[i:i + batch_size])

    return StageContext(model=model, train_model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                        task_id=task, num_tasks=2, head_mask=torch.ones(2, 4, dtype=torch.bool),
                        world_size=world, rank=rank, iter_task_batches=it)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


# ---------------------------------------------------------------- maths

def test_ewc_penalty_hand_computed() -> None:
    p = {"w": torch.tensor([1.0, 2.0])}
    f = {"w": torch.tensor([0.5, 2.0])}
    a = {"w": torch.tensor([0.0, 1.0])}
    assert ewc_penalty(p, f, a).item() == pytest.approx(0.5 * (0.5 * 1 + 2.0 * 1))


def test_fisher_is_the_mean_squared_per_sample_gradient() -> None:
    model = tiny_model()
    data = make_data(20)
    ctx = make_ctx(model, data)
    fisher = diagonal_fisher(ctx, chunk=7, max_samples=None)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(data)):
        model.zero_grad()
        nn.functional.cross_entropy(model(data.x[i:i + 1]), data.y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / len(data)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], atol=1e-6, rtol=1e-5)


def test_online_ewc_decays_and_keeps_one_anchor() -> None:
    model = tiny_model()
    ewc = EWC(EWCConfig(mode="online", decay=0.5, fisher_samples=None))
    ctx = make_ctx(model, make_data(32))
    ewc.after_task(ctx)
    f1 = {n: f.clone() for n, f in ewc.fishers[0].items()}
    ewc.after_task(ctx)  # same model, same data: F <- 0.5 F + F
    assert len(ewc.fishers) == len(ewc.anchors) == 1
    for n in f1:
        torch.testing.assert_close(ewc.fishers[0][n], 1.5 * f1[n])


def test_reservoir_keeps_capacity_and_is_uniform() -> None:
    rng = np.random.default_rng(0)
    counts = np.zeros(100)
    for _ in range(2000):
        slots = np.full(10, -1)
        n, size = 0, 0
        for start in range(0, 100, 16):
            writes, n, size = reservoir_update(n, size, 10, min(16, 100 - start), rng)
            for slot, i in writes:
                slots[slot] = start + i
        assert size == 10 and n == 100
        counts[slots] += 1
    # each of the 100 items should be kept with probability 10/100
    assert np.allclose(counts / 2000, 0.1, atol=0.03)


def test_replay_ratio_sets_the_buffer_share_of_each_batch() -> None:
    assert replay_count(128, 0.5) == 128
    assert replay_count(96, 0.25) == 32
    assert replay_count(128, 0.0) == 0
    replay = Replay(ReplayConfig(buffer_size=50, ratio=0.25))
    ctx = make_ctx(tiny_model(), make_data())
    replay.before_task(ctx)
    first = replay.train_batch(ctx, make_data(24))
    assert len(first) == 24  # empty buffer: nothing to replay yet
    mixed = replay.train_batch(ctx, make_data(24, seed=5))
    assert len(mixed) == 32 and replay.size == 48  # 8 of 32 = 25 % replayed


def test_joint_streams_all_domains_so_far() -> None:
    assert train_domains_of(build_strategies([("joint", {})]), 3) == [0, 1, 2, 3]
    assert train_domains_of(build_strategies([("finetune", {}), ("replay", {})]), 3) == [3]


def test_unknown_strategy_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope' \\(known: .*ewc.*replay"):
        resolve_strategy("nope")


# ---------------------------------------------------------------- state round-trip

def _roundtrip(state: dict) -> dict:
    """Through the checkpoint's strategy file: tensors plus JSON, no pickle."""
    return tensorfile.loads(tensorfile.dumps(state))


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


PARAMS = {"replay": {"buffer_size": 40}, "ewc": {"fisher_samples": None}}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_state_round_trip_across_stages(name: str) -> None:
    model = tiny_model()
    (s,) = build_strategies([(name, PARAMS.get(name, {}))])
    for task in range(2):
        fit_task(make_ctx(model, make_data(task=task), task=task), [s], epochs=1)
    state = s.state_dict()
    (restored,) = build_strategies([(name, PARAMS.get(name, {}))])
    restored.load_state_dict(_roundtrip(state))
    _assert_same(restored.state_dict(), state)
    if name == "ewc":
        assert len(state["fishers"]) == 2
        ctx = make_ctx(model, make_data(task=1), task=1)
        out = model(ctx.iter_task_batches().__next__().x)
        terms = [LossTerms(ce=torch.tensor(1.0)) for _ in range(2)]
        s.loss(ctx, make_data(), out, terms[0])
        restored.loss(ctx, make_data(), out, terms[1])
        assert terms[0].values["ewc"].item() > 0
        assert terms[0].total().item() == pytest.approx(terms[1].total().item())
    if name == "replay":
        assert len(state["y"]) == 40 and state["n_seen"] == 2 * 96
        ctx = make_ctx(model, make_data(task=2), task=1)
        restored.before_task(ctx)
        assert restored.size == 40 and set(restored.buffer.fields["t"][:40].tolist()) == {0, 1}


# ---------------------------------------------------------------- Parquet-backed buffers

def test_buffer_fields_round_trip_through_arrow() -> None:
    g = torch.Generator().manual_seed(0)
    fields = {"x": torch.rand(5, 1, 28, 28, generator=g), "y": torch.arange(5), "t": torch.zeros(5, dtype=torch.long),
              "logits": torch.randn(5, 10, generator=g)}
    back = table_to_fields(fields_to_table(fields))
    _assert_same(back, fields)
    assert back["x"].dtype == torch.float32 and back["y"].dtype == torch.int64


def test_buffer_part_write_is_atomic_and_never_overwrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from orchestrator.storage import Storage

    store = Storage()
    fields = {"x": torch.ones(3, 2), "y": torch.arange(3), "t": torch.zeros(3, dtype=torch.long)}
    real_mv = LocalFileSystem.mv

    def interrupted(self, src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003 - a crash as the part is committed
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(LocalFileSystem, "mv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_part(store, str(tmp_path / "buf"), 0, fields)
    assert [p.name for p in (tmp_path / "buf").iterdir()] == []  # no part and no temporary file left
    monkeypatch.setattr(LocalFileSystem, "mv", real_mv)
    uri = write_part(store, str(tmp_path / "buf"), 0, fields)
    _assert_same(read_part(store, uri), fields)
    with pytest.raises(FileExistsError, match="part-00000.parquet already exists"):
        write_part(store, str(tmp_path / "buf"), 0, {k: v * 0 for k, v in fields.items()})
    _assert_same(read_part(store, uri), fields)  # the first write survives
    (tmp_path / "buf" / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(OSError, match="part-00000.parquet cannot be read"):
        read_part(store, uri)


@pytest.mark.parametrize("name", ["replay", "derpp"])
def test_parquet_buffer_equals_the_in_memory_buffer(name: str, tmp_path: Path) -> None:
    states = {}
    for storage in ("memory", "parquet"):
        model = tiny_model()
        (s,) = build_strategies([(name, {"buffer_size": 40, "storage": storage})])
        for task in range(2):
            ctx = make_ctx(model, make_data(task=task), task=task)
            ctx.state_uri = str(tmp_path / storage / f"stage-{task}")
            fit_task(ctx, [s], epochs=1)
        ctx = make_ctx(model, make_data(task=2), task=1)
        s.before_task(ctx)  # the next stage's view of the buffer
        states[storage] = (s.state_dict(), s.buffer.local())
    memory, parquet = states["memory"], states["parquet"]
    assert [p["rows"] for p in parquet[0]["parts"]] == [40] and parquet[0]["n_seen"] == memory[0]["n_seen"] == 192
    assert "x" not in parquet[0]  # the checkpoint carries only the list of parts
    _assert_same(parquet[1], memory[1])


def test_parquet_buffer_needs_a_state_folder() -> None:
    (s,) = build_strategies([("replay", {"buffer_size": 8, "storage": "parquet"})])
    with pytest.raises(ValueError, match="storage 'parquet' needs the stage's state folder"):
        fit_task(make_ctx(tiny_model(), make_data(32)), [s], epochs=1)


# ---------------------------------------------------------------- two workers (gloo on loopback)

def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    data = make_data(64)
    shard = Batch(data.x[rank::world], data.y[rank::world], data.t[rank::world])
    ctx = make_ctx(model, shard, world=world, rank=rank)
    ewc = EWC(EWCConfig(fisher_samples=None))
    ewc.after_task(ctx)
    replay = Replay(ReplayConfig(buffer_size=20))
    replay.before_task(ctx)
    for b in ctx.iter_task_batches():
        replay.train_batch(ctx, b)
    replay.after_task(ctx)
    ctx.state_uri = str(Path(out_dir) / "state")
    replay_pq, agem = build_strategies([("replay", {"buffer_size": 20, "storage": "parquet"}),
                                        ("agem", {"buffer_size": 12})])
    for s in (replay_pq, agem):
        s.before_task(ctx)
        for b in ctx.iter_task_batches():
            s.train_batch(ctx, b)
        s.after_task(ctx)
    spg, mas, ncl, das = build_strategies([("spg", {}), ("mas", {"importance_samples": None}),
                                           ("ncl", {"fisher_samples": None}), ("das", {"importance_samples": None})])
    for s in (spg, mas, ncl, das):
        s.after_task(ctx)
    # SI's path integral needs training: DDP all-reduces the gradients of the two half-batches.
    si_model = tiny_model()
    ddp = torch.nn.parallel.DistributedDataParallel(si_model)
    si_ctx = make_ctx(si_model, shard, world=world, rank=rank, batch_size=8)
    si_ctx.train_model, si_ctx.optimizer = ddp, torch.optim.SGD(ddp.parameters(), lr=0.1)
    (si,) = build_strategies([("si", {})])
    fit_task(si_ctx, [si], epochs=2)
    torch.save({"ewc": ewc.state_dict(), "replay": replay.state_dict(), "spg": spg.state_dict(),
                "mas": mas.state_dict(), "ncl": ncl.state_dict(), "das": das.state_dict(), "si": si.state_dict(),
                "agem": agem.state_dict(), "replay_pq": replay_pq.state_dict(),
                "replay_pq_view": replay_pq.shared.worker_part(ctx, None, np.random.default_rng(0)).local()},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_workers_match_one_worker(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # Identical state on every worker after after_task (the view of the Parquet buffer is each worker's own rows).
    views = r0.pop("replay_pq_view"), r1.pop("replay_pq_view")
    _assert_same(r0, r1)
    # Fisher of 2 workers == Fisher of 1 worker on the same global samples.
    model = tiny_model()
    single = EWC(EWCConfig(fisher_samples=None))
    single.after_task(make_ctx(model, make_data(64)))
    for n, f in single.fishers[0].items():
        torch.testing.assert_close(r0["ewc"]["fishers"][0][n], f, atol=1e-5, rtol=1e-5)
    # SPG importance, MAS Omega and NCL precision of 2 workers == 1 worker on the same samples.
    spg, mas, ncl, das = build_strategies([("spg", {}), ("mas", {"importance_samples": None}),
                                           ("ncl", {"fisher_samples": None}), ("das", {"importance_samples": None})])
    for s in (spg, mas, ncl):
        s.after_task(make_ctx(model, make_data(64)))
    das.after_task(make_ctx(model, make_data(64), batch_size=32))  # global batch i = both workers' batch i
    for n, v in das.importance.items():
        torch.testing.assert_close(r0["das"]["importance"][n], v, atol=1e-5, rtol=1e-5)
    # SI of 2 DDP workers == SI of 1 process on the same global batches (rows 16i..16i+15 = both half-batches).
    si_model = tiny_model()
    data = make_data(64)
    halves = [Batch(data.x[r::2], data.y[r::2], data.t[r::2]) for r in range(2)]
    global_batches = [Batch(torch.cat([h.x[i:i + 8] for h in halves]), torch.cat([h.y[i:i + 8] for h in halves]),
                            torch.cat([h.t[i:i + 8] for h in halves])) for i in range(0, 32, 8)]
    si_ctx = make_ctx(si_model, data)
    si_ctx.optimizer = torch.optim.SGD(si_model.parameters(), lr=0.1)
    si_ctx.iter_task_batches = lambda: iter(global_batches)
    (si,) = build_strategies([("si", {})])
    fit_task(si_ctx, [si], epochs=2)
    for n, v in si.state_dict()["omega"].items():
        torch.testing.assert_close(r0["si"]["omega"][n], v, atol=1e-5, rtol=1e-4)
    # A-GEM's memory and the Parquet buffer are the same on both workers (checked above); the Parquet buffer is the
    # in-memory one, written as one part per worker.
    assert len(r0["agem"]["y"]) == 12
    assert sorted(p["rows"] for p in r0["replay_pq"]["parts"]) == [10, 10]
    for rank, view in enumerate(views):
        _assert_same({k: v for k, v in view.items() if k != "n_seen"},
                     {k: v[rank::2] for k, v in r0["replay"].items() if k != "n_seen"})
    for name, (A, G) in ncl.kron.items():
        torch.testing.assert_close(r0["ncl"]["kron"][name][0], A, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r0["ncl"]["kron"][name][1], G, atol=1e-5, rtol=1e-5)
    for n, v in spg.a_max.items():
        torch.testing.assert_close(r0["spg"]["a_max"][n], v, atol=1e-5, rtol=1e-5)
    for n, v in mas.omega.items():
        torch.testing.assert_close(r0["mas"]["omega"][n], v, atol=1e-5, rtol=1e-5)
    # The merged replay buffer holds 20 distinct samples of the stream, half from each worker's shard.
    buf = r0["replay"]
    assert len(buf["y"]) == 20 and buf["n_seen"] == 64
    data = make_data(64)
    rows = [int(((data.x - x).abs().sum(1) == 0).nonzero()[0]) for x in buf["x"]]
    assert len(set(rows)) == 20
    assert sum(r % 2 == 0 for r in rows) == 10


class _Diverge(Finetune):
    """A strategy whose loss turns NaN at the third step (stands in for a diverging run)."""

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        if ctx.step == 2:
            terms.scale("ce", float("nan"))


def test_nan_loss_names_domain_epoch_and_step() -> None:
    model = tiny_model()
    with pytest.raises(TrainingError, match=r"domain 1: loss is nan at epoch 0, step 2"):
        fit_task(make_ctx(model, make_data(task=1), task=1), [_Diverge(Finetune.Config())], epochs=1)
