"""Text domains and language models: the user's CSV, JSON-lines and text files become token-block shards (cut into
domains by a column's values), a small GPT trains on them through `lifelong run` with the perplexity matrix P in the
report, learning-rate schedules follow their definitions, DAS's units cover attention heads and MLP neurons, and bad
text input is refused with one error line naming the file and column, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator import shards
from orchestrator.checkpoint import load_checkpoint
from orchestrator.errors import ShardError
from orchestrator.gpt import GPT
from orchestrator.metrics import lm_metrics
from orchestrator.schedules import lr_factor
from orchestrator.spec import ScheduleSpec, SourceSpec
from orchestrator.text import BYTE_VOCAB, load_tokenizer, pack, text_splits
from strategies.base import Batch, StageContext
from strategies.das import DAS, DASConfig
from strategies.units import gated, model_units
from tests.small_stream import run_is_refused

TOPICS = {
    "pets": ["the cat sat on the mat and purred", "a dog barked at the cat", "my kitten naps in the sun all day",
             "the puppy chased its tail around the garden"],
    "markets": ["stocks rose sharply as bond yields fell", "the central bank held interest rates steady",
                "shares of the firm dropped after weak earnings", "oil prices climbed on supply fears"],
}


def lifelong(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def write_csv(path: Path, per_topic: int = 48) -> Path:
    """A CSV with a header row (id, topic, title, body): ``per_topic`` documents per topic, interleaved."""
    import csv

    rng = np.random.default_rng(0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "topic", "title", "body"])
        for i in range(per_topic):
            for topic, sentences in TOPICS.items():
                body = " ".join(sentences[j] for j in rng.permutation(len(sentences)))
                writer.writerow([f"{topic}-{i}", topic, f"{topic} news {i}", body])
    return path


def text_pipeline(tmp_path: Path, csv_path: Path, strategy: object, evaluation: dict[str, object] | None = None,
                  **training: object) -> Path:
    source = {"kind": "csv", "path": str(csv_path), "text_columns": ["title", "body"], "context": 32}
    spec = {"name": "lm", "domains": [{"name": t, "source": {**source, "where": {"topic": t}}} for t in TOPICS],
            "model": {"name": "gpt", "layers": 1, "heads": 2, "width": 32}, "strategy": strategy,
            "training": {"epochs": 2, "batch_size": 16, "optimizer": {"lr": 0.003}, **training},
            "evaluation": {"num_actors": 1, "cpus_per_actor": 0.25, "split": "val", **(evaluation or {})}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def report_file(run_dir: Path) -> dict[str, object]:
    return json.loads((run_dir / "report.json").read_text())


def test_documents_are_packed_into_blocks_with_an_end_of_document_id() -> None:
    tokenizer = load_tokenizer("bytes", None)
    blocks = pack(["ab", "cde", "f"], tokenizer, context=3)
    assert blocks.dtype == np.uint16 and tokenizer.vocab_size == BYTE_VOCAB
    # a, b, EOS, c | d, e, EOS, f ; the trailing EOS is dropped (not a whole block)
    assert blocks.tolist() == [[97, 98, 256, 99], [100, 101, 256, 102]]


def test_a_csv_is_cut_into_domains_by_a_column_and_split_by_documents(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "news.csv")
    source = SourceSpec(kind="csv", path=str(csv_path), text_columns=["title", "body"], where={"topic": "pets"},
                        context=16)
    splits, record = text_splits(source, None, "pets")
    assert record == {"vocab_size": 257, "tokenizer": "bytes", "eos": 256, "context": 16}
    def text(split: str) -> str:
        return bytes(v for v in splits[split].x.ravel().tolist() if v < 256).decode(errors="replace")

    assert "cat" in text("train") and "stocks" not in text("train")  # only the pets rows
    # A document never lands in two splits: the titles ("pets news <i>") of train and test are disjoint.
    titles = {split: set(re.findall(r"pets news (\d+)\n", text(split))) for split in ("train", "test")}
    assert len(titles["train"]) > 20 and len(titles["test"]) > 3 and not titles["train"] & titles["test"]
    manifest = shards.build_domain(str(tmp_path / "out" / "pets"), "pets", source, None)
    assert manifest["schema"]["text"]["context"] == 16 and manifest["label_set"] == []
    assert manifest["schema"]["features"] == {"column": "x", "dtype": "uint16", "shape": [17], "scale": 1.0}
    shards.verify_domain(str(tmp_path / "out" / "pets"), shards.read_manifest(str(tmp_path / "out" / "pets")))
    back = shards.read_split(str(tmp_path / "out" / "pets"), manifest, "train")
    assert back.y is None and (back.x == splits["train"].x).all()


def test_a_hand_written_text_manifest_is_checked_against_its_blocks(tmp_path: Path) -> None:
    """A text manifest whose vocabulary is smaller than its ids (the embedding would fail on a worker) or whose
    features do not match its context is refused by `shards verify` / reading, naming the shard or field."""
    source = SourceSpec(kind="csv", path=str(write_csv(tmp_path / "news.csv")), text_columns=["body"], context=16)
    uri = tmp_path / "out" / "all"
    shards.build_domain(str(uri), "all", source, None)
    manifest = json.loads((uri / "manifest.json").read_text())
    manifest["schema"]["text"].update(vocab_size=200, eos=199)
    (uri / "manifest.json").write_text(json.dumps(manifest))
    proc = lifelong("shards", "verify", str(uri), cwd=tmp_path)
    assert proc.returncode == 2 and "token id 256 is outside the vocabulary of 200" in proc.stderr, proc.stderr
    assert "train/part-00000.parquet" in proc.stderr
    manifest["schema"]["text"].update(vocab_size=257, eos=256, context=32)
    (uri / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"schema: .*\[context \+ 1\] = \[33\]"):
        shards.read_manifest(str(uri))


def test_shards_build_names_text_domains_by_a_columns_values(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "news.csv")
    proc = lifelong("shards", "build", "--dataset", "csv", "--path", str(csv_path), "--text-column", "title",
                    "--text-column", "body", "--split-by", "topic", "--domain", "animals=pets", "--domain",
                    "money=markets", "--context", "16", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, topic in (("animals", "pets"), ("money", "markets")):
        manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())
        assert manifest["domain"] == name and manifest["source"]["where"] == {"topic": [topic]}
        assert manifest["schema"]["text"]["context"] == 16 and manifest["splits"]["train"]["rows"] > 0
    inspect = lifelong("shards", "inspect", str(tmp_path / "out" / "money"), cwd=tmp_path)
    assert inspect.returncode == 0 and "blocks of 16 + 1 token ids, vocabulary 257" in inspect.stdout, inspect.stderr
    missing = lifelong("shards", "build", "--dataset", "csv", "--path", str(csv_path), "--text-column", "title",
                       "--domain", "animals=pets", "--out", str(tmp_path / "out2"), cwd=tmp_path)
    assert missing.returncode == 2 and "--split-by" in missing.stderr and not (tmp_path / "out2").exists()


def test_jsonl_and_text_files_are_read_as_documents(tmp_path: Path) -> None:
    lines = [json.dumps({"text": s, "lang": "en"}) for s in TOPICS["pets"] * 10]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    splits, _ = text_splits(SourceSpec(kind="jsonl", path=str(tmp_path / "docs.jsonl"), text_columns=["text"],
                                       context=8), None, "j")
    assert len(splits["train"].x) > 0 and splits["train"].x.shape[1] == 9
    folder = tmp_path / "notes" / "deep"
    folder.mkdir(parents=True)
    for i, s in enumerate(TOPICS["markets"] * 5):
        (folder / f"{i}.txt").write_text(s)
    splits, _ = text_splits(SourceSpec(kind="text_files", path=str(tmp_path / "notes"), context=8), None, "t")
    assert b"stocks" in bytes(v for v in np.concatenate([splits[s].x.ravel() for s in splits]).tolist() if v < 256)


def test_a_text_file_that_is_not_utf8_or_a_missing_tokenizer_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("fine text " * 20)
    (tmp_path / "notes" / "b.txt").write_bytes(b"ok \xff\xfe then more")
    with pytest.raises(ShardError, match=r"b\.txt: not UTF-8 text: byte 0xff at offset 3"):
        text_splits(SourceSpec(kind="text_files", path=str(tmp_path / "notes"), context=8), None, "n")
    with pytest.raises(ShardError, match="cannot read tokenizer file .*nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"), None)


def test_a_tokenizer_file_given_by_path_tokenises_the_domain(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="comes with the hf extra (and the test extra)")
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(sorted({w for s in TOPICS["pets"]
                                                                              for w in s.split()}))}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "pets").mkdir()
    for i in range(20):
        (tmp_path / "pets" / f"{i}.txt").write_text(" ".join(TOPICS["pets"]))
    source = SourceSpec(kind="text_files", path=str(tmp_path / "pets"), tokenizer=str(tmp_path / "tok"), context=8)
    splits, record = text_splits(source, None, "pets")
    assert record == {"vocab_size": len(vocab), "tokenizer": str(tmp_path / "tok" / "tokenizer.json"), "eos": 1,
                      "context": 8}
    ids = np.concatenate([splits[s].x.ravel() for s in splits])
    assert ids.max() < len(vocab) and 0 not in ids and 1 in ids  # every word known; documents end with </s>
    assert splits["train"].x[0].tolist()[:3] == [vocab[w] for w in TOPICS["pets"][0].split()[:3]]


def test_the_infinite_and_cosine_schedules_follow_their_phases() -> None:
    cosine = ScheduleSpec(name="cosine", warmup_fraction=0.1, min_ratio=0.1)
    for stage in (0, 3):  # re-warmed and re-decayed at every stage
        factors = [lr_factor(cosine, stage, s, 100) for s in range(100)]
        assert factors[0] == pytest.approx(0.19) and factors[9] == pytest.approx(1.0)
        assert factors[-1] == pytest.approx(0.1, abs=0.01) and factors[50] > factors[80]
    infinite = ScheduleSpec(name="infinite", warmup_fraction=0.1, cooldown_fraction=0.2, constant_ratio=0.5,
                            min_ratio=0.05, anneal_fraction=0.1)
    first = [lr_factor(infinite, 0, s, 100) for s in range(100)]
    assert first[9] == pytest.approx(1.0) and first[29] == pytest.approx(0.5, abs=0.01)
    assert set(first[30:90]) == {0.5}  # constant after the cool-down
    assert first[-1] == pytest.approx(0.05) and all(a > b for a, b in zip(first[90:], first[91:]))  # annealing
    later = [lr_factor(infinite, 2, s, 100) for s in range(100)]
    assert set(later[:90]) == {0.5} and later[-1] == pytest.approx(0.05)  # no re-warming
    assert lr_factor(ScheduleSpec(), 1, 5, 100) == 1.0


def test_perplexity_metrics_measure_the_rise_on_earlier_domains() -> None:
    P = [[10.0, 30.0, 40.0], [14.0, 12.0, 35.0], [16.0, 13.0, 11.0]]
    m = lm_metrics(P, [100.0, 100.0, 100.0])
    assert m["avg_ppl"] == pytest.approx(40 / 3)
    assert m["ppl_rise"] == pytest.approx(((16 - 10) + (13 - 12)) / 2)
    assert m["ppl_forgetting"] == [pytest.approx(6.0), pytest.approx(1.0)]
    assert m["ppl_fwt"] == pytest.approx(((100 - 30) + (100 - 35)) / 2)


def test_gpt_units_are_heads_and_mlp_neurons_and_gate_them() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=50, context=8, layers=2, heads=4, width=16).eval()
    units = model_units(model)
    assert [(u.name, u.size) for u in units] == [("blocks.0.attn.heads", 4), ("blocks.0.fc", 64),
                                                 ("blocks.1.attn.heads", 4), ("blocks.1.fc", 64)]
    x = torch.randint(0, 50, (3, 8))
    full = model(x)
    assert full.shape == (3, 8, 50)
    with gated(units, {"blocks.0.attn.heads": torch.tensor([1.0, 1.0, 1.0, 1.0])}):
        assert torch.allclose(model(x), full)
    with gated(units, {"blocks.0.attn.heads": torch.tensor([1.0, 0.0, 1.0, 1.0])}):
        assert not torch.allclose(model(x), full)


def test_das_update_mask_holds_under_adam_where_the_gradient_mask_does_not() -> None:
    """One Adam step with head 0 of layer 0 fully important: masking its gradients by 1 - 0.999 leaves Adam's step
    unchanged (Adam divides it away), masking the update keeps the head's query rows almost still."""
    moved = {}
    for apply_to in ("gradient", "update"):
        torch.manual_seed(0)
        model = GPT(vocab=50, context=8, layers=1, heads=2, width=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        ctx = StageContext(model=model, train_model=model, optimizer=optimizer, task_id=1, num_tasks=2,
                           head_mask=torch.ones(2, 50, dtype=torch.bool))
        das = DAS(DASConfig(apply_to=apply_to))
        das.importance = {"blocks.0.attn.heads": torch.tensor([0.999, 0.0]), "blocks.0.fc": torch.zeros(32)}
        before = model.blocks[0].attn.q.weight.detach().clone()
        x = torch.randint(0, 50, (4, 9))
        batch = Batch(x[:, :-1], x[:, 1:], torch.ones(4, dtype=torch.long))
        ctx.criterion(model(batch.x), batch).backward()
        das.after_backward(ctx)
        optimizer.step()
        das.after_step(ctx)
        step = (model.blocks[0].attn.q.weight.detach() - before).abs()
        moved[apply_to] = (float(step[:4].max()), float(step[4:].max()))  # head 0's rows, head 1's rows
    assert moved["gradient"][0] > 0.5 * moved["gradient"][1]  # Adam undid the soft-mask
    assert moved["update"][0] < 0.01 * moved["update"][1]  # the masked step held


@pytest.mark.e2e
def test_a_csv_text_stream_split_by_a_column_runs_continual_pre_training(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "news.csv")
    path = text_pipeline(tmp_path, csv_path, [{"name": "replay", "fraction": 0.05, "ratio": 0.25},
                                              {"name": "das", "apply_to": "update", "importance_samples": 64}],
                         evaluation={"every_n_steps": 4, "subsample": 32}, lr_schedule={"name": "cosine"})
    proc = lifelong("run", str(path), "--json", "--no-progress", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["domains"] == ["pets", "markets"] and report["strategy"] == "replay+das"
    P, b = report["P"], report["P_b"]
    assert len(P) == 2 and all(len(row) == 2 for row in P)
    assert P[0][0] < 0.5 * b[0] and P[1][1] < 0.5 * b[1]  # each domain learnt (b: the untrained model, ~257)
    assert report["avg_ppl"] == pytest.approx(sum(P[1]) / 2)
    assert report["bits_per_token"] == pytest.approx(
        sum(math.log2(p) for p in P[1]) / 2, rel=1e-6)
    run_dir = Path(report["run_dir"])
    for name in ("perplexity_matrix.png", "perplexity_matrix.json", "lr_schedule.png", "continual_evaluation.png"):
        assert (run_dir / name).stat().st_size > 0, name
    # Continual evaluation on text: perplexity on the first domain's subsample while the second trains.
    gap = report_file(run_dir)["stability"]
    assert gap["max_ppl"] > 1.0 and gap["task_end_ppl"] > 1.0
    assert gap["gap"] == pytest.approx(gap["max_ppl"] - gap["task_end_ppl"])
    assert "Perplexity matrix P" in proc.stderr  # the tables go to stderr under --json


@pytest.mark.parametrize("spoil, culprits", [
    ("missing column", ["news.csv", "text column 'body'"]),
    ("not utf-8", ["news.csv", "not UTF-8", "offset"]),
    ("empty domain", ["domain 'pets'", "no documents", "where"]),
    ("missing where column", ["news.csv", "where column 'topic'"]),
    ("a classification-only strategy", ["strategy.0", "'lwf' does not work on language models"]),
    ("a classifier", ["model.name mlp is a classifier", "holds text"]),
])
def test_bad_text_input_is_refused_naming_the_file_and_column(tmp_path: Path, spoil: str,
                                                               culprits: list[str]) -> None:
    data_spoiled = spoil not in ("a classification-only strategy", "a classifier")
    csv_path = write_csv(tmp_path / "news.csv", per_topic=4 if data_spoiled else 48)
    path = text_pipeline(tmp_path, csv_path, "finetune")
    text = csv_path.read_text()
    if spoil == "missing column":
        csv_path.write_text(text.replace("title,body", "title,content", 1))
    elif spoil == "not utf-8":
        csv_path.write_bytes(text.encode()[:200] + b"caf\xe9" + text.encode()[200:])
    elif spoil == "empty domain":
        csv_path.write_text(text.replace(",pets,", ",cats,"))
    elif spoil == "missing where column":
        csv_path.write_text(text.replace("id,topic", "id,subject", 1))
    else:
        spec = yaml.safe_load(path.read_text())
        spec.update(strategy="lwf") if spoil == "a classification-only strategy" else spec.update(model={"name": "mlp"})
        path.write_text(yaml.safe_dump(spec))
    proc = lifelong("run", str(path), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    error = run_is_refused(proc, culprits, tmp_path / "w", "lm", shards_kept=not data_spoiled)
    if spoil == "not utf-8":
        assert "offset 203" in error and "0xe9" in error


@pytest.mark.e2e
def test_a_tiny_hugging_face_gpt2_built_from_a_config_runs_two_domains(tmp_path: Path) -> None:
    """Acceptance 4: ``model: {name: hf, hf: {config: ...}}`` (random weights, nothing downloaded) through the same
    stages, with DAS masking its heads and MLP neurons."""
    pytest.importorskip("transformers", reason="the hf extra (pip install 'lifelong[hf]'); the test extra has it")
    csv_path = write_csv(tmp_path / "news.csv", per_topic=24)
    path = text_pipeline(tmp_path, csv_path, [{"name": "das", "importance_samples": 32}], epochs=1)
    spec = yaml.safe_load(path.read_text())
    spec["model"] = {"name": "hf", "hf": {"config": {"model_type": "gpt2", "vocab_size": 257, "n_positions": 32,
                                                     "n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 256,
                                                     "eos_token_id": 256}}}
    path.write_text(yaml.safe_dump(spec))
    proc = lifelong("run", str(path), "--json", "--no-progress", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    P, b = report["P"], report["P_b"]
    assert len(P) == 2 and P[0][0] < 0.5 * b[0] and P[1][1] < 0.5 * b[1]
    _, states, _ = load_checkpoint(report["stages"][1]["checkpoint"])
    importance = states[0]["importance"]
    heads = [f"lm.transformer.h.{i}.attn.c_proj.heads_gate" for i in range(2)]
    assert sorted(importance) == sorted([*heads, "lm.transformer.h.0.mlp.c_fc", "lm.transformer.h.1.mlp.c_fc"])
    assert importance[heads[0]].shape == (2,) and float(importance["lm.transformer.h.0.mlp.c_fc"].max()) > 0


@pytest.mark.parametrize("names", [["finetune"], ["replay"], ["das"], ["ewc"], ["spg"], ["si"], ["mas"], ["ncl"],
                                   ["derpp"], ["agem"], ["gem"], ["packnet"], ["joint"], ["replay", "das"]])
def test_strategies_train_a_language_model_over_two_domains(names: list[str]) -> None:
    """Each strategy that claims text (``supports_text``) goes through two stages of a tiny GPT: its hooks accept
    ``[B, L, V]`` logits, its state carries over, and the loss is finite."""
    from orchestrator.stage import fit_task
    from strategies import bind_strategies

    torch.manual_seed(0)
    model = GPT(vocab=50, context=16, layers=1, heads=2, width=16)
    bound = bind_strategies([(n, {}) for n in names])
    assert all(b.cls.supports_text for b in bound)
    states: list[dict[str, object]] = [{} for _ in bound]
    for t in range(2):
        def batches(t: int = t) -> object:
            g = torch.Generator().manual_seed(t)
            for _ in range(4):
                x = torch.randint(0, 50, (8, 17), generator=g)
                yield Batch(x[:, :-1], x[:, 1:], torch.full((8,), t))

        strategies = [b.build() for b in bound]
        for s, state in zip(strategies, states):
            s.load_state_dict(state)
        ctx = StageContext(model=model, train_model=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3),
                           task_id=t, num_tasks=2, head_mask=torch.ones(2, 50, dtype=torch.bool),
                           iter_task_batches=batches, target_table=torch.full((2, 1), -1))
        stats = fit_task(ctx, strategies, epochs=1)
        assert all(math.isfinite(v) for v in stats["epoch_loss"])
        assert stats["samples"] == 32 * len(stats["epoch_loss"])  # PackNet adds its retraining epochs
        states = [s.state_dict() for s in strategies]
