"""The maths of the CL methods, checked by hand on tiny tensors and models (issue 3)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.stage import fit_task
from strategies import Batch, LossTerms, StageContext, Strategy, build_strategies
from strategies.agem import AGEM, AGEMConfig, agem_project, balance_memory
from strategies.das import gate_importance, loss_objective
from strategies.derpp import DERPP, DERPPConfig
from strategies.gem import gem_project
from strategies.hat import anneal
from strategies.lwf import add_kd_loss, extend_loss, kd_loss, merge_heads, old_units
from strategies.mas import mas_importance
from strategies.ncl import NCLConfig, kron_inverse_apply, trust_region
from strategies.packnet import prune_free
from strategies.si import SI, SIConfig, si_importance
from strategies.spg import (
    SPG,
    SPGConfig,
    accumulate_importance,
    head_names,
    soft_mask,
    standardized_importance,
    strengthen,
)


def total_loss(strategy: Strategy, ctx: StageContext, batch: Batch, out: torch.Tensor,
               ce: torch.Tensor | None = None) -> torch.Tensor:
    """The step's loss with ``strategy``'s ``loss`` hook applied to ``ce`` (default: the stage's cross-entropy)."""
    terms = LossTerms(ce=ctx.criterion(out, batch) if ce is None else ce)
    strategy.loss(ctx, batch, out, terms)
    return terms.total()


def ctx_for(model: nn.Module, batches: list[Batch], task: int = 0, tasks: int = 2, width: int = 4) -> StageContext:
    return StageContext(model=model, train_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        task_id=task, num_tasks=tasks, head_mask=torch.ones(tasks, width, dtype=torch.bool),
                        iter_task_batches=lambda: iter(batches))


# ---------------------------------------------------------------- A-GEM

def test_agem_projection_has_non_negative_dot_with_reference() -> None:
    g, g_ref = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    assert torch.dot(g, g_ref) < 0
    proj = agem_project(g, g_ref)
    assert torch.dot(proj, g_ref).item() == pytest.approx(0.0, abs=1e-6)
    # hand computation: g - (g.g_ref / g_ref.g_ref) g_ref = g - (-1.5 / 2) g_ref
    torch.testing.assert_close(proj, torch.tensor([1.0, -1.25, 1.25]))


def test_agem_leaves_non_conflicting_gradients_unchanged() -> None:
    g, g_ref = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1])
    assert agem_project(g, g_ref) is g


def test_agem_memory_is_balanced_across_tasks() -> None:
    old = {"x": torch.zeros(6, 2), "y": torch.zeros(6, dtype=torch.long), "t": torch.zeros(6, dtype=torch.long),
           "n_seen": 100}
    new = {"x": torch.ones(4, 2), "y": torch.ones(4, dtype=torch.long), "t": torch.ones(4, dtype=torch.long),
           "n_seen": 50}
    mem = balance_memory(old, new, capacity=6)
    assert mem["t"].tolist() == [0, 0, 0, 1, 1, 1] and mem["n_seen"] == 150


def test_agem_step_projects_against_memory() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    agem = AGEM(AGEMConfig(buffer_size=8, sample_size=8))
    mem = Batch(torch.randn(8, 3), torch.randint(0, 4, (8,)), torch.zeros(8, dtype=torch.long))
    agem.memory = {"x": mem.x, "y": mem.y, "t": mem.t, "n_seen": 8}
    ctx = ctx_for(model, [])
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(ctx.criterion(model(mem.x), mem), model.parameters())])
    for p in model.parameters():  # a gradient that points against the memory's gradient
        p.grad = torch.zeros_like(p)
    offset = 0
    for p in model.parameters():
        p.grad.copy_(-ref[offset:offset + p.numel()].view_as(p) + 0.01)
        offset += p.numel()
    agem.after_backward(ctx)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.dot(g, ref).item() >= -1e-5 and agem.projected == 1


# ---------------------------------------------------------------- SPG

