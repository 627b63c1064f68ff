"""Label graph (spec §4) and GAT attention (spec §3.4) against numpy references (§13)."""

import numpy as np
import pytest
import torch

from cmhash.training.blocks import GATLabelClassifier, LabelEmbeddings, attention_weights, label_graph
from cmhash.training.errors import DataError

from conftest import require

# 6 samples, 4 labels; label 3 never occurs
TOY = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)


def test_toy_mask_by_hand():
    graph = label_graph(TOY, threshold=0.5)
    # counts: label 0: 4, label 1: 3, label 2: 3; pairs (0,1): 2, (0,2): 1, (1,2): 2
    # P(1|0) = 2/4, P(2|0) = 1/4, P(0|1) = 2/3, P(2|1) = 2/3, P(0|2) = 1/3, P(1|2) = 2/3
    expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(graph.mask, expected)
    np.testing.assert_allclose(graph.conditional[0], [1, 0.5, 0.25, 0])
    assert (graph.adjacency >= 0).all() and np.isfinite(graph.adjacency).all()  # the absent label gives no NaN


def _reference_adjacency(labels, t):
    """Spec §4 step by step, in loops."""
    n, c = labels.shape
    counts = np.zeros((c, c))
    for row in labels:
        for i in range(c):
            for j in range(c):
                counts[i, j] += row[i] * row[j]
    a = np.zeros((c, c))
    for i in range(c):
        for j in range(c):
            a[i, j] = 1.0 if counts[i, j] / max(counts[i, i], 1) >= t else 0.0
    col = a.sum(axis=0)
    a = np.array([[0.25 * a[i, j] / (col[j] + 1e-6) for j in range(c)] for i in range(c)]) + np.eye(c)
    d = a.sum(axis=1)
    return np.array([[a[i, j] / np.sqrt(d[i] * d[j]) for j in range(c)] for i in range(c)])


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 1.0])
def test_adjacency_matches_reference(threshold):
    labels = (np.random.default_rng(3).random((40, 7)) < 0.3).astype(np.float32)
    graph = label_graph(labels, threshold)
    np.testing.assert_allclose(graph.adjacency, _reference_adjacency(labels, threshold), rtol=1e-6, atol=1e-7)
    off_diagonal = ~np.eye(7, dtype=bool)
    np.testing.assert_array_equal(graph.mask[off_diagonal], (graph.conditional >= threshold)[off_diagonal])
    assert graph.mask.diagonal().all()


def test_real_mirflickr_edge_count(shared_data):
    labels = np.load(require(shared_data / "mirflickr25k" / "labels_tags.npz"))["labels"]
    mask = label_graph(labels, 0.3).mask
    assert mask.sum() - 24 == 105  # spec §4: 105 directed off-diagonal edges of 552


def test_bad_labels():
    with pytest.raises(DataError):
        label_graph(np.full((3, 2), 0.5))
    with pytest.raises(DataError):
        label_graph(np.zeros((0, 2)))


def _numpy_attention(x, w, a_src, a_dst, mask, slope):
    """pyGAT's formulation, as in EGATH's gat.py: e_ij = LeakyReLU(a^T [h_i || h_j]) over
    the materialised (N, N, 2F) tensor, non-edges set to -9e15, row softmax."""
    h = x @ w.T
    n = h.shape[0]
    pairs = np.concatenate([np.repeat(h[:, None, :], n, 1), np.repeat(h[None, :, :], n, 0)], axis=2)
    e = pairs @ np.concatenate([a_dst, a_src])
    e = np.where(e > 0, e, slope * e)
    e = np.where(mask, e, -9e15)
    e = np.exp(e - e.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), h


def test_gat_attention_and_output_match_numpy():
    torch.manual_seed(0)
    labels = (np.random.default_rng(1).random((30, 5)) < 0.35).astype(np.float32)
    graph = label_graph(labels, 0.3)
    classifier = GATLabelClassifier(graph.adjacency, LabelEmbeddings(5, dim=12), out_dim=6, hidden=8, slope=0.2)
    layer = classifier.gat1
    x = classifier.embeddings().detach().double().numpy()
    w = layer.lin.weight.detach().double().numpy()
    a_src = layer.att_src.detach().reshape(-1).double().numpy()
    a_dst = layer.att_dst.detach().reshape(-1).double().numpy()
    reference, h = _numpy_attention(x, w, a_src, a_dst, graph.mask, 0.2)
    attention = attention_weights(layer, classifier.embeddings(), classifier.adjacency).detach().double().numpy()
    np.testing.assert_allclose(attention, reference, atol=1e-6)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-6)
    assert (attention[~graph.mask] == 0).all()
    # the torch_geometric layer's own output is that attention applied to W x
    out = layer(classifier.embeddings(), classifier.adjacency, add_loop=False)[0].detach().double().numpy()
    np.testing.assert_allclose(out, reference @ h, atol=1e-5)


def test_classifier_shapes_gradient_and_glove(shared_data):
    labels = (np.random.default_rng(2).random((50, 24)) < 0.2).astype(np.float32)
    glove = require(shared_data / "label_glove" / "mir_glove.mat")
    embeddings = LabelEmbeddings(24, glove_path=glove)
    assert embeddings.source == "glove:mir_glove.mat" and embeddings().shape == (24, 300)
    assert not embeddings.vectors.requires_grad  # GloVe vectors stay fixed
    classifier = GATLabelClassifier(label_graph(labels).adjacency, embeddings, out_dim=2 * 16, hidden=64)
    assert classifier.gat1(embeddings(), classifier.adjacency)[0].shape == (24, 64)
    assert classifier.label_vectors().shape == (24, 32)
    features = torch.randn(3, 32, requires_grad=True)
    logits = classifier(features)
    assert logits.shape == (3, 24)
    logits.sum().backward()
    assert classifier.gat1.lin.weight.grad.abs().sum() > 0 and features.grad.abs().sum() > 0
    assert "adjacency" in dict(classifier.named_buffers())
    with pytest.raises(DataError, match="one row per label"):
        LabelEmbeddings(10, glove_path=glove)
    learned = LabelEmbeddings(24)
    assert learned.source == "learned" and learned.vectors.requires_grad
