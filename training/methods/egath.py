"""EGATH: End-to-end Graph Attention network Hashing (Jin et al., NeurIPS 2024).

Where the paper leaves a detail open, the choice made here is stated beside it.

- image tower "CLIPTrans": CLIP image encoder -> one Transformer encoder layer over
  the embedding as a length-1 sequence -> Linear to the working width h -> hash head;
- text tower "TransFC": bag of words -> Linear to d_model (one token) -> Transformer
  encoder layer -> Linear to h -> hash head;
- GAT label classifier over the label graph built from the training labels,
  on concat(F_I, F_T) (or per modality); training only;
- loss: lambda_tri * four DCG-weighted cosine triplet terms + quantisation towards the
  discrete code matrix B + BCE classification; B updated once per epoch;
- Adam with weight decay, the backbone at a smaller learning rate, geometric decay of
  every group to ``final_lr`` over ``decay_epochs``.

Ablations: ``use_gat: false`` is EGATH-G, ``use_triplet: false`` is EGATH-T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..blocks import (DiscreteCodes, GATLabelClassifier, HashHead, LabelEmbeddings, binarize,
                      build_image_backbone, classification_loss, dcg_triplet_loss, label_graph, quantization_loss)
from ..blocks.pretrained import check_one_weights_source
from ..errors import ConfigError
from ..method import Batch, DatasetInfo, HashingMethod, MethodConfig, register_method


@dataclass
class EGATHConfig(MethodConfig):
    bits: int = 64
    # image tower
    backbone: str = "clip:ViT-B-32"  # 'clip:tiny-resnet' for the demo and tests
    # pretrained weights: a library tag (open_clip 'openai', timm 'ms_in22k_ft_in1k', ...) or a local file in the
    # library's format, fetched through the library's cache (docs/pretrained.md); None: random initialisation
    pretrained: str | None = None
    backbone_weights: str | None = None  # a local file with the backbone's own keys (the same as a local 'pretrained')
    freeze_backbone: bool = False  # fine-tuned by default, at backbone_lr
    # transformer blocks of both towers
    d_model: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    layers: int = 1
    dropout: float = 0.1
    hidden: int = 2048  # h: width of F_I and F_T
    # GAT label classifier
    use_gat: bool = True  # false: EGATH-G
    per_modality: bool = False  # logits from F_I and F_T separately instead of their concat
    gat_hidden: int = 1024
    gat_slope: float = 0.2
    gat_dropout: float = 0.0
    graph_threshold: float = 0.3  # 0.01 for NUS-WIDE
    label_embeddings: str | None = None  # a *_glove.mat file; None: learned embeddings
    label_embedding_dim: int = 300
    # loss
    use_triplet: bool = True  # false: EGATH-T
    margin: float = 0.3
    triplet_weight: float = 10.0
    quantization_weight: float = 1.0
    classification_weight: float = 1.0
    # discrete update
    mu: float = 0.5
    gamma: float = 0.01
    rho: float = 1.05
    ridge: float = 1.0
    procrustes_scale: float = 1.0
    # optimisation
    lr: float = 1e-4
    backbone_lr: float = 1e-5
    final_lr: float = 1e-6
    decay_epochs: int = 100  # geometric decay reaches final_lr after this many epochs (= train.epochs)
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_one_weights_source(self)
        if self.d_model % self.heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be a multiple of model.heads ({self.heads})")
        for name in ("d_model", "heads", "ffn_dim", "layers", "hidden", "gat_hidden", "decay_epochs",
                     "label_embedding_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "backbone_lr", "final_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.gat_dropout < 1.0:
            raise ConfigError("model.dropout and model.gat_dropout must be in [0, 1)")
        if not 0.0 < self.graph_threshold <= 1.0:
            raise ConfigError(f"model.graph_threshold must be in (0, 1], got {self.graph_threshold}")


def _encoder(d_model: int, heads: int, ffn_dim: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    # Post-norm layers, PyTorch's default. batch_first, and the input is one token
    # per sample, so attention never runs across the batch.
    layer = nn.TransformerEncoderLayer(d_model, heads, ffn_dim, dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TokenTower(nn.Module):
    """A feature vector as a length-1 sequence through Transformer layers, then Linear to
    ``hidden`` (F), then the hash head (H). The shared back half of both EGATH towers."""

    def __init__(self, in_dim: int, config: EGATHConfig, embed: bool = True):
        super().__init__()
        self.embed = nn.Linear(in_dim, config.d_model) if embed else nn.Identity()
        self.encoder = _encoder(config.d_model, config.heads, config.ffn_dim, config.layers, config.dropout)
        self.out = nn.Linear(config.d_model, config.hidden)
        self.hash = HashHead(config.hidden, config.bits)

    def features(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).unsqueeze(1)  # (N, 1, d_model)
        return self.out(self.encoder(tokens).squeeze(1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        return f, self.hash(f)


class ImageTower(nn.Module):
    """CLIPTrans: preprocessed images (N, 3, S, S) -> tanh codes (N, bits)."""

    def __init__(self, config: EGATHConfig):
        super().__init__()
        self.backbone = build_image_backbone(config.backbone, config.pretrained or config.backbone_weights,
                                             config.freeze_backbone)
        # CLIP ViT-B-32's embedding already has d_model = 512 features; other widths get a projection
        self.head = TokenTower(self.backbone.output_dim, config, embed=self.backbone.output_dim != config.d_model)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(F_I, H_I)."""
        return self.head(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)[1]


