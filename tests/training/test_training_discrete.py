"""The discrete code update of spec §6.5: invariants and the optimality of each step."""

import pytest
import torch

from cmhash.training.blocks import DiscreteCodes, binarize
from cmhash.training.errors import ConfigError


def _inputs(n=60, c=5, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, c, generator=g) < 0.3).float()
    return labels, torch.tanh(torch.randn(n, k, generator=g)), torch.tanh(torch.randn(n, k, generator=g))


def test_invariants_over_epochs():
    labels, h_i, h_t = _inputs()
    codes = DiscreteCodes(60, 16, seed=1)
    assert set(codes.B.unique().tolist()) <= {-1.0, 1.0}
    gamma = codes.gamma
    for epoch in range(5):
        Q_before = codes.Q.clone()
        R = codes.update(labels, h_i, h_t)
        assert R.shape == (5, 16)
        assert set(codes.B.unique().tolist()) <= {-1.0, 1.0}
        torch.testing.assert_close(codes.P.T @ codes.P, torch.eye(16), atol=1e-4, rtol=0)
        torch.testing.assert_close(codes.Q, Q_before + gamma * (codes.B - codes.P))
        gamma *= 1.05
        assert codes.gamma == pytest.approx(gamma)


def test_each_step_solves_its_subproblem():
    labels, h_i, h_t = _inputs(seed=2)
    codes = DiscreteCodes(60, 16, seed=3)
    codes.update(labels, h_i, h_t)  # move away from the initial state
    B0, P0, Q0, gamma = codes.B.clone(), codes.P.clone(), codes.Q.clone(), codes.gamma
    R = codes.update(labels, h_i, h_t)
    # R is the ridge solution: the gradient of ||L R - B0||^2 + ||R||^2 vanishes
    torch.testing.assert_close(labels.T @ (labels @ R - B0) + R, torch.zeros_like(R), atol=1e-4, rtol=0)
    # B maximises <B, M> over sign matrices: flipping any entry can only lower it
    M = labels @ R + gamma * P0 - Q0 + 0.5 * (h_i + h_t)
    torch.testing.assert_close(codes.B, binarize(M))
    assert (codes.B * M >= 0).all()
    # P is the orthonormal-column matrix closest to B + Q0/gamma: <P, A> equals the nuclear norm of A
    A = codes.B + Q0 / gamma
    nuclear = torch.linalg.svdvals(A).sum()
    assert (codes.P * A).sum().item() == pytest.approx(nuclear.item(), rel=1e-4)
    for seed in range(5):  # and beats random orthonormal matrices
        other, _ = torch.linalg.qr(torch.randn(60, 16, generator=torch.Generator().manual_seed(seed)))
        assert (other * A).sum() < (codes.P * A).sum()


def test_rank_deficient_procrustes_keeps_orthonormal_columns():
    codes = DiscreteCodes(40, 16, seed=0)
    labels = torch.zeros(40, 3)
    labels[:, 0] = 1  # every sample has the same single label
    same = torch.ones(40, 16)
    codes.Q.zero_()
    codes.P = torch.ones(40, 16)  # B + Q/gamma becomes rank 1
    codes.update(labels, same, same)
    assert torch.linalg.matrix_rank(codes.B).item() == 1
    torch.testing.assert_close(codes.P.T @ codes.P, torch.eye(16), atol=1e-4, rtol=0)


def test_deterministic_from_seed_and_state_round_trip():
    labels, h_i, h_t = _inputs()
    a, b = DiscreteCodes(60, 16, seed=7), DiscreteCodes(60, 16, seed=7)
    a.update(labels, h_i, h_t)
    b.update(labels, h_i, h_t)
    torch.testing.assert_close(a.B, b.B)
    c = DiscreteCodes(60, 16, seed=0)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.rows(torch.tensor([3, 5])), a.B[[3, 5]])
    assert c.gamma == pytest.approx(a.gamma)
    with pytest.raises(ConfigError):
        DiscreteCodes(10, 12)
