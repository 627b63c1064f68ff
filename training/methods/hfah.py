"""HFAH: hybrid-attention based feature-reconstructive adversarial hashing (Li and Wang).

It corrects the paper as printed in three places (the discriminator update's
sign, the swapped indices of Eqs. 7-8, the undefined B^{x'}) and fills in what the paper
inherits from SSAH and DCMH. Letters as in the paper: x = text, y = image, l = label.

Networks:

- :class:`LabelNet` (c -> 4096 -> 512 = f^l -> k tanh = H^l, plus a c-way sigmoid head),
  trained first, then the teacher of the other two through the pairwise likelihood
  (theta = 1/2 inner product) against memory banks of every training sample's output.
- :class:`TextNet`: multi-scale fusion of the bag of words (average pools at several
  windows, 1x1 conv, resized back, stacked with the raw input), then 4096 -> 512 -> k.
- :class:`ImageTower`: CNN convolutions -> :class:`HybridAttention` (channel, then spatial,
  added through a gate that starts at 0) -> the CNN's fully connected layers -> 512 -> k.
- Four decoders from each modality's code into both feature spaces and two
  discriminators on the reconstructed features (D1: text space, D2: image space).

One iteration on a minibatch: label step, text step, image step, discriminator
step; the unified codes B = sign(H^l + H^x + H^y) are recomputed once per epoch.

Ablations, nested: HFAH-3 = ``recon=false`` (no decoders, discriminators,
reconstruction or adversarial terms); HFAH-2 = HFAH-3 + ``attention=false``; HFAH-1 =
HFAH-2 + ``text_multiscale=false``. :data:`ABLATIONS` lists the overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmhash.errors import CmhashError

from ..blocks import HashHead, binarize, build_image_backbone, label_similarity, load_weights_file, pairwise_nll_loss
from ..blocks.backbones import backbone_preprocess
from ..blocks.pretrained import check_one_weights_source, file_sha256
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess_config
from ..errors import ConfigError
from ..method import Batch, DatasetInfo, HashingMethod, MethodConfig, register_method

__all__ = ["ABLATIONS", "HFAH", "HFAHConfig", "AdversarialDivergenceError", "HybridAttention", "ImageTower",
           "LabelNet", "MultiScaleFusion", "TextNet", "pairwise_loss"]

# model.* overrides of the paper's ablation variants (nested)
ABLATIONS: dict[str, dict[str, bool]] = {
    "hfah": {},
    "hfah-3": {"recon": False},
    "hfah-2": {"recon": False, "attention": False},
    "hfah-1": {"recon": False, "attention": False, "text_multiscale": False},
}

OWN_BACKBONES = ("cnnf", "tiny-cnn")


class AdversarialDivergenceError(CmhashError, RuntimeError):
    """The adversarial game diverged: a loss exploded or the discriminators collapsed.

    ``kind`` is ``"exploding-loss"`` or ``"collapsed-discriminator"``; ``term`` and ``value``
    name what was seen. Raised before the offending step changes any weight.
    """

    def __init__(self, kind: str, term: str, value: float, message: str) -> None:
        self.kind, self.term, self.value = kind, term, value
        super().__init__(message)


@dataclass
class HFAHConfig(MethodConfig):
    """HFAH hyper-parameters. Defaults follow the paper (MIRFlickr, 224-pixel images) except
    ``feature_relu`` and ``ssah_init``, both changed after measurements (docs/hfah.md)."""

    bits: int = 64
    # image network: 'torchvision:alexnet' (default substitute for CNN-F), another torchvision CNN
    # with a `features` conv stack (e.g. 'torchvision:vgg16'), 'cnnf' (CNN-F's layer table) or
    # 'tiny-cnn' (tests, demo)
    backbone: str = "torchvision:alexnet"
    # torchvision backbones: a weights enum entry ('AlexNet_Weights.IMAGENET1K_V1'), fetched through torchvision's
    # cache, or a local torchvision state dict (docs/pretrained.md); None: random initialisation
    pretrained: str | None = None
    # a local file: for torchvision backbones the network's own state dict (as a local 'pretrained'); for 'cnnf'
    # and 'tiny-cnn' keys 'conv.*' and 'head.*' of the image tower, or CNN-F's MatConvNet .mat for 'cnnf'
    backbone_weights: str | None = None
    freeze_backbone: bool = False  # keep the backbone's conv and fc6/fc7 layers fixed
    tiny_width: int = 64  # fc6/fc7 width of 'tiny-cnn'
    image_size: int | None = None  # input side; None: 224 (AlexNet, VGG, CNN-F) or 64 ('tiny-cnn')
    hidden: int = 4096  # hidden width of the label and text networks
    feature_dim: int = 512  # d_f: width of f^l, f^x, f^y and of the reconstructions
    lrn: bool = True  # SSAH's local response normalisation in the label and text networks
    # ReLU on the 512-d features f (the paper's choice). ReLU features have inner products >= 0, so the NLL can
    # only push dissimilar pairs to theta = 0 by shrinking features; with sparse labels (few shared)
    # that kills every feature. false: linear features, theta of either sign.
    feature_relu: bool = False
    # SSAH's N(0, 0.01^2) initialisation of the label network; measured to leave it stuck at
    # theta = 0 (NLL = log 2), so PyTorch's default initialisation is the default here
    ssah_init: bool = False
    text_windows: list[int] = field(default_factory=lambda: [5, 10, 15, 30, 50])  # multi-scale pools
    attention_reduction: int = 16  # channel-MLP reduction r of the hybrid attention
    attention_kernel: int = 7  # spatial-attention conv size
    attention_mode: str = "gated"  # 'gated': F + lambda * attended, lambda starts at 0; 'cbam': attended only
    # ablation switches (HFAH-3: recon off; HFAH-2: + attention off; HFAH-1: + text_multiscale off)
    recon: bool = True
    attention: bool = True
    text_multiscale: bool = True
    # loss weights (the paper reuses alpha/beta/gamma, so they get separate names)
    alpha_q: float = 1.0  # label-code quantisation
    beta_cls: float = 1.0  # label prediction
    beta_c: float = 1.0  # consistency of the modality codes with sign(H) and with B
    gamma_r: float = 1.0  # feature reconstruction
    delta_adv: float = 1.0  # generators' adversarial term
    adv_gen: str = "both"  # 'both': self and cross reconstructions flip labels; 'fake_only': cross only
    pair_loss: str = "nll"  # 'nll' (the paper) or 'ssah_sq' (SSAH code's squared residual)
    straight_through: bool = False  # decoders see sign(H) with a straight-through gradient
    hash_guidance: bool = False  # SSAH extra: NLL between label codes and modality codes
    # schedule
    label_pretrain_epochs: int = 10  # passes over the training labels before the other nets start
    freeze_label_net: bool = False  # no label steps after pre-training
    lr_label: float = 1e-2
    lr_text: float = 10 ** -3.5  # text net and the text-code decoders
    lr_image_backbone: float = 10 ** -4.5  # backbone conv and fc6/fc7 (pretrained) layers
    lr_image: float = 10 ** -3.5  # attention, fc8, hash layer and the image-code decoders
    lr_disc: float = 1e-3
    lr_schedule: str = "cosine"  # 'cosine' (to 1 % over schedule_epochs), 'ssah' (x 10^-0.5 per epoch), 'constant'
    schedule_epochs: int = 30
    # divergence detection
    max_loss: float = 1e4  # any step's loss above this: exploding
    min_disc_loss: float = 1e-3  # epoch-mean discriminator loss below this: collapsed (it wins outright)
    collapse_epochs: int = 2  # consecutive collapsed epochs before stopping

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"attention_mode": ("gated", "cbam"), "adv_gen": ("both", "fake_only"),
                   "pair_loss": ("nll", "ssah_sq"), "lr_schedule": ("cosine", "ssah", "constant")}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ConfigError(f"model.{name} must be one of {list(options)}, got {getattr(self, name)!r}")
        family = self.backbone.partition(":")[0]
        if self.backbone not in OWN_BACKBONES and family != "torchvision":
            raise ConfigError(f"model.backbone must be 'torchvision:<cnn>' (e.g. torchvision:alexnet) or one of "
                              f"{list(OWN_BACKBONES)}, got {self.backbone!r}")
        check_one_weights_source(self)
        if self.pretrained is not None and self.backbone in OWN_BACKBONES:
            raise ConfigError(f"model.pretrained names library weights; {self.backbone!r} is HFAH's own network, "
                              f"which takes model.backbone_weights (a local file) instead")
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"model.image_size must be positive, got {self.image_size}")
        positive = ("tiny_width", "hidden", "feature_dim", "attention_reduction", "attention_kernel",
                    "schedule_epochs", "collapse_epochs")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.attention_kernel % 2 == 0:
            raise ConfigError(f"model.attention_kernel must be odd (same-size padding), got {self.attention_kernel}")
        if not self.text_windows or any(w <= 0 for w in self.text_windows):
            raise ConfigError(f"model.text_windows must be a non-empty list of positive sizes, got {self.text_windows}")
        if self.label_pretrain_epochs < 0:
            raise ConfigError(f"model.label_pretrain_epochs must be >= 0, got {self.label_pretrain_epochs}")


# --------------------------------------------------------------------------- building blocks


def _lrn() -> nn.Module:
    # TF's lrn(depth_radius=2, bias=2, alpha=1e-4, beta=0.75); torch divides alpha by size
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


class VectorLRN(nn.Module):
    """Local response normalisation across the features of (N, D) vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.lrn = _lrn()

    def forward(self, x: Tensor) -> Tensor:
        return self.lrn(x.unsqueeze(-1)).squeeze(-1)