def test_spg_importance_is_standardised_tanh() -> None:
    g = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z = (g - g.mean()) / g.std()
    torch.testing.assert_close(standardized_importance(g), torch.tanh(z).abs())
    assert standardized_importance(torch.zeros(3)).sum() == 0
    imp = standardized_importance(torch.randn(100))
    assert bool(((imp >= 0) & (imp < 1)).all())


def test_spg_masked_gradient_and_max_accumulation() -> None:
    g, imp = torch.tensor([2.0, -4.0, 1.0]), torch.tensor([0.0, 0.75, 0.5])
    torch.testing.assert_close(soft_mask(g, imp), torch.tensor([2.0, -1.0, 0.5]))
    a = accumulate_importance({"w": torch.tensor([0.1, 0.9])}, {"w": torch.tensor([0.5, 0.2])})
    torch.testing.assert_close(a["w"], torch.tensor([0.5, 0.9]))


def test_spg_masks_body_by_importance_and_head_by_mean() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    spg = SPG(SPGConfig())
    assert head_names(model, None) == {"2.weight", "2.bias"}
    spg.a_max = {"0.weight": torch.full((5, 3), 0.25), "0.bias": torch.full((5,), 0.75)}
    ctx = ctx_for(model, [])
    spg.before_task(ctx)
    assert spg.head_factor == pytest.approx(1 - (15 * 0.25 + 5 * 0.75) / 20)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    spg.after_backward(ctx)
    torch.testing.assert_close(model[0].weight.grad, torch.full((5, 3), 0.75))
    torch.testing.assert_close(model[0].bias.grad, torch.full((5,), 0.25))
    torch.testing.assert_close(model[2].weight.grad, torch.full((4, 5), spg.head_factor))


@pytest.mark.parametrize("strength, body, bias", [(0.0, 1.0, 1.0), (2.0, 0.5, 0.0), (4.0, 0.0, 0.0)])
def test_spg_strength_scales_the_importance_before_the_gate(strength: float, body: float, bias: float) -> None:
    torch.testing.assert_close(strengthen(torch.tensor([0.25, 0.75]), strength),
                               torch.tensor([0.25, 0.75]).mul(strength).clamp(max=1.0))
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    spg = SPG(SPGConfig(strength=strength))
    spg.a_max = {"0.weight": torch.full((5, 3), 0.25), "0.bias": torch.full((5,), 0.75)}
    ctx = ctx_for(model, [])
    spg.before_task(ctx)
    assert spg.head_factor == pytest.approx(1 - (15 * body_gate(strength, 0.25) + 5 * body_gate(strength, 0.75)) / 20)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    spg.after_backward(ctx)
    torch.testing.assert_close(model[0].weight.grad, torch.full((5, 3), body))
    torch.testing.assert_close(model[0].bias.grad, torch.full((5,), bias))


def body_gate(strength: float, importance: float) -> float:
    return min(1.0, strength * importance)


def test_das_strength_scales_the_unit_importance() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    (das,) = build_strategies([("das", {"protect_initial": False, "strength": 2.0})])
    das.importance = {"0": torch.tensor([0.0, 0.5, 1.0, 0.25])}
    das.after_backward(ctx_for(model, [], tasks=1, width=2))
    torch.testing.assert_close(model[0].bias.grad, torch.tensor([1.0, 0.0, 0.0, 0.5]))


def test_spg_after_task_accumulates_by_max() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    data = [Batch(torch.randn(16, 3), torch.randint(0, 4, (16,)), torch.zeros(16, dtype=torch.long))]
    spg = SPG(SPGConfig())
    spg.before_task(ctx_for(model, data))
    spg.after_task(ctx_for(model, data))
    first = {n: v.clone() for n, v in spg.a_max.items()}
    assert set(first) == {"0.weight", "0.bias"}
    data2 = [Batch(torch.randn(16, 3), torch.randint(0, 4, (16,)), torch.ones(16, dtype=torch.long))]
    spg.after_task(ctx_for(model, data2, task=1))
    for n in first:
        assert bool((spg.a_max[n] >= first[n]).all())


# ---------------------------------------------------------------- LwF / KD

