"""Every loss against values computed by hand on tiny tensors, plus gradients."""

import math

import pytest
import torch

from cmhash.training.blocks import (HashHead, binarize, check_bits, classification_loss, dcg_gains, dcg_triplet_loss,
                                    label_distillation_loss, label_similarity, pairwise_nll_loss, quantization_loss,
                                    wasserstein_loss)
from cmhash.training.errors import ConfigError

from conftest import triplet_reference

LABELS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # samples 0 and 1 share a label, 2 is alone


def test_dcg_gains_by_hand():
    g = dcg_gains(LABELS @ LABELS.T)
    z0 = 1 + 1 / math.log2(3)  # row 0 sorted: 1, 1, 0
    torch.testing.assert_close(g, torch.tensor([[1 / z0, 1 / z0, 0], [1 / z0, 1 / z0, 0], [0, 0, 1.0]]))


def test_triplet_all_violations_by_hand():
    codes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # all distances 0: every triplet costs g * margin
    loss = dcg_triplet_loss(codes, codes, LABELS, margin=0.3)
    g0 = 1 / (1 + 1 / math.log2(3))
    # rows 0 and 1: positives j in {0, 1}, negative m = 2; row 2: positive 2, negatives {0, 1}
    expected = 2 * (2 * g0 * 0.3) + 2 * (1.0 * 0.3)
    assert loss.item() == pytest.approx(expected, abs=1e-6) == pytest.approx(1.3357766, abs=1e-6)


def test_triplet_zero_when_negatives_are_far_enough():
    codes = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    assert dcg_triplet_loss(codes, codes, LABELS, margin=0.3).item() == 0.0


def test_triplet_matches_loop_reference_and_has_gradient():
    torch.manual_seed(0)
    labels = (torch.rand(6, 4) < 0.4).float()
    labels[0] = 0  # a sample without labels adds nothing and must not give NaN
    a = torch.randn(6, 8, requires_grad=True)
    t = torch.randn(6, 8)
    loss = dcg_triplet_loss(a, t, labels, margin=0.4)
    assert loss.item() == pytest.approx(triplet_reference(a.detach(), t, labels, 0.4), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_quantization_by_hand():
    codes = torch.tensor([[1.0, -1.0]])
    loss = quantization_loss(codes, torch.tensor([[0.5, -0.5]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.25 + 0.25 + 0 + 1)


def test_classification_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (math.log(2) + math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 4
    assert classification_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_nll_by_hand_stable_and_gradient():
    u = torch.tensor([[2.0, 0.0]], requires_grad=True)
    v = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([[1.0, 0.0]])  # theta = [[2, 0]]
    loss = pairwise_nll_loss(u, v, s)
    expected = ((math.log(1 + math.exp(2)) - 2) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # dL/dtheta_0j = (sigmoid(theta_0j) - s_0j) / 2 (mean of 2), dtheta_0j/du = v_j / 2 = e_j
    sig = 1 / (1 + math.exp(-2))
    torch.testing.assert_close(u.grad, torch.tensor([[(sig - 1) / 2, (0.5 - 0) / 2]]))
    big = torch.full((1, 64), 3.0)  # theta = 288: exp would overflow in float32
    assert pairwise_nll_loss(big, big, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_nll_loss(big, big, torch.zeros(1, 1)).item() == pytest.approx(288.0)


def test_label_similarity():
    torch.testing.assert_close(label_similarity(LABELS), torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))


def test_label_distillation_by_hand():
    bank = torch.eye(2)
    teacher = torch.tensor([[3.0, 0.0]])  # normalised rows: S_P = [[1, 0]]
    # S_Q = relu([[0, 1]]): D = [[-1, 1]] -> mean(0.5 + 1, 0.5 + 1) = 1.5
    assert label_distillation_loss(teacher, bank, torch.tensor([[0.0, 5.0]]), bank).item() == pytest.approx(1.5)
    # negative similarities are cut by the ReLU: S_Q = [[0, 0]], D = [[-1, 0]] -> 0.75
    assert label_distillation_loss(teacher, bank, torch.tensor([[-2.0, 0.0]]), bank).item() == pytest.approx(0.75)
    student = torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = label_distillation_loss(teacher, bank, student, bank)
    loss.backward()
    assert student.grad.abs().sum() > 0
    zero = label_distillation_loss(torch.zeros(1, 2), bank, torch.zeros(1, 2), bank)
    assert torch.isfinite(zero) and zero.item() == 0.0


def test_wasserstein_by_hand_with_envelope_gradient():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0.1], [1.2]], dtype=torch.float64)
    # cross costs (1.44, 0.81) dwarf reg: the plan is the matching 0-0, 1-1 with mass 1/2 each
    loss = wasserstein_loss(x, y, reg=0.01)
    assert loss.item() == pytest.approx(0.5 * 0.01 + 0.5 * 0.04, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[2 * -0.1 * 0.5], [2 * -0.2 * 0.5]], dtype=torch.float64))


def test_wasserstein_on_64_bit_codes_is_finite():
    torch.manual_seed(0)
    h_i = torch.tanh(torch.randn(16, 64) * 3).requires_grad_()
    h_t = torch.tanh(torch.randn(16, 64) * 3)
    loss = wasserstein_loss(h_i, h_t)  # costs up to 256 over reg 0.01: needs the log domain
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(h_i.grad).all()
    assert wasserstein_loss(h_t, h_t).item() == pytest.approx(0.0, abs=1e-3)


def test_hash_head_and_binarize():
    torch.testing.assert_close(binarize(torch.tensor([-0.5, 0.0, 0.3])), torch.tensor([-1.0, 1.0, 1.0]))
    head = HashHead(10, 16)
    out = head(torch.randn(4, 10) * 100)
    assert out.shape == (4, 16) and out.abs().max() <= 1
    for bits in (0, 12, 63, -8, 16.0):
        with pytest.raises(ConfigError, match="multiple of 8"):
            check_bits(bits)
    with pytest.raises(ConfigError, match="multiple of 8"):
        HashHead(10, 20)