def _normal_init(module: nn.Module, std: float = 0.01) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.normal_(m.bias, 0.0, std)


class LabelNet(nn.Module):
    """Multi-hot labels (N, c) -> f^l (N, d_f), H^l (N, k), label probabilities (N, c)."""

    def __init__(self, n_labels: int, bits: int, hidden: int, feature_dim: int, lrn: bool,
                 feature_relu: bool = False, ssah_init: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(n_labels, hidden), nn.ReLU(), VectorLRN() if lrn else nn.Identity())
        self.fc2 = nn.Sequential(nn.Linear(hidden, feature_dim), nn.ReLU() if feature_relu else nn.Identity())
        self.hash = HashHead(feature_dim, bits)
        self.classifier = nn.Linear(feature_dim, n_labels)
        if ssah_init:
            _normal_init(self)  # SSAH's N(0, 0.01^2) for weights and biases

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f = self.fc2(self.fc1(labels))
        return f, self.hash(f), torch.sigmoid(self.classifier(f))


class MultiScaleFusion(nn.Module):
    """(N, T) bag of words -> (N, (1 + len(windows)) * T): the raw input stacked with, per
    window w, average pools of stride w through a 1x1 conv and ReLU, resized back to T."""

    def __init__(self, text_dim: int, windows: list[int]) -> None:
        super().__init__()
        too_wide = [w for w in windows if w > text_dim]
        if too_wide:
            raise ConfigError(f"model.text_windows {too_wide} are wider than the {text_dim}-word bag of words; "
                              f"use windows <= {text_dim}, e.g. [1, 2, 4, 8] for small vocabularies")
        self.text_dim = text_dim
        self.windows = list(windows)
        self.convs = nn.ModuleList(nn.Conv1d(1, 1, kernel_size=1) for _ in windows)
        for conv in self.convs:  # weight 1, bias 0: SSAH's N(0, 0.01^2) leaves about half the branches dead under ReLU
            nn.init.ones_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.output_dim = (1 + len(windows)) * text_dim

    def forward(self, bow: Tensor) -> Tensor:
        x = bow.unsqueeze(1)  # (N, 1, T)
        branches = [x]
        for w, conv in zip(self.windows, self.convs):
            pooled = F.relu(conv(F.avg_pool1d(x, kernel_size=w, stride=w)))
            branches.append(F.interpolate(pooled, size=self.text_dim, mode="linear", align_corners=False))
        return torch.cat(branches, dim=1).flatten(1)


