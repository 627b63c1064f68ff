"""The label co-occurrence graph of EGATH, always computed from the training
labels (the adjacency files shipped with the papers' code overflowed uint8)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class LabelGraph:
    conditional: np.ndarray  # P(j | i) = count(i, j) / count(i), (C, C)
    mask: np.ndarray  # edges: P(j | i) >= threshold, plus self-loops, (C, C) bool
    adjacency: np.ndarray  # the normalised adjacency D^-1/2 (A' + I) D^-1/2, (C, C) float32, >= 0
    threshold: float


def label_graph(labels: np.ndarray, threshold: float = 0.3) -> LabelGraph:
    """The steps (the code path GCDH/EGATH run): co-occurrence counts L^T L,
    divided row-wise by each label's count, thresholded, re-weighted as in ML-GCN,
    self-loops added, symmetrically normalised. Only the mask reaches a GAT layer; the
    weights are kept for GCN variants. Labels that never occur get a self-loop only."""
    L = np.asarray(labels, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] == 0:
        raise DataError(f"label_graph needs an (n, C) label matrix with n > 0, got shape {L.shape}")
    if not np.isin(L, (0.0, 1.0)).all():
        raise DataError("label_graph needs 0/1 labels")
    counts = L.T @ L
    frequency = np.maximum(np.diag(counts), 1.0)  # a label that never occurs would divide by 0
    conditional = counts / frequency[:, None]
    binary = (conditional >= threshold).astype(np.float64)
    reweighted = 0.25 * binary / (binary.sum(axis=0, keepdims=True) + 1e-6)
    with_loops = reweighted + np.eye(L.shape[1])
    d = with_loops.sum(axis=1) ** -0.5  # row sums >= 1 thanks to the self-loops
    adjacency = d[:, None] * with_loops * d[None, :]
    return LabelGraph(conditional=conditional, mask=adjacency > 0, adjacency=adjacency.astype(np.float32),
                      threshold=float(threshold))
