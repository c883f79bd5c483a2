"""The plain single-process PyTorch loop that ``bench_pipeline.py`` compares ``lifelong run`` with on Split-MNIST.

It does the work of ``pipelines/split_mnist.yaml`` (Hsu et al. 2018 protocol), with no Ray and no files: 5 class-IL
domains of two digits (training rows carved exactly as ``lifelong shards`` does, 10% kept aside as val), the same
initial model (MLP 784-400-400-10 built after ``torch.manual_seed(seed)``), Adam 1e-3, batch 128, 4 epochs per
domain, and the same T^2 + T evaluations on the test splits (row -1 for the initial model). ``replay``: a reservoir
buffer of 1,100 samples filled during each domain's first epoch, and as many buffer samples as new ones appended to
every batch (replay ratio 0.5), as ``strategies/replay.py`` does.

Prints one JSON object: ``acc``, ``R``, ``b``, ``train_seconds``, ``epoch_seconds``, ``threads``,
``samples_per_second`` (new-domain training samples over training seconds).

    .venv/bin/python tests/benchmarks/plain_split_mnist.py finetune|replay [DATA_ROOT] [--seed S]
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


def domains(data_root: Path) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each domain's train and test splits as ``([N, 784] float, [N] long)`` tensors."""
    raw = load_raw(SourceSpec(kind="mnist", path="mnist"), data_root)
    out = []
    for k in range(5):
        source = SourceSpec(kind="mnist", path="mnist", classes=[2 * k, 2 * k + 1])
        splits = make_domain_splits(raw, source, f"digits-{2 * k}-{2 * k + 1}")
        out.append({name: (torch.from_numpy(splits[name].x.astype(np.float32) / 255.0),
                           torch.from_numpy(splits[name].y)) for name in ("train", "test")})
    return out


class Reservoir:
    """Vitter's Algorithm R over training samples, ``capacity`` of them."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.seen, self.rng = capacity, 0, np.random.default_rng(seed)
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []

    def offer(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer each row of ``x`` ``[B, D]`` with its label."""
        for row in range(len(y)):
            self.seen += 1
            if len(self.y) < self.capacity:
                self.x.append(x[row])
                self.y.append(y[row])
            else:
                slot = int(self.rng.integers(0, self.seen))
                if slot < self.capacity:
                    self.x[slot], self.y[slot] = x[row], y[row]

    def draw(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` samples drawn uniformly with replacement."""
        idx = torch.randint(0, len(self.y), (m,))
        return torch.stack(self.x)[idx], torch.stack(self.y)[idx]


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in batches of 2048."""
    x, y = data
    with torch.no_grad():
        correct = sum(int((model(x[i:i + 2048]).argmax(1) == y[i:i + 2048]).sum()) for i in range(0, len(y), 2048))
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategy", choices=["finetune", "replay"])
    parser.add_argument("data_root", nargs="?", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = domains(Path(args.data_root))
    torch.manual_seed(args.seed)
    model = MLP(784, [400, 400], 10)
    buffer = Reservoir(1100, args.seed)
    R, epoch_seconds, samples = [[accuracy(model, d["test"]) for d in data]], [], 0
    for d in data:
        x, y = d["train"]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for epoch in range(4):
            t0 = time.perf_counter()
            order = torch.randperm(len(y))
            for i in range(0, len(y), 128):
                idx = order[i:i + 128]
                xb, yb = x[idx], y[idx]
                if args.strategy == "replay":
                    if buffer.y:
                        bx, by = buffer.draw(len(idx))
                        xb, yb = torch.cat([xb, bx]), torch.cat([yb, by])
                    if epoch == 0:
                        buffer.offer(x[idx], y[idx])
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epoch_seconds.append(time.perf_counter() - t0)
            samples += len(y)
        model.eval()
        R.append([accuracy(model, e["test"]) for e in data])
    train = sum(epoch_seconds)
    print(json.dumps({"acc": float(np.mean(R[-1])), "R": R[1:], "b": R[0], "train_seconds": train,
                      "epoch_seconds": epoch_seconds, "threads": torch.get_num_threads(),
                      "samples_per_second": samples / train}))


if __name__ == "__main__":
    main()