class TextNet(nn.Module):
    """Bag of words (N, T) -> f^x (N, d_f), H^x (N, k). ``forward`` returns H^x only (the tower)."""

    def __init__(self, text_dim: int, bits: int, hidden: int, feature_dim: int, lrn: bool,
                 multiscale: bool, windows: list[int], feature_relu: bool = False) -> None:
        super().__init__()
        self.fusion = MultiScaleFusion(text_dim, windows) if multiscale else nn.Identity()
        width = self.fusion.output_dim if multiscale else text_dim
        self.fc1 = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), VectorLRN() if lrn else nn.Identity())
        self.fc2 = nn.Sequential(nn.Linear(hidden, feature_dim), nn.ReLU() if feature_relu else nn.Identity())
        self.norm = VectorLRN() if lrn else nn.Identity()
        self.hash = HashHead(feature_dim, bits)

    def encode(self, bow: Tensor) -> tuple[Tensor, Tensor]:
        f = self.fc2(self.fc1(self.fusion(bow)))
        return f, self.hash(self.norm(f))

    def forward(self, bow: Tensor) -> Tensor:
        return self.encode(bow)[1]


class HybridAttention(nn.Module):
    """CBAM-style channel-then-spatial attention on (N, C, H, W) maps.

    ``mode="gated"``: out = x + gate * attended with ``gate`` a learnable scalar that starts
    at 0, so the network starts as the plain CNN (pretrained fc6/fc7 statistics kept);
    ``mode="cbam"``: out = attended.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, mode: str = "gated") -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.mode = mode
        self.gate = nn.Parameter(torch.zeros(())) if mode == "gated" else None

    def forward(self, x: Tensor) -> Tensor:
        channel = torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True)))
        y = channel * x
        maps = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        y = torch.sigmoid(self.spatial(maps)) * y
        return x + self.gate * y if self.gate is not None else y


def _tiny_cnn(image_size: int, width: int) -> tuple[nn.Module, int, nn.Module, int]:
    """A small test CNN: three 3x3 convs (16, 32, 64) with 2x2 max pools; fc6/fc7 of ``width``."""
    if image_size % 8:
        raise ConfigError(f"backbone 'tiny-cnn' needs an image size divisible by 8, got {image_size}")
    conv = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
    )
    side = image_size // 8
    head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * side * side, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU())
    return conv, 64, head, width


def _cnnf() -> tuple[nn.Module, int, nn.Module, int]:
    """CNN-F (Chatfield et al. 2014) as in DCMH/SSAH, 224-pixel input; conv5 -> 256 x 13 x 13."""
    conv = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4), nn.ReLU(), _lrn(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 256, 5, padding=2), nn.ReLU(), _lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )
    head = nn.Sequential(nn.MaxPool2d(3, 2), nn.Flatten(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU())
    return conv, 256, head, 4096


# CNN-F's weighted layers in a MatConvNet file, in the order of _cnnf()'s Conv2d and Linear modules
MATCONVNET_CNNF_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


def _matconvnet_find(mat: dict, *paths: str):
    """The first of ``paths`` ('a' or 'a.b') present in a loadmat result, else None."""
    for path in paths:
        head, *rest = path.split(".")
        value = mat.get(head)
        for attr in rest:
            value = getattr(value, attr, None)
        if value is not None:
            return value
    return None


def load_cnnf_matconvnet(path, conv: nn.Module, head: nn.Module) -> dict[str, Tensor]:
    """A state dict ('conv.*', 'head.*') for :func:`_cnnf`'s modules from MatConvNet's
    ``imagenet-vgg-f.mat`` (read by scipy; MATLAB files hold arrays, nothing is unpickled).

    MatConvNet filters are (height, width, in, out) and become (out, in, height, width);
    fc6 (6 x 6 x 256 x 4096) becomes the Linear over the flattened 256 x 6 x 6 map. CNN-F
    takes 0-255 RGB minus ``normalization.averageImage``; the pipeline here feeds ImageNet
    mean/std-normalised pixels, so conv1 is rescaled and its bias absorbs the mean: exact
    for a per-channel mean (conv1 has no padding, so every window sees the whole offset).
    A full 224 x 224 mean image is reduced to its per-channel mean, as MatConvNet's own
    DagNN release of the model does.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # not MATLAB, truncated, or a v7.3 (HDF5) file scipy does not read
        raise ConfigError(f"{path} is not a MATLAB file scipy can read ({exc}); give MatConvNet's "
                          f"imagenet-vgg-f.mat (MATLAB v7 or older)") from exc
    layers = _matconvnet_find(mat, "layers", "net.layers")
    normalization = _matconvnet_find(mat, "normalization", "meta.normalization", "net.meta.normalization",
                                     "net.normalization")
    if layers is None or normalization is None or getattr(normalization, "averageImage", None) is None:
        raise ConfigError(f"{path} has no MatConvNet 'layers' and 'normalization.averageImage'; "
                          f"is it imagenet-vgg-f.mat?")
    by_name = {str(getattr(layer, "name", "")): layer for layer in np.atleast_1d(layers)}
    targets = [(f"conv.{n}", m) for n, m in conv.named_modules() if isinstance(m, nn.Conv2d)]
    targets += [(f"head.{n}", m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    state: dict[str, Tensor] = {}
    channels = 3
    for (key, module), name in zip(targets, MATCONVNET_CNNF_LAYERS, strict=True):
        layer = by_name.get(name)
        if layer is None:
            raise ConfigError(f"{path} has no layer {name!r} (layers: {', '.join(by_name)}); is it imagenet-vgg-f.mat?")
        pair = getattr(layer, "weights", None)  # older MatConvNet files: 'filters' and 'biases'
        pair = (getattr(layer, "filters", None), getattr(layer, "biases", None)) if pair is None else tuple(pair)
        if len(pair) != 2 or any(a is None for a in pair):
            raise ConfigError(f"layer {name!r} of {path} has no (filters, biases) pair")
        filters, biases = pair
        if isinstance(module, nn.Conv2d):
            out, channels, kh, kw = module.weight.shape
        else:  # fc6 reads the flattened (channels, side, side) map, fc7 a vector
            out, width = module.weight.shape
            kh = kw = math.isqrt(width // channels)
            if kh * kw * channels != width:
                channels, kh, kw = width, 1, 1
        filters, biases = np.asarray(filters, np.float32), np.asarray(biases, np.float32)
        if filters.size != kh * kw * channels * out or biases.size != out:
            raise ConfigError(f"layer {name!r} of {path} holds filters {filters.shape} and biases {biases.shape}, "
                              f"CNN-F's are ({kh}, {kw}, {channels}, {out}) and ({out},)")
        weight = torch.from_numpy(np.ascontiguousarray(filters.reshape(kh, kw, channels, out).transpose(3, 2, 0, 1)))
        state[f"{key}.weight"] = weight.reshape(module.weight.shape)
        state[f"{key}.bias"] = torch.from_numpy(biases.reshape(out).copy())
        channels = out
    # conv1 on 255 * (x * std + mean) - average  ==  conv1' on x, with
    #   w' = w * 255 * std_c   and   b' = b + sum_c (255 * mean_c - average_c) * sum_hw w[:, c]
    average = np.asarray(normalization.averageImage, np.float64).reshape(-1, 3).mean(axis=0)
    std, mean = torch.tensor(IMAGENET_STD, dtype=torch.float64), torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    offset = 255.0 * mean - torch.from_numpy(average)
    first = targets[0][0]
    w = state[f"{first}.weight"].double()
    state[f"{first}.bias"] = (state[f"{first}.bias"].double() + (w.sum(dim=(2, 3)) * offset).sum(dim=1)).float()
    state[f"{first}.weight"] = (w * (255.0 * std).view(1, 3, 1, 1)).float()
    return state


def _torchvision_cnn(name: str, weights: str | None) -> tuple[nn.Module, int, nn.Module, int, dict | None]:
    """A torchvision CNN with a ``features`` conv stack (AlexNet, VGG) cut after its last ReLU:
    the attention goes on that map (AlexNet: relu5, 256 x 13 x 13), then the last pool,
    ``avgpool`` and the classifier without its last layer (fc6, fc7) and without dropout.
    ``weights``: a torchvision weights tag or a local file; the last value returned is the
    provenance of the weights loaded."""
    backbone = build_image_backbone(name, weights)  # loads the weights, drops the 1000-way layer
    net = backbone.trunk
    if not (hasattr(net, "features") and hasattr(net, "avgpool") and hasattr(net, "classifier")):
        raise ConfigError(f"backbone {name!r} has no features/avgpool/classifier layout; HFAH supports "
                          f"torchvision's AlexNet and VGG families, 'cnnf' and 'tiny-cnn'")
    layers = list(net.features)
    last_relu = max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))
    channels = [m.out_channels for m in layers if isinstance(m, nn.Conv2d)][-1]
    classifier = [nn.Identity() if isinstance(m, nn.Dropout) else m for m in net.classifier]  # CNN-F has no dropout
    widths = [m.out_features for m in classifier if isinstance(m, nn.Linear)]
    conv = nn.Sequential(*layers[: last_relu + 1])
    head = nn.Sequential(*layers[last_relu + 1:], net.avgpool, nn.Flatten(), *classifier)
    return conv, channels, head, widths[-1], backbone.provenance


def backbone_image_size(config: HFAHConfig) -> int:
    if config.image_size is not None:
        return config.image_size
    return 64 if config.backbone == "tiny-cnn" else 224


def backbone_preprocessing(config: HFAHConfig) -> dict:
    """The image preprocessing the configured backbone expects: the pretrained weights' own
    (torchvision's ``transforms()``) with a tag, otherwise ImageNet statistics, bilinear."""
    if config.pretrained is not None:
        pre = backbone_preprocess(config.backbone, config.pretrained)
        if config.image_size is not None and config.image_size != pre["image_size"]:
            raise ConfigError(f"model.image_size {config.image_size} differs from the {pre['image_size']}-pixel images "
                              f"the weights {config.pretrained!r} were trained on; leave it unset")
        return pre
    return preprocess_config(backbone_image_size(config), IMAGENET_MEAN, IMAGENET_STD, "bilinear")


class ImageTower(nn.Module):
    """Images (N, 3, S, S) -> f^y (N, d_f), H^y (N, k): CNN convs -> hybrid attention ->
    CNN fully connected layers -> fc8 (ReLU) -> hash. ``forward`` returns H^y only (the tower)."""

    provenance: dict | None = None  # the weights the backbone started from (see HashingMethod.pretrained_provenance)

    def __init__(self, config: HFAHConfig) -> None:
        super().__init__()
        if config.backbone == "tiny-cnn":
            conv, channels, head, width = _tiny_cnn(backbone_image_size(config), config.tiny_width)
        elif config.backbone == "cnnf":
            conv, channels, head, width = _cnnf()
        else:
            conv, channels, head, width, self.provenance = _torchvision_cnn(
                config.backbone, config.pretrained or config.backbone_weights)
        self.conv, self.head = conv, head
        if config.backbone in OWN_BACKBONES and config.backbone_weights is not None:
            if config.backbone == "cnnf" and str(config.backbone_weights).endswith(".mat"):
                if backbone_image_size(config) != 224:
                    raise ConfigError(f"CNN-F's MatConvNet weights need 224-pixel images, not {backbone_image_size(config)}")
                state = load_cnnf_matconvnet(config.backbone_weights, conv, head)
            else:
                state = load_weights_file(config.backbone_weights)  # keys 'conv.*' and 'head.*' of this module
            missing, unexpected = nn.ModuleDict({"conv": conv, "head": head}).load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ConfigError(f"{config.backbone_weights} does not fit backbone {config.backbone!r}: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            path = Path(config.backbone_weights)
            self.provenance = {"library": "matconvnet" if path.suffix == ".mat" else "cmhash", "model": config.backbone,
                               "tag": None, "file": path.name, "sha256": file_sha256(path)}
        self.attention = (HybridAttention(channels, config.attention_reduction, config.attention_kernel,
                                          config.attention_mode) if config.attention else nn.Identity())
        self.fc8 = nn.Sequential(nn.Linear(width, config.feature_dim),
                                 nn.ReLU() if config.feature_relu else nn.Identity())
        self.hash = HashHead(config.feature_dim, config.bits)
        if config.freeze_backbone:
            self.conv.requires_grad_(False)
            self.head.requires_grad_(False)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in (*self.conv.parameters(), *self.head.parameters()) if p.requires_grad]

    def new_parameters(self) -> list[nn.Parameter]:
        return [*self.attention.parameters(), *self.fc8.parameters(), *self.hash.parameters()]

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.fc8(self.head(self.attention(self.conv(images))))
        return f, self.hash(f)

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)[1]


