"""TEGAH: text-enhanced graph attention hashing (Zou, Cheng, Du, Chen, Entropy 2024).

Where the authors' code differs from the paper, the choice is stated beside it. Four networks are
trained jointly with one summed loss and one backward pass per batch:

- image net (:class:`ImageTower`): a backbone (Swin-S by default), a linear head to the
  feature width, the feature MLP (f_i), the hash head (h_i);
- text net (:class:`DTFEN`): Conv1D stage + GAP, the "autoencoder" MLP (f_t), a second
  Conv1D stage + GAP, the hash head (h_t);
- label net (:class:`MLAH`): four AEMM branches, multi-scale attention, MLP, hash head (h_l);
- fusion (:class:`GAFM`): LRP / GRU gate / LRP + residual / LFF on concat(f_i, f_t), and a
  two-layer GAT over the label graph whose node vectors classify the fused features.

Only the image and text nets are towers; the label net, the fusion module, the GAT and
the three memory banks shape training alone.

Two behaviours, one switch:

- default: the paper's design with the published code's bugs fixed: the GAT's weights are
  trained and saved, the graph is the cosine-quantised co-occurrence graph the paper
  describes, the GRU gate fuses each sample on its own (a sequence of length 1 per sample);
- ``reference_code: true``: what the authors' code does: frozen random GAT weights, the
  code's adjacency recipe (the identity on real data), the GRU run over the mini-batch as
  one sequence, and the code's learning-rate formula.

Ablations (paper Table 3): ``variant`` in baseline, V1..V6, full switches MLAH,
GAFM and DTFEN on and off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import (HashHead, binarize, build_image_backbone, classification_loss, dcg_triplet_loss,
                      label_distillation_loss, quantization_loss, wasserstein_loss)
from ..blocks.gat import DenseGATConv  # imported there without torch's jit.script warning
from ..blocks.pretrained import check_one_weights_source
from ..errors import ConfigError
from ..method import Batch, DatasetInfo, HashingMethod, MethodConfig, register_method

# Which of (MLAH, GAFM, DTFEN) each variant keeps (paper Table 3).
VARIANTS = {
    "baseline": (False, False, False),
    "V1": (True, False, False),
    "V2": (False, True, False),
    "V3": (False, False, True),
    "V4": (True, True, False),
    "V5": (True, False, True),
    "V6": (False, True, True),
    "full": (True, True, True),
}
LABEL_GRAPHS = ("cosine", "code", "cooccurrence")
LR_SCHEDULES = ("constant", "cosine", "code")
PLAIN_TEXT_NETS = ("autoencoder", "gcdh")

# Weights of the seven distillation terms; the paper gives none.
KL_WEIGHTS = {"l_l": 1.9, "l_f": 1.0, "l_g": 0.3, "i_f": 1.9, "i_l": 1.0, "t_g": 1.9, "t_l": 1.0}


@dataclass
class TEGAHConfig(MethodConfig):
    bits: int = 64
    # image network
    backbone: str = "timm:swin_small_patch4_window7_224"  # see blocks.backbones; 'clip:ViT-B-32', ...
    # pretrained weights: a library tag (open_clip 'openai', timm 'ms_in22k_ft_in1k', ...) or a local file in the
    # library's format, fetched through the library's cache (docs/pretrained.md); None: random initialisation
    pretrained: str | None = None
    backbone_weights: str | None = None  # a local file with the backbone's own keys (the same as a local 'pretrained')
    freeze_backbone: bool = False
    # per-channel normalisation of the images; None: the backbone's (the code used each dataset's own)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # widths (paper: H = 2048, MLP 8192, attention 128 in 2 groups, GAT 8 heads of 1024)
    feature_dim: int = 2048  # H: f_i, f_t, f_l; the fusion works on 2H
    mlp_dim: int = 8192  # hidden width of the image MLP and the text / label "autoencoders"
    attention_dim: int = 128  # MLAH multi-scale attention channels
    attention_groups: int = 2
    gat_hidden: int = 1024
    gat_heads: int = 8
    gat_dropout: float = 0.6
    gru_layers: int = 2
    # ablation (paper Table 3): baseline, V1..V6, full
    variant: str = "full"
    plain_text_net: str = "autoencoder"  # text net without DTFEN: the autoencoder MLP or GCDH's T-8192-4096-2048
    # published code vs paper (module docstring)
    reference_code: bool = False
    label_graph: str | None = None  # 'cosine' (paper), 'code' (code's recipe), 'cooccurrence' (ML-GCN); None: by mode
    graph_threshold: float = 0.5  # edge threshold of the 'cosine' and 'cooccurrence' graphs
    code_threshold: float = 0.3  # threshold of the code's recipe (0.01 on NUS-WIDE)
    lr_schedule: str | None = None  # 'constant', 'cosine', 'code'; None: 'code' with reference_code, else 'constant'
    lr_cosine_epochs: int = 300  # period of the 'cosine' schedule
    # losses
    alpha: float = 10.0  # weight of the triplet term
    margin: float = 0.4
    wasserstein_reg: float = 0.01
    wasserstein_iters: int = 100
    detach_teacher: bool = False  # the code lets the KL terms train the label net
    # optimisers (AdamW / Adam / AdamW / AdamW)
    lr_image: float = 1e-5
    lr_text: float = 1e-4
    lr_fusion: float = 1e-5
    lr_label: float = 1e-5
    weight_decay_image: float = 1e-4
    weight_decay_text: float = 1e-5
    weight_decay_fusion: float = 1e-4
    weight_decay_label: float = 1e-4
    bank_init: str = "randn"  # the code's N(0, 1) banks

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_weights_source(self)
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.label_graph is not None and self.label_graph not in LABEL_GRAPHS:
            raise ConfigError(f"model.label_graph must be one of {', '.join(LABEL_GRAPHS)} or null, "
                              f"got {self.label_graph!r}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"model.lr_schedule must be one of {', '.join(LR_SCHEDULES)} or null, "
                              f"got {self.lr_schedule!r}")
        if self.plain_text_net not in PLAIN_TEXT_NETS:
            raise ConfigError(f"model.plain_text_net must be one of {', '.join(PLAIN_TEXT_NETS)}, "
                              f"got {self.plain_text_net!r}")
        if self.bank_init not in ("randn", "zeros"):
            raise ConfigError(f"model.bank_init must be 'randn' or 'zeros', got {self.bank_init!r}")
        for name in ("feature_dim", "mlp_dim", "attention_dim", "attention_groups", "gat_hidden", "gat_heads",
                     "gru_layers", "wasserstein_iters", "lr_cosine_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.attention_dim % self.attention_groups:
            raise ConfigError(f"model.attention_dim ({self.attention_dim}) must be a multiple of "
                              f"model.attention_groups ({self.attention_groups})")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or (name == "image_std" and min(value) <= 0)):
                raise ConfigError(f"model.{name} needs three values (R, G, B; std positive), got {value}")
        if not (0 < self.graph_threshold <= 1 and 0 < self.code_threshold <= 1):
            raise ConfigError(f"model.graph_threshold and model.code_threshold must be in (0, 1], got "
                              f"{self.graph_threshold} and {self.code_threshold}")
        if not 0 <= self.gat_dropout < 1:
            raise ConfigError(f"model.gat_dropout must be in [0, 1), got {self.gat_dropout}")

    # what the switches resolve to
    @property
    def use_mlah(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def use_gafm(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def use_dtfen(self) -> bool:
        return VARIANTS[self.variant][2]

    @property
    def graph(self) -> str:
        return self.label_graph or ("code" if self.reference_code else "cosine")

    @property
    def threshold(self) -> float:
        return self.code_threshold if self.graph == "code" else self.graph_threshold

    @property
    def schedule(self) -> str:
        return self.lr_schedule or ("code" if self.reference_code else "constant")


# --------------------------------------------------------------------------- small blocks


def _kaiming(linear: nn.Linear) -> nn.Linear:
    nn.init.kaiming_normal_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def _mlp(in_dim: int, widths: list[int], norm: str = "batch") -> nn.Sequential:
    """Linear -> BatchNorm1d (or LayerNorm) -> ReLU per width."""
    layers: list[nn.Module] = []
    for width in widths:
        linear = nn.Linear(in_dim, width)
        if norm == "batch":
            _kaiming(linear)  # the image and text MLPs; the label MLP keeps PyTorch's init
        layers += [linear, nn.BatchNorm1d(width) if norm == "batch" else nn.LayerNorm(width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers)


class ConvStage(nn.Module):
    """Conv1d(kernel 3, padding 1) -> ReLU -> global average pool; (N, C) or (N, C, L) in, (N, out) out.

    TEGAH feeds its vectors as sequences of length 1 (C channels): then only the centre
    tap of the kernel sees data and the stage is a linear layer + ReLU.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(-1) if x.dim() == 2 else x
        return self.pool(F.relu(self.conv(x))).flatten(1)