def test_kd_loss_equals_hand_computation() -> None:
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    T = 2.0
    p = [math.exp(0) / (math.exp(0) + math.exp(0.5)), math.exp(0.5) / (math.exp(0) + math.exp(0.5))]
    q = [math.exp(0.5) / (math.exp(0.5) + math.exp(0)), math.exp(0) / (math.exp(0.5) + math.exp(0))]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kd_loss(student, teacher, T).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert kd_loss(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


def test_lwf_old_units_follow_the_heads() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert old_units(mask, 0).tolist() == [False] * 4
    assert old_units(mask, 1).tolist() == [True, True, False, False]


def test_lwf_adds_distillation_only_after_the_first_task() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    (lwf,) = build_strategies([("lwf", {"alpha": 2.0, "temperature": 1.0})])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    ctx = ctx_for(model, [], task=1)
    ctx.head_mask = mask
    lwf.before_task(ctx)
    with torch.no_grad():
        model.weight.add_(0.5)  # the student drifts from the teacher
    x = torch.randn(5, 3)
    batch = Batch(x, torch.full((5,), 2), torch.ones(5, dtype=torch.long))
    out = model(x)
    expected = 1.0 + 2.0 * kd_loss(out[:, :2], lwf.teacher(x)[:, :2], 1.0)
    assert total_loss(lwf, ctx, batch, out, ce=torch.tensor(1.0)).item() == pytest.approx(expected.item())


def lwf_ctx(model: nn.Module, scenario: str, label_sets: list[list[int]], task: int) -> StageContext:
    from orchestrator.models import HeadLayout

    layout = HeadLayout.build(scenario, label_sets)
    return StageContext(model=model, train_model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        task_id=task, num_tasks=len(label_sets), head_mask=layout.head_mask(),
                        domain_units=layout.domain_units(), target_table=layout.target_table())


def test_lwf_extend_routes_old_and_other_samples_to_kd_and_new_ones_to_ce() -> None:
    # Label 0 is "O" in every domain; class-IL units = labels. Domain 1 brings class 2; class 3 comes later.
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    (lwf,) = build_strategies([("lwf", {"head": "extend", "other_label": 0, "temperature": 2.0})])
    ctx = lwf_ctx(model, "class_il", [[0, 1], [0, 2], [0, 3]], task=1)
    lwf.before_task(ctx)
    assert lwf.units.tolist() == [True, True, False, False] and lwf.active.tolist() == [True, True, True, False]
    with torch.no_grad():
        model.weight.add_(0.3)
    x = torch.randn(3, 3)
    y = torch.tensor([0, 2, 1])  # O, new class, old class
    batch = Batch(x, y, torch.ones(3, dtype=torch.long))
    out = model(x)
    teacher = lwf.teacher(x)
    # by hand: CE of sample 1 over units {0, 1, 2}; KL of samples 0 and 2 over units {0, 1}; both per-sample means
    ce_1 = -torch.log_softmax(out[1, :3], 0)[2]
    pt = torch.softmax(teacher[[0, 2]][:, :2] / 2, 1)
    kl = (pt * (pt.log() - torch.log_softmax(out[[0, 2]][:, :2] / 2, 1))).sum(1)
    expected = ce_1 / 3 + 4.0 * kl.sum() / 3
    total = total_loss(lwf, ctx, batch, out)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    ce, kd = extend_loss(out, teacher, y, lwf.units, lwf.active, 2.0)
    assert (ce + kd).item() == pytest.approx(expected.item(), rel=1e-5)
    # the layer has not grown unit 3 yet: it gets no gradient (as if absent) and inference masks it
    total.backward()
    assert float(model.weight.grad[3].abs().sum()) == 0.0 and float(model.bias.grad[3]) == 0.0
    assert float(model.weight.grad[2].abs().sum()) > 0.0
    assert lwf.inference_model(model, 0)(x)[:, 3].isinf().all()
    restored = build_strategies([("lwf", {"head": "extend"})])[0]
    restored.load_state_dict(lwf.state_dict())
    assert restored.inference_model(model, 0)(x)[:, 3].isinf().all()


def test_lwf_extend_first_domain_is_plain_cross_entropy_over_its_units() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    (lwf,) = build_strategies([("lwf", {"head": "extend"})])
    ctx = lwf_ctx(model, "class_il", [[0, 1], [2, 3]], task=0)
    lwf.before_task(ctx)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    out = model(x)
    batch = Batch(x, y, torch.zeros(4, dtype=torch.long))
    expected = nn.functional.cross_entropy(out[:, :2], y)
    assert total_loss(lwf, ctx, batch, out).item() == pytest.approx(expected.item(), rel=1e-6)


def test_lwf_add_distils_each_old_head_with_its_own_softmax() -> None:
    # task-IL heads over [O, class]: head 0 = units {0, 1}, head 1 = {2, 3}, head 2 = {4, 5}
    torch.manual_seed(0)
    model = nn.Linear(3, 6)
    (lwf,) = build_strategies([("lwf", {"head": "add", "other_label": 0, "alpha": 0.5, "temperature": 1.0})])
    ctx = lwf_ctx(model, "task_il", [[0, 1], [0, 2], [0, 3]], task=2)
    lwf.before_task(ctx)
    assert lwf.heads.tolist() == [[True, True, False, False, False, False], [False, False, True, True, False, False]]
    with torch.no_grad():
        model.weight.add_(0.2)
    x = torch.randn(5, 3)
    batch = Batch(x, torch.tensor([4, 5, 4, 4, 5]), torch.full((5,), 2))
    out, teacher = model(x), lwf.teacher(x)
    kd = kd_loss(out[:, :2], teacher[:, :2], 1.0) + kd_loss(out[:, 2:4], teacher[:, 2:4], 1.0)
    assert add_kd_loss(out, teacher, lwf.heads, 1.0).item() == pytest.approx(kd.item(), rel=1e-6)
    ce = ctx.criterion(out, batch)
    assert total_loss(lwf, ctx, batch, out).item() == pytest.approx((ce + 0.5 * kd).item(), rel=1e-6)


def test_merge_heads_picks_o_unless_a_head_claims_a_class() -> None:
    heads = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    other = torch.tensor([0, 2])
    logits = torch.tensor([[3.0, 0.0, 3.0, 0.0],    # both heads say O -> O
                           [3.0, 0.0, 0.0, 2.0],    # head 1 claims its class (p = 0.88) -> unit 3
                           [0.0, 1.0, 0.0, 3.0],    # both claim: head 0 p = 0.73, head 1 p = 0.95 -> unit 3
                           [0.0, 4.0, 0.0, 1.0]])   # both claim: head 0 p = 0.98 -> unit 1
    assert merge_heads(logits, heads, other).tolist() == [0, 3, 3, 1]


def test_lwf_head_growth_checks_the_layout_and_the_other_label() -> None:
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="class-IL"):
        build_strategies([("lwf", {"head": "extend"})])[0].before_task(lwf_ctx(model, "task_il", [[0, 1], [2, 3]], 1))
    with pytest.raises(ValueError, match="task-IL"):
        build_strategies([("lwf", {"head": "add"})])[0].before_task(lwf_ctx(model, "class_il", [[0, 1], [2, 3]], 1))
    with pytest.raises(ValueError, match="other_label 0"):
        build_strategies([("lwf", {"head": "extend", "other_label": 0})])[0].before_task(
            lwf_ctx(model, "class_il", [[0, 1], [2, 3]], 1))


