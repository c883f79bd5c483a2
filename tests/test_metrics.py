"""CL metrics on a hand-computed accuracy matrix."""

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
