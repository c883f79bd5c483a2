"""Head layouts for task-, domain- and class-IL, and the models."""

import pytest
import torch

from orchestrator.models import HeadLayout, build_model, criterion, masked_logits
from orchestrator.spec import ModelSpec

SETS = [[0, 1], [2, 3], [4, 5]]


def test_class_il_single_head_over_union() -> None:
    lay = HeadLayout.build("class_il", SETS)
    assert lay.num_outputs == 6
    assert lay.target_table()[2, 5] == 5 and lay.target_table()[0, 3] == -1
    assert bool(lay.head_mask().all())


def test_domain_il_maps_each_domain_onto_one_head() -> None:
    lay = HeadLayout.build("domain_il", SETS)
    assert lay.num_outputs == 2
    assert lay.target_table()[1].tolist()[2:4] == [0, 1]


def test_task_il_masks_other_heads() -> None:
    lay = HeadLayout.build("task_il", SETS)
    assert lay.num_outputs == 6 and lay.offsets == (0, 2, 4)
    mask = lay.head_mask()
    logits = torch.zeros(2, 6)
    out = masked_logits(logits, torch.tensor([1, 2]), mask)
    assert torch.isinf(out[0, [0, 1, 4, 5]]).all() and torch.isfinite(out[0, 2:4]).all()
    # Cross-entropy over a 2-unit head with equal logits is log 2.
    loss = criterion(logits, torch.tensor([2, 5]), torch.tensor([1, 2]), mask)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_builtin_models_shapes() -> None:
    x = torch.rand(3, 1, 28, 28)
    assert build_model(ModelSpec(name="mlp", hidden=[16]), (1, 28, 28), 10)(x).shape == (3, 10)
    assert build_model(ModelSpec(name="cnn", channels=[4, 8]), (1, 28, 28), 7)(x).shape == (3, 7)


def test_user_factory_by_import_path() -> None:
    spec = ModelSpec(name="tests.user_model:tiny", params={"width": 5})
    model = build_model(spec, (1, 8, 8), 4)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 4)