def test_lwf_task_weighting_follows_van_de_ven() -> None:
    model = nn.Linear(3, 6)
    (lwf,) = build_strategies([("lwf", {"weighting": "tasks"})])
    lwf.before_task(lwf_ctx(model, "class_il", [[0, 1], [2, 3], [4, 5]], 2))
    assert lwf.weights == pytest.approx((2 / 3, 1 / 3))


# ---------------------------------------------------------------- SI and MAS

def test_si_importance_hand_computed() -> None:
    omega = {"w": torch.tensor([0.2, 0.0, 0.3])}
    delta = {"w": torch.tensor([0.1, 0.5, 0.0])}
    torch.testing.assert_close(si_importance(omega, delta, 0.1)["w"], torch.tensor([0.2 / 0.11, 0.0, 3.0]))


def test_si_path_integral_tracks_minus_grad_times_step() -> None:
    model = nn.Linear(2, 1, bias=False)
    si = SI(SIConfig())
    ctx = ctx_for(model, [], width=1)
    si.before_task(ctx)
    model.weight.grad = torch.tensor([[1.0, -2.0]])
    si.after_backward(ctx)
    ctx.optimizer.step()  # SGD lr 0.1: delta = -0.1 * grad
    si.after_step(ctx)
    torch.testing.assert_close(si.path["weight"], torch.tensor([[0.1, 0.4]]))  # -g * delta = 0.1 * g^2