class TextTower(nn.Module):
    """TransFC: bag of words (N, text_dim) -> tanh codes (N, bits)."""

    def __init__(self, text_dim: int, config: EGATHConfig):
        super().__init__()
        self.head = TokenTower(text_dim, config)

    def encode(self, bow: Tensor) -> tuple[Tensor, Tensor]:
        """(F_T, H_T)."""
        return self.head(bow)

    def forward(self, bow: Tensor) -> Tensor:
        return self.encode(bow)[1]


@register_method("egath")
class EGATH(HashingMethod):
    Config = EGATHConfig

    def __init__(self, config: EGATHConfig, info: DatasetInfo) -> None:
        super().__init__(config, info)
        bits, n = config.bits, info.n_train
        self.image = ImageTower(config)
        self.text = TextTower(info.text_dim, config)
        self.classifier: GATLabelClassifier | None = None
        if config.use_gat:
            graph = label_graph(info.train_labels.cpu().numpy(), config.graph_threshold)
            embeddings = LabelEmbeddings(info.n_labels, config.label_embeddings, config.label_embedding_dim)
            width = config.hidden if config.per_modality else 2 * config.hidden
            self.classifier = GATLabelClassifier(graph.adjacency, embeddings, width, config.gat_hidden,
                                                 config.gat_slope, config.gat_dropout)
        self.codes = DiscreteCodes(n, bits, seed=0, gamma=config.gamma, rho=config.rho, mu=config.mu,
                                   ridge=config.ridge, procrustes_scale=config.procrustes_scale)
        self.train_labels = info.train_labels.float().clone()
        # latest tanh outputs of every training sample, written by train_step
        self.image_codes = torch.zeros(n, bits)
        self.text_codes = torch.zeros(n, bits)

        backbone = [p for p in self.image.backbone.parameters() if p.requires_grad]
        in_backbone = {id(p) for p in backbone}
        rest = [p for m in self.modules().values() for p in m.parameters()
                if p.requires_grad and id(p) not in in_backbone]
        groups = [{"params": rest, "lr": config.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": config.backbone_lr})
        self.optimizer = torch.optim.Adam(groups, weight_decay=config.weight_decay)
        # lr_e = lr_0 * g^(e+1) with g = (final_lr / lr_0)^(1 / decay_epochs), per group (GCDH)
        factors = [(config.final_lr / g["lr"]) ** (1.0 / config.decay_epochs) for g in groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [lambda epoch, g=g: g ** epoch for g in factors])

    # -- saved state ---------------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        out = {"image": self.image, "text": self.text}
        if self.classifier is not None:
            out["classifier"] = self.classifier
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {**{f"codes.{k}": v for k, v in self.codes.state_dict().items()},
                "image_codes": self.image_codes, "text_codes": self.text_codes, "train_labels": self.train_labels}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.codes.load_state_dict({k.removeprefix("codes."): v for k, v in tensors.items() if k.startswith("codes.")})
        self.image_codes, self.text_codes = tensors["image_codes"], tensors["text_codes"]
        self.train_labels = tensors["train_labels"]

    def sample_buffers(self) -> dict[str, Tensor]:
        return {"image_codes": self.image_codes, "text_codes": self.text_codes}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam": self.optimizer}

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {"decay": self.scheduler}

    # -- training ------------------------------------------------------------------------

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Every loss term of one batch and their weighted total ('loss')."""
        c = self.config
        f_i, h_i = self.image.encode(batch.image)
        f_t, h_t = self.text.encode(batch.text)
        self.image_codes[batch.index] = h_i.detach().to(self.image_codes.dtype)
        self.text_codes[batch.index] = h_t.detach().to(self.text_codes.dtype)
        labels = batch.labels
        terms: dict[str, Tensor] = {}
        if c.use_triplet:
            terms["triplet"] = sum(dcg_triplet_loss(a, t, labels, margin=c.margin)
                                   for a, t in ((h_i, h_t), (h_i, h_i), (h_t, h_i), (h_t, h_t)))
        terms["quantization"] = quantization_loss(self.codes.rows(batch.index.to(self.codes.B.device)), h_i, h_t)
        if self.classifier is not None:
            if c.per_modality:
                terms["classification"] = 0.5 * (classification_loss(self.classifier(f_i), labels)
                                                 + classification_loss(self.classifier(f_t), labels))
            else:
                terms["classification"] = classification_loss(self.classifier(torch.cat([f_i, f_t], 1)), labels)
        weights = {"triplet": c.triplet_weight, "quantization": c.quantization_weight,
                   "classification": c.classification_weight}
        terms["loss"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    def train_step(self, batch: Batch, ctx) -> dict[str, float | Tensor]:
        with ctx.autocast():
            terms = self.losses(batch)
        total = terms.pop("loss")
        ctx.backward_step(total, self.optimizer, "loss", terms)
        return {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}

    def on_epoch_end(self, epoch: int, ctx) -> dict[str, float]:
        labels = self.train_labels.to(self.codes.B.device)
        self.codes.update(labels, self.image_codes.float(), self.text_codes.float())
        agreement = (self.codes.B == binarize(self.image_codes)).float().mean()
        return {"gamma": self.codes.gamma, "code_agreement_image": float(agreement)}

    def image_backbone(self) -> nn.Module:
        return self.image.backbone

    # -- inference -----------------------------------------------------------------------

    def image_tower(self) -> nn.Module:
        return self.image

    def text_tower(self) -> nn.Module:
        return self.text