def _decoder(bits: int, feature_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(bits, feature_dim), nn.ReLU(), nn.Linear(feature_dim, feature_dim))


def _discriminator(feature_dim: int) -> nn.Module:
    """SSAH's discriminator widths (512 -> 512 -> 256 -> 1 for d_f = 512), a logit out."""
    d = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, feature_dim // 2),
                      nn.ReLU(), nn.Linear(feature_dim // 2, 1))
    _normal_init(d)
    return d


class Reconstruction(nn.Module):
    """The four decoders G_{s->t} (code of s -> feature of t) and the discriminators D1
    (text-feature space) and D2 (image-feature space)."""

    def __init__(self, bits: int, feature_dim: int) -> None:
        super().__init__()
        self.txt_to_txt = _decoder(bits, feature_dim)  # G_{x->x}: f_x^x
        self.txt_to_img = _decoder(bits, feature_dim)  # G_{x->y}: f_y^x
        self.img_to_img = _decoder(bits, feature_dim)  # G_{y->y}: f_y^y
        self.img_to_txt = _decoder(bits, feature_dim)  # G_{y->x}: f_x^y

    def text_decoders(self) -> list[nn.Parameter]:
        return [*self.txt_to_txt.parameters(), *self.txt_to_img.parameters()]

    def image_decoders(self) -> list[nn.Parameter]:
        return [*self.img_to_img.parameters(), *self.img_to_txt.parameters()]


# --------------------------------------------------------------------------- losses


def bce(logits: Tensor, target: float) -> Tensor:
    """Mean binary cross-entropy of ``logits`` against a constant label (1 real, 0 fake)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-element mean squared difference (the paper's ||a - b||^2, normalised by the element count)."""
    return (a - b).pow(2).mean()


def ssah_squared_loss(left: Tensor, right: Tensor, similarity: Tensor) -> Tensor:
    """SSAH code's pairwise term: mean 1/2 (s theta - softplus(theta))^2, theta = 1/2 left right^T."""
    theta = 0.5 * left @ right.T
    return 0.5 * (similarity * theta - F.softplus(theta)).pow(2).mean()


def pairwise_loss(bank: Tensor, batch_out: Tensor, similarity: Tensor, kind: str = "nll") -> Tensor:
    """The pairwise term between every training sample's bank row and the batch (n x B):
    the NLL of Eqs. 1-2 (stable, through softplus), or SSAH code's squared residual."""
    if kind == "ssah_sq":
        return ssah_squared_loss(bank, batch_out, similarity)
    return pairwise_nll_loss(bank, batch_out, similarity)


def straight_through_sign(h: Tensor) -> Tensor:
    return h + (binarize(h) - h).detach()


# --------------------------------------------------------------------------- the method


@register_method("hfah")
class HFAH(HashingMethod):
    """See the module docstring for the schedule."""

    Config = HFAHConfig

    def __init__(self, config: HFAHConfig, info: DatasetInfo) -> None:
        super().__init__(config, info)
        c, k, d, n = info.n_labels, config.bits, config.feature_dim, info.n_train
        self.label_net = LabelNet(c, k, config.hidden, d, config.lrn, config.feature_relu, config.ssah_init)
        self.text_net = TextNet(info.text_dim, k, config.hidden, d, config.lrn, config.text_multiscale,
                                config.text_windows, config.feature_relu)
        if backbone_image_size(config) != info.image_size:
            raise ConfigError(f"the data are preprocessed to {info.image_size}-pixel images but HFAH's backbone "
                              f"{config.backbone!r} is configured for {backbone_image_size(config)} (model.image_size)")
        self.image_net = ImageTower(config)
        self.recon = Reconstruction(k, d) if config.recon else None
        self.disc = nn.ModuleDict({"text": _discriminator(d), "image": _discriminator(d)}) if config.recon else None

        self.train_labels = info.train_labels.float().clone()
        # memory banks: row i = the latest output for training sample i
        self.banks = {name: torch.zeros(n, k if name.startswith("H") else d)
                      for name in ("F_label", "H_label", "F_text", "H_text", "F_image", "H_image")}
        self.B = torch.ones(n, k)  # unified codes sign(H^l + H^x + H^y), set by on_fit_start
        self.collapsed_epochs = torch.tensor(0)
        self._disc_sum, self._disc_steps = 0.0, 0

        adam = dict(betas=(0.9, 0.999))
        text_params = [*self.text_net.parameters(), *(self.recon.text_decoders() if self.recon else [])]
        image_new = [*self.image_net.new_parameters(), *(self.recon.image_decoders() if self.recon else [])]
        image_groups = [{"params": image_new, "lr": config.lr_image}]
        if self.image_net.backbone_parameters():
            image_groups.append({"params": self.image_net.backbone_parameters(), "lr": config.lr_image_backbone})
        self._optimizers = {
            "label": torch.optim.Adam(self.label_net.parameters(), lr=config.lr_label, **adam),
            "text": torch.optim.Adam(text_params, lr=config.lr_text, **adam),
            "image": torch.optim.Adam(image_groups, **adam),
        }
        if self.disc is not None:
            self._optimizers["disc"] = torch.optim.Adam(self.disc.parameters(), lr=config.lr_disc, **adam)
        factor = _schedule(config)
        self._schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, factor)
                            for name, opt in self._optimizers.items()}

    # -- what is saved -----------------------------------------------------------------

    def modules(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"label_net": self.label_net, "text_net": self.text_net,
                                     "image_net": self.image_net}
        if self.recon is not None:
            out["recon"] = self.recon
            out["disc"] = self.disc
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.banks, "B": self.B, "train_labels": self.train_labels, "collapsed_epochs": self.collapsed_epochs}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        expected = set(self.state_tensors())
        if set(tensors) != expected:
            raise ValueError(f"HFAH state tensors are {sorted(expected)}, got {sorted(tensors)}")
        for name in self.banks:
            self.banks[name] = tensors[name]
        self.B, self.train_labels = tensors["B"], tensors["train_labels"]
        self.collapsed_epochs = tensors["collapsed_epochs"]

    def sample_buffers(self) -> dict[str, Tensor]:
        return dict(self.banks)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return self._schedulers

    # -- inference ---------------------------------------------------------------------

    def image_tower(self) -> nn.Module:
        return self.image_net

    def text_tower(self) -> nn.Module:
        return self.text_net

    @classmethod
    def image_preprocessing(cls, config: HFAHConfig) -> dict:
        return backbone_preprocessing(config)

    def pretrained_provenance(self) -> dict | None:
        return self.image_net.provenance

    # -- losses ------------------------------------------------------------------------

    def _pairwise(self, bank: Tensor, batch_out: Tensor, similarity: Tensor) -> Tensor:
        return pairwise_loss(bank, batch_out, similarity, self.config.pair_loss)

    def label_losses(self, labels: Tensor, index: Tensor | None) -> dict[str, Tensor]:
        """Eq. 3 on a batch of labels; refreshes the label banks' rows ``index`` first."""
        cfg = self.config
        f, h, predicted = self.label_net(labels)
        if index is not None:
            self.banks["F_label"][index] = f.detach().float()
            self.banks["H_label"][index] = h.detach().float()
        similarity = label_similarity(self.train_labels, labels)
        terms = {
            "label_feature_nll": self._pairwise(self.banks["F_label"], f, similarity),
            "label_code_nll": self._pairwise(self.banks["H_label"], h, similarity),
            "label_quantisation": mse(h, binarize(h.detach())),
            "label_prediction": mse(predicted, labels),
        }
        terms["label"] = (terms["label_feature_nll"] + terms["label_code_nll"]
                          + cfg.alpha_q * terms["label_quantisation"] + cfg.beta_cls * terms["label_prediction"])
        return terms

    def modality_losses(self, modality: str, f: Tensor, h: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Eqs. 4-10 (and the generator's adversarial term) for the text or image network."""
        cfg = self.config
        similarity = label_similarity(self.train_labels, batch.labels)
        codes = self.B[batch.index]
        p = modality
        terms = {
            f"{p}_feature_nll": self._pairwise(self.banks["F_label"], f, similarity),
            f"{p}_consistency": mse(h, binarize(h.detach())) + mse(codes, h),
        }
        total = terms[f"{p}_feature_nll"] + cfg.beta_c * terms[f"{p}_consistency"]
        if cfg.hash_guidance:
            terms[f"{p}_code_nll"] = self._pairwise(self.banks["H_label"], h, similarity)
            total = total + terms[f"{p}_code_nll"]
        if self.recon is not None:
            other = "image" if modality == "text" else "text"
            own, cross = ((self.recon.txt_to_txt, self.recon.txt_to_img) if modality == "text"
                          else (self.recon.img_to_img, self.recon.img_to_txt))
            code = straight_through_sign(h) if cfg.straight_through else h
            rec_own, rec_cross = own(code), cross(code)
            # own feature (stop-gradient: the code must keep the feature's information, not the
            # feature shrink towards the decoder) and the other modality's bank row for the same pairs
            terms[f"{p}_reconstruction"] = (mse(rec_own, f.detach())
                                            + mse(rec_cross, self.banks[f"F_{other}"][batch.index]))
            d_own, d_other = self.disc[modality], self.disc[other]
            # non-saturating flipped labels: the own-code reconstruction should look "cross", the
            # cross one "own", to the discriminator of each feature space (which are frozen here)
            adversarial = bce(d_other(rec_cross), 1.0)
            if cfg.adv_gen == "both":
                adversarial = adversarial + bce(d_own(rec_own), 0.0)
            terms[f"{p}_adversarial"] = adversarial
            total = total + cfg.gamma_r * terms[f"{p}_reconstruction"] + cfg.delta_adv * adversarial
        terms[p] = total
        return terms

    def discriminator_loss(self, h_text: Tensor, h_image: Tensor) -> Tensor:
        """Eqs. 11-12: D1 tells f_x^x (real) from f_x^y, D2 tells f_y^y (real) from f_y^x."""
        with torch.no_grad():
            st = self.config.straight_through
            h_text, h_image = (binarize(h_text), binarize(h_image)) if st else (h_text, h_image)
            f_xx, f_yx = self.recon.txt_to_txt(h_text), self.recon.txt_to_img(h_text)
            f_yy, f_xy = self.recon.img_to_img(h_image), self.recon.img_to_txt(h_image)
        d1, d2 = self.disc["text"], self.disc["image"]
        return bce(d1(f_xx), 1.0) + bce(d1(f_xy), 0.0) + bce(d2(f_yy), 1.0) + bce(d2(f_yx), 0.0)

    # -- training ----------------------------------------------------------------------

    def _check_exploding(self, name: str, loss: Tensor) -> None:
        value = float(loss.detach())
        if math.isfinite(value) and abs(value) > self.config.max_loss:
            raise AdversarialDivergenceError(
                "exploding-loss", name, value,
                f"HFAH diverged: the {name} loss is {value:.4g}, above model.max_loss={self.config.max_loss:g}; "
                "the adversarial game has exploded. Lower the learning rates (model.lr_*) or model.delta_adv, "
                "or restart from the 'last' checkpoint")

    def _step(self, ctx, name: str, terms: dict[str, Tensor]) -> None:
        self._check_exploding(name, terms[name])
        ctx.backward_step(terms[name], self._optimizers[name], name=name,
                          terms={k: v for k, v in terms.items() if k != name})

    def _pretrain_labels(self, ctx) -> None:
        """Label pre-training on the label matrix alone (no images need decoding), ``label_pretrain_epochs`` passes."""
        n = self.train_labels.shape[0]
        batch_size = 128
        for _ in range(self.config.label_pretrain_epochs):
            order = torch.randperm(n, device=self.train_labels.device)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                with ctx.autocast():
                    terms = self.label_losses(self.train_labels[index], index)
                self._step(ctx, "label", terms)

    def on_fit_start(self, ctx) -> None:
        self._pretrain_labels(ctx)
        # Fill every bank with real outputs (SSAH uses random ones): cross-reconstruction targets
        # and B are meaningful from the first step.
        for module in self.modules().values():
            module.eval()
        with torch.no_grad(), ctx.autocast():
            for batch in ctx.train_batches():
                self._write_banks(batch.index, label=self.label_net(batch.labels)[:2],
                                  text=self.text_net.encode(batch.text), image=self.image_net.encode(batch.image))
        for module in self.modules().values():
            module.train()
        ctx.sync_sample_buffers()  # B needs every row
        self.B = self.unified_codes()

    def _write_banks(self, index: Tensor, **outputs: tuple[Tensor, Tensor]) -> None:
        for modality, (f, h) in outputs.items():
            self.banks[f"F_{modality}"][index] = f.detach().float()
            self.banks[f"H_{modality}"][index] = h.detach().float()

    def unified_codes(self) -> Tensor:
        return binarize(self.banks["H_label"] + self.banks["H_text"] + self.banks["H_image"])

    def on_epoch_start(self, epoch: int, ctx) -> None:
        self._disc_sum, self._disc_steps = 0.0, 0

    def train_step(self, batch: Batch, ctx) -> dict[str, float]:
        logs: dict[str, float] = {}
        if not self.config.freeze_label_net:  # (a) label step
            with ctx.autocast():
                terms = self.label_losses(batch.labels, batch.index)
            self._step(ctx, "label", terms)
            logs["label"] = float(terms["label"].detach())
        for modality, net, data in (("text", self.text_net, batch.text), ("image", self.image_net, batch.image)):
            with ctx.autocast():  # (b) text step, (c) image step
                f, h = net.encode(data)
                terms = self.modality_losses(modality, f.float(), h.float(), batch)
            self._step(ctx, modality, terms)
            self._write_banks(batch.index, **{modality: (f, h)})
            logs.update({k: float(v.detach()) for k, v in terms.items()})
        if self.disc is not None:  # (d) discriminator step, on the codes just banked
            with ctx.autocast():
                loss = self.discriminator_loss(self.banks["H_text"][batch.index], self.banks["H_image"][batch.index])
            self._step(ctx, "disc", {"disc": loss})
            logs["disc"] = float(loss.detach())
            self._disc_sum += logs["disc"]
            self._disc_steps += 1
        return logs

    def on_epoch_end(self, epoch: int, ctx) -> dict[str, float]:
        new_B = self.unified_codes()
        changed = float((new_B != self.B).float().mean())
        self.B = new_B
        extra = {"B_changed": changed}
        if self.disc is not None and self._disc_steps:
            mean = torch.tensor(self._disc_sum / self._disc_steps, dtype=torch.float64, device=self.B.device)
            mean = float(ctx.all_reduce_(mean, "mean"))
            extra["disc_epoch_loss"] = mean
            gate = self.image_net.attention.gate if isinstance(self.image_net.attention, HybridAttention) else None
            if gate is not None:
                extra["attention_gate"] = float(gate.detach())
            self._check_collapse(mean, epoch)
        return extra

    def _check_collapse(self, disc_loss: float, epoch: int) -> None:
        if disc_loss >= self.config.min_disc_loss:
            self.collapsed_epochs = torch.zeros_like(self.collapsed_epochs)
            return
        self.collapsed_epochs = self.collapsed_epochs + 1
        if int(self.collapsed_epochs) >= self.config.collapse_epochs:
            raise AdversarialDivergenceError(
                "collapsed-discriminator", "disc", disc_loss,
                f"HFAH diverged: the discriminators' mean loss was below model.min_disc_loss="
                f"{self.config.min_disc_loss:g} for {int(self.collapsed_epochs)} epochs (epoch {epoch + 1}: "
                f"{disc_loss:.3g}): they tell the modalities apart perfectly and the generators get no useful "
                "gradient (a collapsed discriminator). Lower model.lr_disc, raise model.delta_adv, or train "
                "without the adversarial part (model.recon=false)")


def _schedule(config: HFAHConfig):
    """Learning-rate factor of epoch e (the trainer steps the schedulers once per epoch)."""
    if config.lr_schedule == "constant":
        return lambda e: 1.0
    if config.lr_schedule == "ssah":
        return lambda e: 10 ** (-0.5 * e)
    total = config.schedule_epochs
    return lambda e: 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(e, total) / total))