def test_mas_importance_is_mean_abs_gradient_of_output_norm() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    batch = Batch(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    omega = mas_importance(ctx_for(model, [batch], tasks=1, width=2), chunk=1, max_samples=None)
    # d ||Wx||^2 / dW = 2 (Wx) x^T; mean of |.| over the two samples
    expected = sum((2 * torch.outer(model.weight @ xi, xi)).abs() for xi in x) / 2
    torch.testing.assert_close(omega["weight"], expected.detach())


# ---------------------------------------------------------------- DER++

def test_derpp_loss_hand_computed() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    der = DERPP(DERPPConfig(buffer_size=10, alpha=0.3, beta=0.7, replay_batch=2))
    ctx = ctx_for(model, [], tasks=1)
    der.before_task(ctx)
    stored = Batch(torch.randn(10, 3), torch.randint(0, 4, (10,)), torch.zeros(10, dtype=torch.long))
    der.buffer.insert({"x": stored.x, "y": stored.y, "t": stored.t, "logits": torch.randn(10, 4)})
    new = Batch(torch.randn(5, 3), torch.randint(0, 4, (5,)), torch.zeros(5, dtype=torch.long))
    batch = der.train_batch(ctx, new)
    assert len(batch) == 5 + 2 + 2
    out = model(batch.x)
    total = total_loss(der, ctx, batch, out)
    first, second = der.drawn
    expected = (nn.functional.cross_entropy(out[:5], new.y)
                + 0.3 * nn.functional.mse_loss(out[5:7], first["logits"])
                + 0.7 * nn.functional.cross_entropy(out[7:9], second["y"]))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert der.buffer.n_seen == 15  # the new samples were offered with their logits


# ---------------------------------------------------------------- GEM

def test_gem_with_one_constraint_equals_agem_projection() -> None:
    g, g_ref = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(gem_project(g, g_ref[None], margin=0.0, eps=0.0), agem_project(g, g_ref))


def test_gem_projection_satisfies_every_constraint() -> None:
    torch.manual_seed(0)
    G = torch.randn(4, 10)
    g = -G.sum(0) + 0.1 * torch.randn(10)  # conflicts with the earlier tasks
    assert bool((G @ g < 0).any())
    for margin in (0.0, 0.5):
        proj = gem_project(g, G, margin=margin, eps=0.0)
        assert bool((G @ proj >= -1e-5).all())
    rows = torch.eye(10)[:4]  # orthonormal task gradients; a gradient with non-negative dots is left alone
    feasible = torch.linspace(0.1, 1.0, 10)
    assert gem_project(feasible, rows, 0.5, 1e-3) is feasible


# ---------------------------------------------------------------- PackNet

def test_packnet_prunes_the_smallest_free_weights() -> None:
    w = torch.tensor([0.1, -0.5, 0.2, 0.9, -0.05, 0.3])
    owner = torch.tensor([0, -1, -1, -1, -1, -1], dtype=torch.int16)
    new = prune_free(w, owner, task_id=1, ratio=0.4)  # 5 free weights, 2 released: |-0.05| and |0.2|
    assert new.tolist() == [0, 1, -1, 1, -1, 1]


def two_head_task(task: int, n: int) -> list[Batch]:
    """Task ``task`` of a two-head toy stream: label = sign of input feature ``task``, on head ``task``'s units
    (``2 * task`` and ``2 * task + 1``); ``n`` samples in batches of 16."""
    g = torch.Generator().manual_seed(task)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, task] > 0).long() + 2 * task
    return [Batch(x[i:i + 16], y[i:i + 16], torch.full((16,), task)) for i in range(0, n, 16)]