class LKA1d(nn.Module):
    """Van-style large kernel attention in 1-D (the code's LKA_Attention_1d):
    x + P2(LKA(ReLU(P1(x)))), LKA(u) = u * PW(DWd(DW(u))); DW depthwise k5, DWd depthwise
    k7 dilation 3, P1/P2/PW pointwise."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj1 = nn.Conv1d(dim, dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, 5, padding=2, groups=dim)
        self.dilated = nn.Conv1d(dim, dim, 7, padding=9, dilation=3, groups=dim)
        self.pointwise = nn.Conv1d(dim, dim, 1)
        self.proj2 = nn.Conv1d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        u = F.relu(self.proj1(x))
        attention = self.pointwise(self.dilated(self.depthwise(u)))
        return x + self.proj2(u * attention)


class AEMM(nn.Module):
    """One branch of MLAH / the LFF block: conv -> ReLU -> LKA1d -> ReLU -> max pool to
    length 1. (N, C_in, L) -> (N, C_out, 1). On length-1 inputs the strides are
    inert; a kernel of 1 with padding 1 (layer4) gives length 3 before the pool."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, padding=1)
        self.lka = LKA1d(out_dim)
        self.pool = nn.AdaptiveMaxPool1d(1)

    def pre_pool(self, x: Tensor) -> Tensor:
        return F.relu(self.lka(F.relu(self.conv(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.pre_pool(x))


# --------------------------------------------------------------------------- the four networks


class ImageTower(nn.Module):
    """Backbone -> Linear(backbone width -> H) -> MLP (f_i) -> hash head (h_i).
    ``forward`` gives the tanh codes (the image tower); ``encode`` also f_i."""

    def __init__(self, config: TEGAHConfig):
        super().__init__()
        self.backbone = build_image_backbone(config.backbone, config.pretrained or config.backbone_weights,
                                             config.freeze_backbone)
        self.head = nn.Linear(self.backbone.output_dim, config.feature_dim)  # timm's new 2048-way head
        self.mlp = _mlp(config.feature_dim, [config.mlp_dim, config.feature_dim])
        self.hash = HashHead(config.feature_dim, config.bits)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.mlp(self.head(self.backbone(images)))
        return self.hash(features), features

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)[0]


class DTFEN(nn.Module):
    """Deep text feature extraction network on the raw 0/1 bag of words:
    Stage1 (Conv1D + GAP) -> "autoencoder" MLP (f_t) -> Stage2 (Conv1D + GAP) -> hash (h_t).

    The published code lays the T-word vector out as T channels of a length-1 sequence, so
    each stage is exactly Linear + ReLU through the kernel's centre tap (the other taps
    only ever meet padding): DTFEN is a T-H-4H-H-H-bits MLP. Real Conv1d modules are kept
    so that parameter counts and default init (bound 1/sqrt(3 C_in)) match the code.
    """

    def __init__(self, text_dim: int, config: TEGAHConfig):
        super().__init__()
        self.stage1 = ConvStage(text_dim, config.feature_dim)
        self.autoencoder = _mlp(config.feature_dim, [config.mlp_dim, config.feature_dim])
        self.stage2 = ConvStage(config.feature_dim, config.feature_dim)
        self.hash = HashHead(config.feature_dim, config.bits)

    def encode(self, bow: Tensor) -> tuple[Tensor, Tensor]:
        features = self.autoencoder(self.stage1(bow))
        return self.hash(self.stage2(features)), features

    def forward(self, bow: Tensor) -> Tensor:
        return self.encode(bow)[0]


class PlainTextNet(nn.Module):
    """The text net of the variants without DTFEN: an MLP on the bag of words
    (the autoencoder's T-8192-2048, or GCDH's T-8192-4096-2048), then the hash head."""

    def __init__(self, text_dim: int, config: TEGAHConfig):
        super().__init__()
        widths = [config.mlp_dim, config.feature_dim]
        if config.plain_text_net == "gcdh":
            widths = [config.mlp_dim, config.mlp_dim // 2, config.feature_dim]
        self.mlp = _mlp(text_dim, widths)
        self.hash = HashHead(config.feature_dim, config.bits)

    def encode(self, bow: Tensor) -> tuple[Tensor, Tensor]:
        features = self.mlp(bow)
        return self.hash(features), features

    def forward(self, bow: Tensor) -> Tensor:
        return self.encode(bow)[0]


class MultiScaleAttention(nn.Module):
    """MLAH's attention: Q from the two small-stride branches, K and V from
    the two large-stride ones. Each of the D channels is a scalar token; the D channels
    form ``groups`` groups that attend within themselves; scale 1/sqrt(H) as in the code."""

    def __init__(self, dim: int, inner: int, groups: int):
        super().__init__()
        self.groups, self.scale = groups, dim ** -0.5
        self.q = nn.Conv1d(2 * dim, inner, 3, padding=1, bias=False)
        # kernel 3 for K and V too: it makes the parameter count the published code's 143.2 M (with the unused stem)
        self.k = nn.Conv1d(dim, inner, 3, padding=1, bias=False)
        self.v = nn.Conv1d(dim, inner, 3, padding=1, bias=False)
        self.proj = nn.Conv1d(inner, dim, 3, padding=1)

    def attention(self, q_in: Tensor, k_in: Tensor) -> Tensor:
        """(N, groups, D/groups, D/groups) attention weights."""
        n = q_in.shape[0]
        q = self.q(q_in).reshape(n, self.groups, -1)
        k = self.k(k_in).reshape(n, self.groups, -1)
        return (q[:, :, :, None] * k[:, :, None, :] * self.scale).softmax(dim=-1)

    def forward(self, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> Tensor:
        n = q_in.shape[0]
        weights = self.attention(q_in, k_in)
        v = self.v(v_in).reshape(n, self.groups, -1)
        out = (weights @ v[..., None]).squeeze(-1)  # (N, groups, D/groups)
        out = out.transpose(1, 2).reshape(n, -1, 1)  # channel 2i + g, as the code re-flattens
        return self.proj(out).flatten(1)


class MLAH(nn.Module):
    """Multiscale label area hybrid network: stem, four AEMM branches
    (strides 10, 5, 3 with kernel 3; kernel 1 for the fourth), multi-scale attention
    (Q <- [X3 || X4], K <- X1, V <- X2), the LayerNorm "autoencoder" (f_l), hash (h_l)."""

    STRIDES = ((3, 10), (3, 5), (3, 3), (1, 1))  # (kernel, stride) of layer1..layer4

    def __init__(self, num_labels: int, config: TEGAHConfig):
        super().__init__()
        h = config.feature_dim
        self.stem = nn.Conv1d(num_labels, h, 3, padding=1)
        self.branches = nn.ModuleList(AEMM(h, h, k, s) for k, s in self.STRIDES)
        self.attention = MultiScaleAttention(h, config.attention_dim, config.attention_groups)
        self.autoencoder = _mlp(h, [config.mlp_dim, h], norm="layer")  # the COCO branch for all
        self.hash = HashHead(h, config.bits)

    def forward(self, labels: Tensor) -> Tensor:
        x0 = F.relu(self.stem(labels.unsqueeze(-1)))  # avg pool of a length-1 sequence: identity
        x1, x2, x3, x4 = (branch(x0) for branch in self.branches)
        fused = self.attention(torch.cat([x3, x4], dim=1), x1, x2)
        return self.hash(self.autoencoder(fused))


class LabelGAT(nn.Module):
    """Two GAT networks in sequence over the label graph, each pyGAT's dense
    GAT: dropout -> ``heads`` attention heads (ELU, concatenated) -> dropout -> one output
    head. Node features are the normalised adjacency itself. gat1: C -> hidden, LeakyReLU;
    gat2: hidden -> out. Returns G (C, out): one classifier vector per label.

    ``trainable=False`` reproduces the published code, whose W and a were never registered
    with the module: they stay at their Xavier init (here: parameters without gradients).
    """

    def __init__(self, adjacency: Tensor, hidden: int, out_dim: int, heads: int, dropout: float, trainable: bool):
        super().__init__()
        c = adjacency.shape[0]
        self.register_buffer("adjacency", adjacency.float())
        self.dropout = dropout
        self.layers = nn.ModuleList([
            self._layer(c, hidden, heads), self._layer(hidden * heads, hidden, 1),
            self._layer(hidden, out_dim, heads), self._layer(out_dim * heads, out_dim, 1),
        ])
        if not trainable:
            self.requires_grad_(False)

    def _layer(self, in_dim: int, out_dim: int, heads: int) -> DenseGATConv:
        layer = DenseGATConv(in_dim, out_dim, heads=heads, concat=True, negative_slope=0.2,
                             dropout=self.dropout, bias=False)
        with torch.no_grad():  # pyGAT: per head W (in, out) and a (2 out, 1), Xavier-uniform gain 1.414
            for w in layer.lin.weight.view(heads, out_dim, in_dim):
                nn.init.xavier_uniform_(w, gain=1.414)
            a = torch.empty(heads, 2 * out_dim, 1)
            for head in a:
                nn.init.xavier_uniform_(head, gain=1.414)
            layer.att_src.copy_(a[:, :out_dim, 0].reshape(layer.att_src.shape))
            layer.att_dst.copy_(a[:, out_dim:, 0].reshape(layer.att_dst.shape))
        return layer

    def _net(self, x: Tensor, heads: DenseGATConv, out: DenseGATConv) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        x = F.elu(heads(x, self.adjacency, add_loop=False)[0])
        x = F.dropout(x, self.dropout, self.training)
        return out(x, self.adjacency, add_loop=False)[0]

    def forward(self) -> Tensor:
        h = F.leaky_relu(self._net(self.adjacency, self.layers[0], self.layers[1]), 0.2)
        return self._net(h, self.layers[2], self.layers[3])


class GAFM(nn.Module):
    """Graph attention feature fusion and the GAT classifier.

    F_c = [f_i || f_t] (2H); m = LRP1(F_c) (H); r = GRU(m); p = m sigmoid(m) + m sigmoid(r)
    (the code's gate, A4); x = LRP2(p) + F_c; F_fusion = LFF(x); logits = F_fusion G^T.
    ``gru_over_batch`` feeds the batch to the GRU as one sequence (the published code, A3);
    otherwise each sample is a sequence of length 1 and fuses on its own.
    """

    def __init__(self, config: TEGAHConfig, adjacency: Tensor, gru_over_batch: bool, gat_trainable: bool):
        super().__init__()
        h = config.feature_dim
        self.gru_over_batch = gru_over_batch
        self.lrp1 = nn.Sequential(_kaiming(nn.Linear(2 * h, h)), nn.RMSNorm(h, eps=1e-6), nn.PReLU(h))
        self.gru = nn.GRU(h, h, num_layers=config.gru_layers)
        self.lrp2 = nn.Sequential(_kaiming(nn.Linear(h, 2 * h)), nn.RMSNorm(2 * h, eps=1e-6), nn.PReLU(2 * h))
        self.lff = AEMM(2 * h, 2 * h)
        self.gat = LabelGAT(adjacency, config.gat_hidden, 2 * h, config.gat_heads, config.gat_dropout, gat_trainable)

    def fuse(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        fc = torch.cat([image_features, text_features], dim=1)
        m = self.lrp1(fc)
        # nn.GRU without batch_first: (sequence, batch, H)
        sequence = m.unsqueeze(1) if self.gru_over_batch else m.unsqueeze(0)
        r = self.gru(sequence)[0].reshape_as(m)
        p = m * torch.sigmoid(m) + m * torch.sigmoid(r)
        x = self.lrp2(p) + fc
        return self.lff(x.unsqueeze(-1)).flatten(1)

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return self.fuse(image_features, text_features) @ self.gat().T


# --------------------------------------------------------------------------- label graph


def _normalised(binary: np.ndarray) -> np.ndarray:
    """ML-GCN's gen_A re-weighting and gen_adj normalisation (the code's recipe):
    A = 0.25 P / (column sums + 1e-6) + I, then D A^T D with D = rowsum(A)^-1/2."""
    a = binary * 0.25 / (binary.sum(axis=0, keepdims=True) + 1e-6) + np.eye(binary.shape[0])
    d = a.sum(axis=1) ** -0.5
    return d[:, None] * a.T * d[None, :]


def tegah_adjacency(labels: np.ndarray | Tensor, kind: str, threshold: float) -> np.ndarray:
    """The (C, C) normalised label adjacency from the training labels.

    - ``code``: the published code: S = (Co Co) / ||Co||_F^2 (its "cosine_similarity"),
      divided row-wise by the class counts, thresholded. On real data no entry reaches the
      threshold, so the graph is the identity.
    - ``cosine``: the paper's "cosine quantisation" of the co-occurrence (Eq. 11 is
      garbled): the cosine similarity of the rows of Co, thresholded.
    - ``cooccurrence``: ML-GCN's P(j | i) = Co_ij / n_i, thresholded (GCDH's graph).
    """
    y = np.asarray(labels, dtype=np.float64)
    co = y.T @ y
    counts = np.maximum(y.sum(axis=0), 1.0)
    if kind == "code":
        similarity = (co @ co) / max(float((co ** 2).sum()), 1e-12)
        weights = similarity / counts[:, None]
    elif kind == "cosine":
        norms = np.maximum(np.linalg.norm(co, axis=1), 1e-12)
        weights = (co / norms[:, None]) @ (co / norms[:, None]).T
    elif kind == "cooccurrence":
        weights = co / counts[:, None]
    else:
        raise ConfigError(f"unknown label graph {kind!r}; available: {', '.join(LABEL_GRAPHS)}")
    return _normalised((weights >= threshold).astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- losses


def triplet_term(h_i: Tensor, h_t: Tensor, labels: Tensor, margin: float) -> Tensor:
    """l(h_i, h_t) + l(h_i, h_i) + l(h_t, h_i) + l(h_t, h_t): the nDCG-weighted cosine triplet
    loss, cross- and intra-modal as in the code (the paper has the two cross-modal terms)."""
    pairs = ((h_i, h_t), (h_i, h_i), (h_t, h_i), (h_t, h_t))
    return sum(dcg_triplet_loss(a, t, labels, margin=margin) for a, t in pairs)


def quantization_term(h: Tensor, shared_rows: Tensor) -> Tensor:
    """sum_b (1 - cos(h_b, sign h_b)) + ||h - sign h||^2 + ||B_glob[ind] - h||^2 / (B M)."""
    signs = binarize(h.detach())
    cosine = (1.0 - F.cosine_similarity(h, signs, dim=1, eps=1e-8)).sum()
    return cosine + quantization_loss(signs, h) + quantization_loss(shared_rows, h) / h.numel()


def tegah_wasserstein(h_i: Tensor, h_t: Tensor, reg: float = 0.01, max_iter: int = 100) -> Tensor:
    """Entropic OT between the image and the text codes of the batch (uniform weights,
    squared Euclidean cost), differentiated through the Sinkhorn iterations."""
    return wasserstein_loss(h_i, h_t, reg=reg, max_iter=max_iter)


def lr_factor(schedule: str, epoch: int, batches: int, period: int) -> float:
    """The learning-rate factor after epoch ``epoch`` (0-based) has run ``batches`` batches.
    ``code``: the published formula 1/2 (1 + cos(pi n_b / (e + 1))), which is
    0 after some early epochs; ``cosine``: standard annealing over ``period`` epochs."""
    if schedule == "code":
        return 0.5 * (1.0 + math.cos(math.pi * batches / (epoch + 1)))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch + 1, period) / period))
    return 1.0


# --------------------------------------------------------------------------- the method


@register_method("tegah")
class TEGAH(HashingMethod):
    Config = TEGAHConfig

    def __init__(self, config: TEGAHConfig, info: DatasetInfo) -> None:
        super().__init__(config, info)
        c = config
        self.image_net = ImageTower(c)
        self.text_net: nn.Module = DTFEN(info.text_dim, c) if c.use_dtfen else PlainTextNet(info.text_dim, c)
        self.label_net = MLAH(info.n_labels, c) if c.use_mlah else None
        self.fusion = None
        if c.use_gafm:
            adjacency = torch.from_numpy(tegah_adjacency(info.train_labels.numpy(), c.graph, c.threshold))
            self.fusion = GAFM(c, adjacency, gru_over_batch=c.reference_code, gat_trainable=not c.reference_code)

        n, bits = info.n_train, c.bits
        new_bank = (lambda: torch.randn(n, bits)) if c.bank_init == "randn" else (lambda: torch.zeros(n, bits))
        self.F_bank, self.G_bank = new_bank(), new_bank()
        self.L_bank = new_bank() if c.use_mlah else None
        self.train_labels = info.train_labels.float()  # the teacher's bank without MLAH
        self.B_glob = self._shared_codes()  # refreshed only at epoch ends

        def adamw(module, lr, wd):
            return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=wd)

        self._optimizers = {
            "image": adamw(self.image_net, c.lr_image, c.weight_decay_image),
            "text": torch.optim.Adam(self.text_net.parameters(), lr=c.lr_text, weight_decay=c.weight_decay_text),
        }
        if self.fusion is not None:
            self._optimizers["fusion"] = adamw(self.fusion, c.lr_fusion, c.weight_decay_fusion)
        if self.label_net is not None:
            self._optimizers["label"] = adamw(self.label_net, c.lr_label, c.weight_decay_label)
        self._base_lr = {name: opt.param_groups[0]["lr"] for name, opt in self._optimizers.items()}

    @classmethod
    def image_preprocessing(cls, config: TEGAHConfig) -> dict:
        preprocess = super().image_preprocessing(config)
        if config.image_mean is not None:
            preprocess["mean"] = [float(v) for v in config.image_mean]
        if config.image_std is not None:
            preprocess["std"] = [float(v) for v in config.image_std]
        return preprocess

    # -- saved state ---------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        out = {"image_net": self.image_net, "text_net": self.text_net}
        if self.label_net is not None:
            out["label_net"] = self.label_net
        if self.fusion is not None:
            out["fusion"] = self.fusion
        return out

    def sample_buffers(self) -> dict[str, Tensor]:
        out = {"F_bank": self.F_bank, "G_bank": self.G_bank}
        if self.L_bank is not None:
            out["L_bank"] = self.L_bank
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.sample_buffers(), "B_glob": self.B_glob, "train_labels": self.train_labels}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = set(self.state_tensors())
        if set(tensors) != expected:
            raise KeyError(f"TEGAH state tensors are {sorted(expected)}, got {sorted(tensors)}")
        self.F_bank, self.G_bank, self.B_glob = tensors["F_bank"], tensors["G_bank"], tensors["B_glob"]
        self.train_labels = tensors["train_labels"]
        if self.L_bank is not None:
            self.L_bank = tensors["L_bank"]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    # -- training --------------------------------------------------------------------------

    def _shared_codes(self) -> Tensor:
        total = self.F_bank + self.G_bank + (self.L_bank if self.L_bank is not None else 0)
        return binarize(total)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Forward every network and return the loss terms (and 'total'), writing the bank
        rows of the batch in the code's order ("per-batch order")."""
        labels = batch.labels
        h_l = self.label_net(labels) if self.label_net is not None else None
        h_t, f_t = self.text_net.encode(batch.text)
        h_i, f_i = self.image_net.encode(batch.image)
        logits = self.fusion(f_i, f_t) if self.fusion is not None else None
        # the losses and the float32 banks in full precision, also under train.amp's autocast
        with torch.autocast(h_i.device.type, enabled=False):
            return self._loss_terms(batch, h_i.float(), h_t.float(), None if h_l is None else h_l.float(),
                                    None if logits is None else logits.float())

    def _loss_terms(self, batch: Batch, h_i: Tensor, h_t: Tensor, h_l: Tensor | None,
                    logits: Tensor | None) -> dict[str, Tensor]:
        c, ind, labels = self.config, batch.index, batch.labels
        terms: dict[str, Tensor] = {}
        if h_l is not None:
            self.L_bank[ind] = h_l.detach()
            teacher, teacher_bank = (h_l.detach() if c.detach_teacher else h_l), self.L_bank
        else:  # the ground-truth labels teach
            teacher, teacher_bank = labels, self.train_labels
        if logits is not None:
            terms["classification"] = classification_loss(logits, labels)

        def kl(student, student_bank):
            return label_distillation_loss(teacher, teacher_bank, student, student_bank)

        w = KL_WEIGHTS
        distill = torch.zeros((), device=h_i.device)
        if h_l is not None:  # against F and G as they were before this batch
            distill = distill + w["l_l"] * kl(h_l, self.L_bank) + w["l_f"] * kl(h_l, self.F_bank) \
                + w["l_g"] * kl(h_l, self.G_bank)
        # without MLAH there is no label bank: the other modality's bank stands in for it
        image_second, text_second = (self.L_bank, self.L_bank) if h_l is not None else (self.G_bank, self.F_bank)
        self.F_bank[ind] = h_i.detach()
        distill = distill + w["i_f"] * kl(h_i, self.F_bank) + w["i_l"] * kl(h_i, image_second)
        self.G_bank[ind] = h_t.detach()
        distill = distill + w["t_g"] * kl(h_t, self.G_bank) + w["t_l"] * kl(h_t, text_second)
        terms["distillation"] = distill

        terms["triplet"] = triplet_term(h_i, h_t, labels, c.margin)
        shared = self.B_glob[ind]
        quant = quantization_term(h_i, shared) + quantization_term(h_t, shared)
        if h_l is not None:
            quant = quant + quantization_term(h_l, shared)
        terms["quantization"] = quant
        terms["wasserstein"] = tegah_wasserstein(h_i, h_t, c.wasserstein_reg, c.wasserstein_iters)
        terms["total"] = c.alpha * terms["triplet"] + sum(v for k, v in terms.items() if k != "triplet")
        return terms

    def train_step(self, batch: Batch, ctx) -> dict[str, float]:
        with ctx.autocast():
            terms = self.losses(batch)  # the networks in mixed precision with train.amp
        total = terms.pop("total")
        ctx.backward_step(total, list(self._optimizers.values()), name="total", terms=terms)
        return {"total": total.item(), **{k: v.item() for k, v in terms.items()}}

    def on_epoch_end(self, epoch: int, ctx) -> dict[str, float]:
        self.B_glob = self._shared_codes()
        factor = lr_factor(self.config.schedule, epoch, ctx.step, self.config.lr_cosine_epochs)
        for name, opt in self._optimizers.items():
            for group in opt.param_groups:
                group["lr"] = self._base_lr[name] * factor
        return {"lr_factor": factor}

    # -- inference -------------------------------------------------------------------------

    def image_tower(self) -> nn.Module:
        return self.image_net

    def image_backbone(self) -> nn.Module:
        return self.image_net.backbone

    def text_tower(self) -> nn.Module:
        return self.text_net


# Earlier names, before TEGAH took EGATH's and HFAH's spelling; kept for one release.
Tegah = TEGAH
TegahConfig = TEGAHConfig
