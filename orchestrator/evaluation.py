"""Evaluation actors: fill cells of the accuracy matrix beside training.

Each :class:`Evaluator` actor holds the evaluation splits of the domains it has been asked about (loaded once from
the shards, cached) and the model of the last checkpoint it evaluated. The driver sends it ``(checkpoint, row i,
domain j)`` cells through a ``ray.util.ActorPool``; with fractional CPUs the actors run while the next stage trains.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from orchestrator.checkpoint import load_checkpoint
from orchestrator.cpu import background_priority
from orchestrator.models import HeadLayout, build_model, masked_logits
from orchestrator.shards import read_split
from orchestrator.storage import Storage
from orchestrator.spec import ModelSpec
from strategies import build_strategies


class Evaluator:
    """Computes the accuracy of a checkpoint on one domain's evaluation split.

    Args:
        domains: ``(uri, manifest)`` of every domain, in stream order.
        split: ``"test"`` or ``"val"``. layout: the pipeline's head layout.
        model: the model spec. input_shape: ``(C, H, W)`` or ``(D,)``. scale: uint8 -> float factor.
        batch_size: evaluation batch size in samples.
        strategies: ``(name, params)`` of the pipeline's strategies; their state is loaded from each checkpoint and
            their ``inference_model`` hook picks the model that scores each domain.
        storage: how to reach the shard URIs (S3 endpoint and credentials).
    """

    def __init__(self, domains: list[tuple[str, dict[str, Any]]], split: str, layout: HeadLayout, model: ModelSpec,
                 input_shape: tuple[int, ...], scale: float, batch_size: int,
                 strategies: list[tuple[str, dict[str, Any]]], storage: Storage | None = None) -> None:
        background_priority()  # before torch starts its threads: they inherit it
        torch.set_num_threads(1)
        self.strategies = build_strategies(strategies)
        self.domains, self.split, self.layout, self.batch_size = domains, split, layout, batch_size
        self.input_shape, self.scale, self.storage = input_shape, scale, storage
        self.model = build_model(model, input_shape, layout.num_outputs).eval()
        self.loaded: str | None = None
        self.data: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.targets, self.mask = layout.target_table(), layout.head_mask()

    def _domain(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if j not in self.data:
            uri, manifest = self.domains[j]
            raw = read_split(uri, manifest, self.split, self.storage)
            x = torch.from_numpy(raw.x.reshape(len(raw.y), *self.input_shape).astype(np.float32)) * self.scale
            t = torch.full((len(raw.y),), j, dtype=torch.long)
            self.data[j] = (x, self.targets[t, torch.from_numpy(raw.y)], t)
        return self.data[j]

    def evaluate(self, checkpoint: str, row: int, j: int) -> dict[str, Any]:
        """Accuracy of ``checkpoint`` on domain j (task-IL: predictions restricted to domain j's head).

        Returns:
            ``{"row", "col", "acc" (fraction in [0, 1]), "n" (samples), "start", "end" (unix seconds)}``.
        """
        start = time.time()
        if self.loaded != checkpoint:
            model_state, strategy_states, _ = load_checkpoint(checkpoint, self.storage)
            self.model.load_state_dict(model_state)
            for s, state in zip(self.strategies, strategy_states):
                s.load_state_dict(state)
            self.loaded = checkpoint
        model = self.model
        for s in self.strategies:
            model = s.inference_model(model, j)
        x, y, t = self._domain(j)
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), self.batch_size):
                logits = masked_logits(model(x[i:i + self.batch_size]), t[i:i + self.batch_size], self.mask)
                correct += int((logits.argmax(1) == y[i:i + self.batch_size]).sum())
        return {"row": row, "col": j, "acc": correct / max(len(y), 1), "n": len(y), "start": start, "end": time.time()}


def make_evaluators(n: int, cpus: float, *args: Any) -> list[Any]:
    """Start ``n`` :class:`Evaluator` actors with ``cpus`` (fractional) CPUs each."""
    remote = ray.remote(num_cpus=cpus)(Evaluator)
    return [remote.remote(*args) for _ in range(n)]