def test_packnet_never_changes_a_weight_an_earlier_task_owns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    head_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    (pack,) = build_strategies([("packnet", {"prune_ratio": 0.5, "retrain_epochs": 1})])

    def ctx(task: int) -> StageContext:
        c = ctx_for(model, two_head_task(task, 64), task=task)
        c.head_mask = head_mask
        c.optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        return c

    fit_task(ctx(0), [pack], epochs=2)
    owned0 = pack.owner["0.weight"] == 0
    assert 0 < int(owned0.sum()) < owned0.numel()
    before = model[0].weight.detach().clone()
    probe = two_head_task(0, 64)[0]
    out0 = pack.inference_model(model, 0)(probe.x)[:, :2].detach()
    fit_task(ctx(1), [pack], epochs=2)
    after = model[0].weight.detach()
    assert torch.equal(after[owned0], before[owned0])  # bit-for-bit
    assert not torch.equal(after, before)  # task 1 did train the free weights
    assert bool(((pack.owner["0.weight"] == 1) & owned0).sum() == 0)
    torch.testing.assert_close(pack.inference_model(model, 0)(probe.x)[:, :2], out0)  # task 0 is fully remembered


# ---------------------------------------------------------------- DAS (units)

def test_das_importance_is_normalised_gate_gradient_per_unit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    batch = Batch(x, y, torch.zeros(8, dtype=torch.long))
    ctx = ctx_for(model, [batch], tasks=1, width=2)
    imp = gate_importance(ctx, loss_objective(ctx), None)
    assert set(imp) == {"0"} and imp["0"].shape == (4,)  # the hidden layer's 4 units; the head is not a unit layer
    gate = torch.ones(4, requires_grad=True)
    loss = nn.functional.cross_entropy(model[2](torch.relu(model[0](x) * gate)), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, gate)
    torch.testing.assert_close(imp["0"], standardized_importance(g.abs()))
    assert bool(((imp["0"] >= 0) & (imp["0"] < 1)).all())


def test_das_masks_the_parameters_of_each_unit() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    (das,) = build_strategies([("das", {"protect_initial": False})])
    das.importance = {"0": torch.tensor([0.0, 0.5, 1.0, 0.25])}
    das.after_backward(ctx_for(model, [], tasks=1, width=2))
    factor = torch.tensor([1.0, 0.5, 0.0, 0.75])
    torch.testing.assert_close(model[0].weight.grad, factor[:, None].expand(4, 3))
    torch.testing.assert_close(model[0].bias.grad, factor)
    torch.testing.assert_close(model[2].weight.grad, torch.ones(2, 4))  # the head is not masked


def test_das_protects_the_initial_model_and_accumulates_by_max() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    data = [Batch(torch.randn(16, 3), torch.randint(0, 2, (16,)), torch.zeros(16, dtype=torch.long))]
    (das,) = build_strategies([("das", {"importance_samples": None})])
    das.before_task(ctx_for(model, data, tasks=1, width=2))  # proxy KL of two dropout passes
    proxy = das.importance["0"].clone()
    assert proxy.shape == (6,) and bool((proxy > 0).any())
    das.after_task(ctx_for(model, data, tasks=1, width=2))
    assert bool((das.importance["0"] >= proxy).all())


# ---------------------------------------------------------------- HAT

def test_hat_anneals_s_over_each_epoch() -> None:
    assert anneal(0, 10, 400.0) == pytest.approx(1 / 400)
    assert anneal(9, 10, 400.0) == pytest.approx(400.0)
    assert anneal(0, 10, 400.0) < anneal(4, 10, 400.0) < anneal(9, 10, 400.0)


