"""The plain single-process PyTorch loop that ``bench_pipeline.py`` compares ``lifelong run`` with on Permuted-MNIST.

It does the work of the ``bench_scaling.py`` pipeline, with no Ray and no files: the same domains (the first 20,000
MNIST training images, each domain with its own pixel permutation, 18,000 rows for training and 2,000 for
validation, carved out exactly as ``lifelong shards`` does), the same initial model (MLP 784-400-400-10 built after
``torch.manual_seed(seed)``), Adam 1e-3, batch 128, 2 epochs per domain, finetuning, and the same T^2 + T evaluations
on the validation splits (row -1 for the initial model, then one row per domain).

Prints one JSON object: ``acc``, ``R``, ``b``, ``train_seconds`` (the training loops), ``epoch_seconds`` (every
epoch, in order), ``threads`` (torch's intra-op threads) and ``samples_per_second`` (training samples over training
seconds). The benchmark times the whole process from outside.

    .venv/bin/python tests/benchmarks/plain_permuted_mnist.py T [DATA_ROOT] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a file, this script's folder comes first on sys.path, where strategies.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator.models import MLP  # noqa: E402
from orchestrator.shards import load_raw, make_domain_splits  # noqa: E402
from orchestrator.spec import SourceSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def domains(T: int, data_root: Path) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each domain's train and val splits as ``([N, 784] float, [N] long)`` tensors."""
    raw = load_raw(SourceSpec(kind="mnist", path="mnist"), data_root)
    out = []
    for k in range(T):
        source = SourceSpec(kind="mnist", path="mnist", permutation_seed=k, max_rows=20000)
        splits = make_domain_splits(raw, source, f"perm-{k}")
        out.append({name: (torch.from_numpy(splits[name].x.astype(np.float32) / 255.0),
                           torch.from_numpy(splits[name].y)) for name in ("train", "val")})
    return out


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in batches of 2048."""
    x, y = data
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 2048]).argmax(1) == y[i:i + 2048]).sum()) for i in range(0, len(y), 2048))
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("T", type=int)
    parser.add_argument("data_root", nargs="?", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = domains(args.T, Path(args.data_root))
    torch.manual_seed(args.seed)
    model = MLP(784, [400, 400], 10)
    R, epoch_seconds, samples = [[accuracy(model, d["val"]) for d in data]], [], 0
    for d in data:
        x, y = d["train"]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            order = torch.randperm(len(y))
            for i in range(0, len(y), 128):
                idx = order[i:i + 128]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epoch_seconds.append(time.perf_counter() - t0)
            samples += len(y)
        model.eval()
        R.append([accuracy(model, e["val"]) for e in data])
    train = sum(epoch_seconds)
    print(json.dumps({"acc": float(np.mean(R[-1])), "R": R[1:], "b": R[0], "train_seconds": train,
                      "epoch_seconds": epoch_seconds, "threads": torch.get_num_threads(),
                      "samples_per_second": samples / train}))


if __name__ == "__main__":
    main()
