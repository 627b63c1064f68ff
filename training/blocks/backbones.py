"""Image backbones: open_clip CLIP image towers, timm models and torchvision CNNs, built by
name, randomly initialised or from pretrained weights: a library tag fetched through the
library's own cache, or a local file (see :mod:`.pretrained` and docs/pretrained.md).

Names:
- ``clip:<open_clip model>``, e.g. ``clip:ViT-B-32``, ``clip:RN50`` (any of
  ``open_clip.list_models()``): the CLIP image tower, output = the projected embedding.
- ``clip:tiny-resnet`` / ``clip:tiny-vit``: small configurations of the same classes
  (``ModifiedResNet``, ``VisionTransformer``) on 64-pixel images, for tests and the demo.
- ``torchvision:<model>``, e.g. ``torchvision:alexnet``, ``torchvision:resnet18``: the
  network without its last linear layer (AlexNet gives fc7, 4096-d).
- ``torchvision:tiny-resnet``: torchvision's ``ResNet`` with one basic block per stage.
- ``timm:<model>``, e.g. ``timm:swin_small_patch4_window7_224`` (TEGAH's Swin-S): the
  network without its classifier (pooled features, 768-d for Swin-S). From scratch, images
  are squashed to the model's input size (bilinear), ImageNet normalisation, as TEGAH's code
  feeds Swin; with a pretrained tag, the tag's ``pretrained_cfg`` preprocessing.
- ``timm:tiny-swin``: timm's ``swin_tiny_patch4_window7_224`` architecture on 64-pixel
  images, two stages of one block each, for tests.

Every family takes the preprocessing its pretrained weights were trained with when a tag
names them (open_clip's ``preprocess_cfg``, timm's ``pretrained_cfg``, torchvision's
``transforms()``); without a tag, the defaults above.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess_config
from .pretrained import (PretrainedWeights, architecture_only, load_open_clip_tower, resolve_open_clip, resolve_timm,
                         resolve_torchvision, torchvision_weights)

# Tiny CLIP vision configurations (open_clip's own config format: embed_dim + vision_cfg).
TINY_CLIP_CONFIGS = {
    # ModifiedResNet: stem width 16, one bottleneck per stage, 512 channels before the attention pool.
    "tiny-resnet": {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}},
    # VisionTransformer: 8x8 patches of a 64-pixel image, 2 blocks of width 64, 2 heads.
    "tiny-vit": {"embed_dim": 128, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                                  "patch_size": 8}},
}
TORCHVISION_TINY = {"tiny-resnet"}
# timm SwinTransformer: 4x4 patches of a 64-pixel image, windows of 4, widths 32 and 64.
TIMM_TINY_BASE = "swin_tiny_patch4_window7_224"  # the timm model the tiny variants are built as
TIMM_TINY = {"tiny-swin": {"img_size": 64, "patch_size": 4, "window_size": 4, "embed_dim": 32, "depths": (1, 1),
                           "num_heads": (2, 4)}}
TORCHVISION_IMAGE_SIZE = 224
_TORCHVISION_PREPROCESS = preprocess_config(TORCHVISION_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a plain tensor-only ``torch.save`` file
    (read with ``weights_only=True``; nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # TorchScript archives and pickled objects both land here
        raise ConfigError(f"{path} is not a plain state dict that can be read without unpickling "
                          f"(TorchScript archives such as OpenAI's ViT-B-32.pt are not); convert it once "
                          f"with open_clip and safetensors.torch.save_file(model.state_dict(), ...)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


class ImageBackbone(nn.Module):
    """A trunk that maps preprocessed images (N, 3, S, S) to features (N, output_dim).

    ``preprocess`` is the preprocessing the trunk expects (see ``data.transforms``);
    ``spec`` records how it was built, for the run's configuration.
    ``provenance`` names the weights loaded (library, model, tag, file, sha256), or is None.
    """

    provenance: dict | None = None

    def __init__(self, trunk: nn.Module, output_dim: int, preprocess: dict, spec: dict, freeze: bool = False):
        super().__init__()
        self.trunk = trunk
        self.output_dim = int(output_dim)
        self.preprocess = preprocess
        self.spec = spec
        self.frozen = bool(freeze)
        if freeze:
            self.trunk.requires_grad_(False)
            self.trunk.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen trunk keeps its batch-norm statistics and no dropout
            self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 2:  # precomputed features (data.feature_cache): a frozen trunk is a fixed function
            if not self.frozen or images.shape[1] != self.output_dim:
                raise ValueError(f"got (N, {images.shape[1]}) features for a {'frozen' if self.frozen else 'trainable'} "
                                 f"backbone of {self.output_dim} features; only a frozen backbone takes its own features")
            return images
        return self.trunk(images)


def _clip_config(model: str) -> dict:
    import open_clip

    if model in TINY_CLIP_CONFIGS:
        return TINY_CLIP_CONFIGS[model]
    if model in open_clip.list_models():
        return open_clip.get_model_config(model)
    raise ConfigError(f"unknown CLIP model {model!r}; available: {sorted(TINY_CLIP_CONFIGS)} and "
                      f"open_clip.list_models() (e.g. ViT-B-32, RN50)")


def _clip_preprocess(cfg: dict) -> dict:
    return preprocess_config(cfg["vision_cfg"].get("image_size", 224), CLIP_MEAN, CLIP_STD, "bicubic")


def _clip_weights(model: str, pretrained: str | None) -> tuple[dict, PretrainedWeights | None]:
    """The model config to build (the weights' own, e.g. with QuickGELU) and the weights."""
    cfg = _clip_config(model)
    if pretrained is None:
        return cfg, None
    weights = resolve_open_clip(model, str(pretrained), None if model in TINY_CLIP_CONFIGS else cfg)
    return weights.model_cfg or cfg, weights


def _clip_tower(model: str, pretrained: str | None) -> tuple[nn.Module, int, dict, PretrainedWeights | None]:
    from open_clip.model import _build_vision_tower  # the builder open_clip's own CLIP and CoCa use

    cfg, weights = _clip_weights(model, pretrained)
    tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    if weights is not None and weights.path is not None:
        load_open_clip_tower(tower, weights.path)
    return tower, cfg["embed_dim"], _clip_preprocess(cfg), weights


def _drop_last_linear(model: nn.Module) -> int:
    """Replace the network's last nn.Linear (the classifier) by Identity; its input width."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to remove")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    width = getattr(parent, attr).in_features
    setattr(parent, attr, nn.Identity())
    return width


def _torchvision_trunk(model: str, pretrained: str | None) -> tuple[nn.Module, int, dict, PretrainedWeights | None]:
    import torchvision

    weights = resolve_torchvision(model, str(pretrained)) if pretrained is not None else None
    if model in TORCHVISION_TINY:
        if weights is not None and weights.tag is not None:
            raise ConfigError(f"torchvision:{model} is cmhash's own small network: it takes a local weights file, not "
                              f"a torchvision weights tag ({pretrained!r})")
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [1, 1, 1, 1])
    elif model in torchvision.models.list_models(torchvision.models):
        # a weights entry fixes the classifier's width (its categories); the classifier is removed below anyway
        classes = {} if weights is None or weights.tag is None else {
            "num_classes": len(torchvision_weights(model, weights.tag)[0].meta["categories"])}
        net = torchvision.models.get_model(model, weights=None, **classes)
    else:
        raise ConfigError(f"unknown torchvision model {model!r}; available: {sorted(TORCHVISION_TINY)} and "
                          f"torchvision.models.list_models() (e.g. alexnet, resnet18)")
    if weights is not None and weights.path is not None:  # the file includes the classifier: load, then remove it
        # torchvision's own files are plain torch.save state dicts: read without unpickling
        net.load_state_dict(load_weights_file(weights.path))
    width = _drop_last_linear(net)
    return net, width, dict(_TORCHVISION_PREPROCESS), weights


def _split_name(name: str) -> tuple[str, str]:
    family, _, model = str(name).partition(":")
    if family not in ("clip", "torchvision", "timm") or not model:
        raise ConfigError(f"backbone name must be 'clip:<model>', 'torchvision:<model>' or 'timm:<model>', got {name!r}")
    return family, model


def resolve_backbone_weights(name: str, pretrained: str | Path | None) -> PretrainedWeights | None:
    """Find (in the library's cache) or download the weights ``pretrained`` names for backbone
    ``name``: a :class:`PretrainedWeightsError` now rather than after the data are read."""
    if pretrained is None:
        return None
    family, model = _split_name(name)
    if family == "clip":
        return _clip_weights(model, str(pretrained))[1]
    if family == "timm":
        timm_name, args = _timm_architecture(model)
        return resolve_timm(model, str(pretrained), timm_name, args.get("img_size"))
    return resolve_torchvision(model, str(pretrained))


def backbone_preprocess(name: str, pretrained: str | Path | None = None) -> dict:
    """The preprocessing backbone ``name`` expects, without building it (the data layer
    needs it before the method exists): the weights' own with a pretrained tag, otherwise
    the family's default. Looks the tag up without fetching the weights."""
    family, model = _split_name(name)
    with architecture_only():
        weights = resolve_backbone_weights(name, pretrained)
    if weights is not None and weights.preprocess is not None:
        return dict(weights.preprocess)
    if family == "timm":
        return _timm_preprocess(model)
    if family == "clip":
        return _clip_preprocess(_clip_weights(model, None)[0])
    return dict(_TORCHVISION_PREPROCESS)


def _timm_architecture(model: str) -> tuple[str, dict]:
    """timm's model name and the keyword arguments that build cmhash's ``model``."""
    if model in TIMM_TINY:
        return TIMM_TINY_BASE, dict(TIMM_TINY[model])
    import timm

    if model not in timm.list_models():
        raise ConfigError(f"unknown timm model {model!r}; available: {sorted(TIMM_TINY)} and timm.list_models() "
                          f"(e.g. swin_small_patch4_window7_224)")
    return model, {}


def _timm_preprocess(model: str) -> dict:
    # From scratch: TEGAH's code squashes images to the input size (bilinear) and normalises with
    # ImageNet's statistics. With a pretrained tag the weights' own pretrained_cfg applies instead.
    if model in TIMM_TINY:
        size = TIMM_TINY[model]["img_size"]
    else:
        import timm

        size = timm.get_pretrained_cfg(_timm_architecture(model)[0]).input_size[-1]
    return preprocess_config(size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", resize_mode="squash")


def _timm_trunk(model: str, pretrained: str | None) -> tuple[nn.Module, int, dict, PretrainedWeights | None]:
    import timm

    timm_name, args = _timm_architecture(model)
    weights = resolve_timm(model, str(pretrained), timm_name, args.get("img_size")) if pretrained is not None else None
    tagged = weights.tag if weights is not None and weights.tag else timm_name
    if weights is not None and weights.path is not None:
        # timm's own file loading (its checkpoint filter adapts the layout), as for a download
        net = timm.create_model(tagged, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)}, **args)
    else:
        net = timm.create_model(tagged, pretrained=False, **args)
    net.reset_classifier(0)  # pooled features out
    return net, net.num_features, _timm_preprocess(model), weights


def build_image_backbone(name: str, pretrained: str | Path | None = None, freeze: bool = False) -> ImageBackbone:
    """Build the image trunk ``name`` (see the module docstring), randomly initialised or from
    ``pretrained``: a library tag or a local weights file (:mod:`.pretrained`). The image
    preprocessing is the weights' own when a tag gives one; ``freeze`` stops the gradients."""
    family, model = _split_name(name)
    builders = {"clip": _clip_tower, "torchvision": _torchvision_trunk, "timm": _timm_trunk}
    trunk, width, preprocess, weights = builders[family](model, pretrained)
    if weights is not None and weights.preprocess is not None:
        preprocess = dict(weights.preprocess)
    spec = {"name": name, "pretrained": str(pretrained) if pretrained is not None else None, "freeze": bool(freeze)}
    backbone = ImageBackbone(trunk, width, preprocess, spec, freeze=freeze)
    backbone.provenance = weights.provenance() if weights is not None and weights.path is not None else None
    return backbone