def test_hat_masks_are_near_binary_and_protect_earlier_tasks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    head_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    (hat,) = build_strategies([("hat", {})])

    def ctx(task: int) -> StageContext:
        c = ctx_for(model, two_head_task(task, 96), task=task)
        c.head_mask, c.steps_per_epoch = head_mask, 6
        # HAT's optimizer is SGD (Serra et al. 2018, §4): Adam would normalise the masked gradients back up.
        c.optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return c

    fit_task(ctx(0), [hat], epochs=3)
    masks = torch.cat([m.flatten() for m in hat.masks(0).values()])
    assert float(((masks < 0.01) | (masks > 0.99)).float().mean()) >= 0.99  # near-binary after annealing
    assert 0.0 < float(masks.mean()) < 1.0  # some units used, some kept free
    probe = two_head_task(0, 96)[0].x
    before = hat.inference_model(model, 0)(probe)[:, :2].detach()
    fit_task(ctx(1), [hat], epochs=3)
    after = hat.inference_model(model, 0)(probe)[:, :2].detach()
    # Only units whose mask is not exactly 0 or 1 drift a little (unprotected SGD moves these outputs by ~1).
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.0)
    assert set(hat.embeddings) == {0, 1}


# ---------------------------------------------------------------- NCL

def test_ncl_kronecker_inverse_matches_a_dense_solve() -> None:
    torch.manual_seed(0)
    a, g = torch.randn(3, 3), torch.randn(2, 2)
    A, G = a @ a.T, g @ g.T
    V = torch.randn(2, 3)
    dense = 0.7 * torch.kron(A, G) + 0.3 * torch.eye(6)  # acts on column-stacked vec(V)
    expected = torch.linalg.solve(dense, V.T.reshape(-1)).reshape(3, 2).T
    torch.testing.assert_close(kron_inverse_apply(V, A, G, 0.7, 0.3), expected, atol=1e-5, rtol=1e-4)


def test_ncl_trust_region_caps_the_step_length() -> None:
    small = [torch.tensor([0.1, 0.2])]
    assert trust_region(small, 1.0) is small
    capped = trust_region([torch.tensor([3.0, 4.0]), torch.tensor([12.0])], 2.0)
    assert math.sqrt(sum(float((c ** 2).sum()) for c in capped)) == pytest.approx(2.0)


def test_ncl_step_respects_the_radius_and_pulls_toward_mu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    data = [Batch(torch.randn(32, 3), torch.randint(0, 2, (32,)), torch.zeros(32, dtype=torch.long))]
    (ncl,) = build_strategies([("ncl", {"radius": 0.05, "fisher_samples": None})])
    ctx = ctx_for(model, data, tasks=1, width=2)
    ncl.after_task(ctx)  # precision from task 0; mu = current parameters
    assert set(ncl.kron) == {"0", "2"} and ncl.tasks == 1
    lr = ctx.optimizer.param_groups[0]["lr"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # a huge gradient
    ncl.after_backward(ctx)
    step = math.sqrt(sum(float(((lr * p.grad) ** 2).sum()) for p in model.parameters()))
    assert step == pytest.approx(0.05, rel=1e-4)
    # With no task gradient, the update moves the parameters straight back toward mu.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ncl.config = NCLConfig(radius=10.0, fisher_samples=None)
    ncl.after_backward(ctx)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.01), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- replay by fraction

