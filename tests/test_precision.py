"""The training step's precision: under ``training.precision: bf16`` the forward pass and the loss hooks see bfloat16
logits while weights and gradients stay float32 (the same code path as on a GPU, on CPU autocast); a pipeline refuses
GPUs that the cluster does not have."""

from __future__ import annotations

import pytest
import torch

from orchestrator.errors import LifelongError, SpecError
from orchestrator.plan import Resources, check_workers
from orchestrator.spec import validate_raw
from orchestrator.stage import train_step
from strategies import Batch, StageContext, Strategy
from strategies.base import LossTerms


class Recorder(Strategy):
    """Records the dtype of the logits the loss hooks see."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[torch.dtype] = []

    def loss(self, ctx: StageContext, batch: Batch, outputs: torch.Tensor, terms: LossTerms) -> None:
        self.seen.append(outputs.dtype)


@pytest.mark.parametrize("autocast, logits", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_bf16_autocast_covers_forward_and_loss_only(autocast: torch.dtype | None, logits: torch.dtype) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ctx = StageContext(model=model, train_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       task_id=0, num_tasks=1, head_mask=torch.ones(1, 4, dtype=torch.bool), autocast_dtype=autocast)
    batch = Batch(torch.randn(32, 8), torch.randint(0, 4, (32,)), torch.zeros(32, dtype=torch.long))
    recorder = Recorder()
    before = model[1].weight.detach().clone()
    loss = train_step(ctx, [recorder], batch)
    assert recorder.seen == [logits] and loss.dtype == torch.float32  # cross-entropy runs in float32 under autocast
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters())
    assert not torch.equal(model[1].weight, before)  # the step was taken


def pipeline(**sections: dict) -> dict:
    return {"name": "gpu", "domains": [{"name": "d0", "source": {"kind": "sklearn_digits", "classes": [0, 1]}}],
            **sections}


@pytest.mark.parametrize("training, evaluation, gpus", [
    ({"use_gpu": True, "num_workers": 2}, {}, "reserve 2 GPUs"),
    ({}, {"num_actors": 3, "gpus_per_actor": 0.5}, "reserve 1.5 GPUs"),
    ({"use_gpu": True}, {"num_actors": 4, "gpus_per_actor": 0.25}, "reserve 2 GPUs"),
])
def test_gpus_the_cluster_lacks_are_refused(training: dict, evaluation: dict, gpus: str) -> None:
    spec = validate_raw(pipeline(training=training, evaluation=evaluation), "test")
    t = spec.training
    resources = Resources(t.num_workers, t.cpus_per_worker, t.use_gpu, 1)
    with pytest.raises(LifelongError, match=f"{gpus}, this Ray cluster has 1;"):
        check_workers(resources, {"CPU": 16.0, "GPU": 1.0}, spec)
    check_workers(resources, {"CPU": 16.0, "GPU": 2.0}, spec)  # fits


def test_gpu_fields_are_checked() -> None:
    with pytest.raises(SpecError, match="gpus_per_actor"):
        validate_raw(pipeline(evaluation={"gpus_per_actor": 1.5}), "test")
    with pytest.raises(SpecError, match="precision"):
        validate_raw(pipeline(training={"precision": "fp8"}), "test")
