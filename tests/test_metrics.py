"""CL metrics on a hand-computed accuracy matrix."""

import math

import pytest

from orchestrator.metrics import cl_metrics

R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
B = [0.1, 0.15, 0.25]


def test_metrics_match_hand_computation() -> None:
    m = cl_metrics(R, B)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT = mean(R[2][0]-R[0][0], R[2][1]-R[1][1]) = mean(-0.4, -0.1)
    assert m["bwt"] == pytest.approx(-0.25)
    # FWT = mean(R[0][1]-b1, R[1][2]-b2) = mean(-0.05, 0.05)
    assert m["fwt"] == pytest.approx(0.0)
    # forgetting_0 = max(0.9, 0.6) - 0.5; forgetting_1 = max(0.1, 0.8) - 0.7
    assert m["forgetting"] == pytest.approx([0.4, 0.1])
    assert m["avg_forgetting"] == pytest.approx(0.25)


def test_single_domain_has_no_transfer_terms() -> None:
    assert cl_metrics([[0.7]], [0.1]) == {"acc": 0.7, "bwt": 0.0, "fwt": 0.0, "forgetting": [], "avg_forgetting": 0.0}


def test_rejects_non_square_matrix() -> None:
    with pytest.raises(ValueError, match="T x T"):
        cl_metrics([[0.1, 0.2]], [0.1])


def test_stability_gap_metrics_on_a_hand_made_curve() -> None:
    from orchestrator.metrics import stability_gap

    def point(stage: int, step: int, col: int, acc: float, end: bool = False) -> dict:
        return {"stage": stage, "global_step": step, "col": col, "acc": acc, "end": end}

    curve = [
        point(0, 10, 0, 0.5), point(0, 20, 0, 0.9, end=True),
        # stage 1: domain 0 dips to 0.4 right after the switch (the gap), then recovers to 0.8
        point(1, 30, 0, 0.4), point(1, 30, 1, 0.6), point(1, 40, 0, 0.8), point(1, 40, 1, 0.95, end=True),
    ]
    m = stability_gap(curve, num_domains=2, window_steps=10)
    assert m["task_end_acc"] == pytest.approx(0.9)  # a(0, t_0)
    assert m["min_acc"] == pytest.approx(0.4)  # min over steps after t_0 = 20
    assert m["gap"] == pytest.approx(0.5)
    assert m["wc_acc"] == pytest.approx(0.95 / 2 + 0.5 * 0.4)  # a(T-1, t_{T-1}) / T + (1 - 1/T) min-ACC
    assert m["windowed_forgetting"] == pytest.approx(0.5)  # 0.9 at step 20 -> 0.4 at step 30, within 10 steps
    assert stability_gap(curve, 2, window_steps=5)["windowed_forgetting"] == 0.0  # no pair within 5 steps
    assert math.isnan(stability_gap(curve[:2], 1, 10)["min_acc"])  # T = 1: nothing after a stage