@pytest.mark.parametrize("storage", ["memory", "parquet"])
def test_replay_fraction_keeps_a_share_of_every_domain(storage: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    (replay,) = build_strategies([("replay", {"fraction": 0.25, "ratio": 0.5, "storage": storage})])
    for task in range(3):
        x = torch.randn(96, 6)
        data = [Batch(x[i:i + 16], torch.full((16,), task % 4), torch.full((16,), task)) for i in range(0, 96, 16)]
        ctx = ctx_for(model, data, task=task, tasks=3)
        ctx.rows_per_epoch = 96
        ctx.state_uri = str(tmp_path / f"stage-{task}")
        stats = fit_task(ctx, [replay], epochs=2)
        assert stats["samples"] == 2 * 96
    state = replay.state_dict()
    if storage == "parquet":  # one part per stage, each written under its own stage's folder
        assert [p["rows"] for p in state["parts"]] == [24, 24, 24]
        assert [Path(p["uri"]).parent.parent.name for p in state["parts"]] == ["stage-0", "stage-1", "stage-2"]
        ctx.task_id = 3
        replay.before_task(ctx)
        state = {**replay.kept.local(), "n_seen": state["n_seen"]}
    assert state["t"].tolist().count(0) == state["t"].tolist().count(1) == state["t"].tolist().count(2) == 24
    assert state["n_seen"] == 3 * 96
    # in the last domain, replayed samples came from both the kept domains and the current one
    mixed = replay.train_batch(ctx, data[0])
    assert len(mixed) == 32 and set(mixed.t[16:].tolist()) <= {0, 1, 2}


def test_lwf_distils_only_earlier_classes_in_class_il() -> None:
    from orchestrator.models import HeadLayout

    layout = HeadLayout.build("class_il", [[0, 1], [2, 3], [4, 5]])
    assert bool(layout.head_mask().all())  # class-IL may predict every class ...
    assert old_units(layout.domain_units(), 2).tolist() == [True] * 4 + [False] * 2  # ... but distils old ones only
    assert old_units(HeadLayout.build("domain_il", [[0, 1], [0, 1]]).domain_units(), 1).tolist() == [True, True]


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("head", ["shared", "add"])
def test_derpp_and_lwf_give_the_same_loss_terms_in_either_order(head: str) -> None:
    """DER++ restricts ``ce`` to the new samples, LwF scales it by beta and adds its distillation: composed in either
    order, one step has the same named terms, weights and total."""
    scenario, labels = ("class_il", [[0, 1], [2, 3]]) if head == "shared" else ("task_il", [[0, 1], [0, 1]])
    results = []
    for order in (("derpp", "lwf"), ("lwf", "derpp")):
        torch.manual_seed(0)
        model = nn.Linear(3, 4)
        params = {"derpp": {"buffer_size": 8, "alpha": 0.3, "beta": 0.7, "replay_batch": 2},
                  "lwf": {"alpha": 0.5, "beta": 0.25, "head": head, "temperature": 2.0}}
        strategies = build_strategies([(name, params[name]) for name in order])
        ctx = lwf_ctx(model, scenario, labels, task=1)
        for s in strategies:
            s.before_task(ctx)
        with torch.no_grad():
            model.weight.add_(torch.linspace(-0.5, 0.5, 12).view(4, 3))  # the student drifts from the teacher
        der = strategies[order.index("derpp")]
        der.buffer.insert({"x": torch.randn(8, 3), "y": torch.tensor([0, 1] * 4), "t": torch.zeros(8, dtype=torch.long),
                           "logits": torch.randn(8, 4)})
        batch = Batch(torch.randn(5, 3), torch.tensor([2, 3, 2, 3, 2]), torch.ones(5, dtype=torch.long))
        for s in strategies:
            batch = s.train_batch(ctx, batch)
        out = model(batch.x)
        terms = LossTerms(ce=ctx.criterion(out, batch))
        for s in strategies:
            s.loss(ctx, batch, out, terms)
        results.append(({k: round(v.item(), 6) for k, v in terms.values.items()}, dict(terms.weights),
                        terms.total().item()))
    (values_a, weights_a, total_a), (values_b, weights_b, total_b) = results
    assert set(values_a) == {"ce", "derpp.mse", "derpp.ce", "lwf.kd"} and values_a["lwf.kd"] > 0
    assert values_a == values_b and weights_a == weights_b == {"ce": 0.25, "derpp.mse": 1.0, "derpp.ce": 1.0,
                                                               "lwf.kd": 1.0}
    assert total_a == pytest.approx(total_b, rel=1e-6)


def test_a_term_is_defined_once() -> None:
    terms = LossTerms(ce=torch.tensor(1.0))
    terms.add("ewc", torch.tensor(2.0), weight=0.5)
    terms.scale("ce", 3.0)
    assert terms.total().item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="loss term 'ewc' is already defined"):
        terms.add("ewc", torch.tensor(1.0))
