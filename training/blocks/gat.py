"""The GAT label classifier on the dense label graph, and the label
word embeddings that are its node features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..deps import without_jit_script_warning
from ..errors import DataError

with without_jit_script_warning():
    from torch_geometric.nn import DenseGATConv

GLOVE_KEY = "emb"


class LabelEmbeddings(nn.Module):
    """Node features of the label graph, (C, dim): GloVe vectors from a ``*_glove.mat``
    file (key ``emb``, rows in label-column order), fixed; else learned, N(0, 0.02).
    ``source`` says which, for the run's record."""

    def __init__(self, num_labels: int, glove_path: str | Path | None = None, dim: int = 300):
        super().__init__()
        if glove_path is not None:
            from ..data.sources import read_mat_variable

            path = Path(glove_path)
            try:
                vectors = np.asarray(read_mat_variable(path, GLOVE_KEY), dtype=np.float32)
            except (ValueError, TypeError) as exc:
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"{path}: key {GLOVE_KEY!r} must hold numbers ({exc})") from exc
            if vectors.ndim != 2 or vectors.shape[0] != num_labels:
                raise DataError(f"{path}: key {GLOVE_KEY!r} must be a ({num_labels}, dim) matrix, one row per "
                                f"label; got shape {vectors.shape}")
            self.register_buffer("vectors", torch.from_numpy(vectors))
            self.source = f"glove:{path.name}"
        else:
            self.vectors = nn.Parameter(torch.randn(num_labels, dim) * 0.02)
            self.source = "learned"

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def forward(self) -> torch.Tensor:
        return self.vectors


def _gat_layer(in_dim: int, out_dim: int, slope: float, dropout: float) -> DenseGATConv:
    # Single head, no bias, no activation inside; Xavier-uniform with gain 1.414 as EGATH's layer.
    layer = DenseGATConv(in_dim, out_dim, heads=1, concat=True, negative_slope=slope, dropout=dropout, bias=False)
    for p in (layer.lin.weight, layer.att_src, layer.att_dst):
        nn.init.xavier_uniform_(p.view(p.shape[-1], -1) if p.dim() == 4 else p, gain=1.414)
    return layer


def attention_weights(layer: DenseGATConv, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """The (C, C) attention of a single-head layer without dropout: row i is the softmax
    over the neighbours j of LeakyReLU(a_dst . W x_i + a_src . W x_j). For inspection
    and tests; the layer computes the same inside its forward."""
    h = layer.lin(x)
    scores = (h @ layer.att_dst.reshape(-1))[:, None] + (h @ layer.att_src.reshape(-1))[None, :]
    scores = F.leaky_relu(scores, layer.negative_slope).masked_fill(adjacency == 0, float("-inf"))
    return scores.softmax(dim=1)


class GATLabelClassifier(nn.Module):
    """Two GAT layers over the label graph turn the label embeddings into one classifier
    vector per label: H = GAT2(LeakyReLU(GAT1(E, A)), A), (C, out_dim). Logits of
    features X (N, out_dim) are X H^T. Training only: no tower uses it."""

    def __init__(self, adjacency: np.ndarray | torch.Tensor, embeddings: LabelEmbeddings, out_dim: int,
                 hidden: int = 1024, slope: float = 0.2, dropout: float = 0.0):
        super().__init__()
        adjacency = torch.as_tensor(np.asarray(adjacency), dtype=torch.float32)
        if adjacency.shape != (embeddings().shape[0],) * 2:
            raise DataError(f"adjacency {tuple(adjacency.shape)} does not match {embeddings().shape[0]} labels")
        self.register_buffer("adjacency", adjacency)  # fixed: built once from the training labels
        self.embeddings = embeddings
        self.gat1 = _gat_layer(embeddings.dim, hidden, slope, dropout)
        self.gat2 = _gat_layer(hidden, out_dim, slope, dropout)

    def label_vectors(self) -> torch.Tensor:
        # the graph already carries its self-loops, so the layers must not add their own
        h = self.gat1(self.embeddings(), self.adjacency, add_loop=False)[0]
        h = F.leaky_relu(h, 0.2)
        return self.gat2(h, self.adjacency, add_loop=False)[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.label_vectors().T
