"""Losses of the three methods, written once. Reductions follow the papers and their code (sums where
the reference code sums), because they set the balance between terms.

- :func:`dcg_triplet_loss`: EGATH and TEGAH, the DCG-weighted cosine triplet loss.
- :func:`quantization_loss`: EGATH, pull of relaxed codes towards the code matrix.
- :func:`classification_loss`: EGATH and TEGAH, multi-label BCE on logits.
- :func:`pairwise_nll_loss`: HFAH, pairwise likelihood with theta = 1/2 inner product.
- :func:`label_distillation_loss`: TEGAH, the "KL" similarity distillation.
- :func:`wasserstein_loss`: TEGAH, entropic OT between two code batches (POT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance(anchors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, M) matrix max(1 - cos(a_i, t_j), 0)."""
    cos = F.normalize(anchors, dim=1) @ F.normalize(targets, dim=1).T
    return (1.0 - cos).clamp_min(0.0)


def dcg_gains(similarity: torch.Tensor) -> torch.Tensor:
    """g_ij = (2^s_ij - 1) / Z_i, with Z_i the ideal DCG of row i: the row sorted in
    descending order, the r-th entry (r = 0, 1, ...) discounted by log2(r + 2)."""
    ideal = similarity.sort(dim=1, descending=True).values
    ranks = torch.arange(similarity.shape[1], dtype=similarity.dtype, device=similarity.device)
    z = ((2.0 ** ideal - 1.0) / torch.log2(ranks + 2.0)).sum(dim=1, keepdim=True)
    return (2.0 ** similarity - 1.0) / z.clamp_min(torch.finfo(similarity.dtype).tiny)  # a label-less row has no gains


def dcg_triplet_loss(anchors: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                     target_labels: torch.Tensor | None = None, margin: float = 0.3) -> torch.Tensor:
    """Sum over triplets (i, j, m) with s_ij > 0 and s_im = 0 of
    g_ij * max(d_ij - d_im + margin, 0), where s = shared-label counts, d = cosine
    distance, g = :func:`dcg_gains`. j = i counts (a sample is its own positive).
    ``target_labels`` defaults to ``labels`` (aligned pairs). Memory: N * M * M."""
    target_labels = labels if target_labels is None else target_labels
    similarity = labels.float() @ target_labels.float().T
    distance = cosine_distance(anchors, targets)
    gains = dcg_gains(similarity)
    positive = (similarity > 0).to(distance.dtype)
    negative = (similarity == 0).to(distance.dtype)
    hinge = (distance[:, :, None] - distance[:, None, :] + margin).clamp_min(0.0)  # [i, j, m]
    return (gains[:, :, None] * positive[:, :, None] * negative[:, None, :] * hinge).sum()


def quantization_loss(codes: torch.Tensor, *relaxed: torch.Tensor) -> torch.Tensor:
    """sum over the given relaxed codes H of ||codes - H||_F^2 (EGATH: H_I and H_T
    against the rows of the discrete code matrix)."""
    return sum(((codes - h) ** 2).sum() for h in relaxed)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over samples and labels."""
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def pairwise_nll_loss(left: torch.Tensor, right: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """mean_ij [softplus(theta_ij) - s_ij * theta_ij] with theta = 1/2 left right^T:
    the negative log-likelihood of the pairwise similarities s in {0, 1} under
    p(s=1) = sigmoid(theta). softplus keeps it finite for inner products in the hundreds."""
    theta = 0.5 * left @ right.T
    return (F.softplus(theta) - similarity.float() * theta).mean()


def label_similarity(labels: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """s_ij = 1 if samples i and j share at least one label."""
    other = labels if other is None else other
    return ((labels.float() @ other.float().T) > 0).float()


def label_distillation_loss(teacher: torch.Tensor, teacher_bank: torch.Tensor, student: torch.Tensor,
                            student_bank: torch.Tensor) -> torch.Tensor:
    """TEGAH's KL(P, P_bank, Q, Q_bank): with rows L2-normalised,
    S_P = P P_bank^T and S_Q = ReLU(Q Q_bank^T), the loss is mean(0.5 |D| + D^2),
    D = S_Q - S_P (= 1/2 (ReLU(S_P - S_Q) + ReLU(S_Q - S_P)) + D^2). Rows that are all
    zero are left at zero instead of giving NaN (the reference code had no epsilon)."""
    s_teacher = F.normalize(teacher, dim=1) @ F.normalize(teacher_bank, dim=1).T
    s_student = F.relu(F.normalize(student, dim=1) @ F.normalize(student_bank, dim=1).T)
    delta = s_student - s_teacher
    return (0.5 * delta.abs() + delta ** 2).mean()


def wasserstein_loss(x: torch.Tensor, y: torch.Tensor, reg: float = 0.01, max_iter: int = 100,
                     stop_threshold: float = 1e-9) -> torch.Tensor:
    """Entropic optimal transport between the rows of x and of y (uniform weights,
    squared Euclidean cost): sum_ab pi_ab C_ab for the Sinkhorn plan pi, solved by POT in
    the log domain (the cost of 64-bit codes over reg = 0.01 underflows exp otherwise)
    and differentiated through the iterations with the torch backend."""
    import ot

    cost = ot.dist(x, y, metric="sqeuclidean")
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype, device=x.device)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype, device=y.device)
    return ot.sinkhorn2(a, b, cost, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=stop_threshold)
