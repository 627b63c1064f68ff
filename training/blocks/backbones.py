"""Image backbones: open_clip CLIP image towers and torchvision CNNs, built by name with
random initialisation or a local weights file. Nothing is ever downloaded.

Names:
- ``clip:<open_clip model>``, e.g. ``clip:ViT-B-32``, ``clip:RN50`` (any of
  ``open_clip.list_models()``): the CLIP image tower, output = the projected embedding.
- ``clip:tiny-resnet`` / ``clip:tiny-vit``: small configurations of the same classes
  (``ModifiedResNet``, ``VisionTransformer``) on 64-pixel images, for tests and the demo.
- ``torchvision:<model>``, e.g. ``torchvision:alexnet``, ``torchvision:resnet18``: the
  network without its last linear layer (AlexNet gives fc7, 4096-d).
- ``torchvision:tiny-resnet``: torchvision's ``ResNet`` with one basic block per stage.
- ``timm:<model>``, e.g. ``timm:swin_small_patch4_window7_224`` (TEGAH's Swin-S): the
  network without its classifier (pooled features, 768-d for Swin-S); images squashed to
  the model's input size (bilinear), ImageNet normalisation, as TEGAH's code feeds Swin.
- ``timm:tiny-swin``: timm's ``SwinTransformer`` on 64-pixel images, two stages of one
  block each, for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess_config

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
    """

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


def _clip_tower(model: str, pretrained: str | Path | None) -> tuple[nn.Module, int, dict]:
    from open_clip.model import _build_vision_tower  # the builder open_clip's own CLIP and CoCa use

    cfg = _clip_config(model)
    tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    if pretrained is not None:
        state = load_weights_file(pretrained)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the image tower
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        missing, unexpected = tower.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{pretrained} does not fit clip:{model}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return tower, cfg["embed_dim"], _clip_preprocess(cfg)


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


def _torchvision_trunk(model: str, pretrained: str | Path | None) -> tuple[nn.Module, int, dict]:
    import torchvision

    if model in TORCHVISION_TINY:
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [1, 1, 1, 1])
    elif model in torchvision.models.list_models(torchvision.models):
        net = torchvision.models.get_model(model, weights=None)
    else:
        raise ConfigError(f"unknown torchvision model {model!r}; available: {sorted(TORCHVISION_TINY)} and "
                          f"torchvision.models.list_models() (e.g. alexnet, resnet18)")
    if pretrained is not None:  # the checkpoint includes the classifier, so load before removing it
        net.load_state_dict(load_weights_file(pretrained))
    width = _drop_last_linear(net)
    return net, width, _TORCHVISION_PREPROCESS


def _split_name(name: str) -> tuple[str, str]:
    family, _, model = str(name).partition(":")
    if family not in ("clip", "torchvision", "timm") or not model:
        raise ConfigError(f"backbone name must be 'clip:<model>', 'torchvision:<model>' or 'timm:<model>', got {name!r}")
    return family, model


def backbone_preprocess(name: str) -> dict:
    """The preprocessing backbone ``name`` expects, without building it (the data layer
    needs it before the method exists)."""
    family, model = _split_name(name)
    if family == "timm":
        return _timm_preprocess(model)
    return _clip_preprocess(_clip_config(model)) if family == "clip" else dict(_TORCHVISION_PREPROCESS)


def _timm_preprocess(model: str) -> dict:
    # TEGAH's code squashes images to the input size (bilinear) and normalises with ImageNet's statistics
    if model in TIMM_TINY:
        size = TIMM_TINY[model]["img_size"]
    else:
        import timm

        if model not in timm.list_models():
            raise ConfigError(f"unknown timm model {model!r}; available: {sorted(TIMM_TINY)} and timm.list_models() "
                              f"(e.g. swin_small_patch4_window7_224)")
        size = timm.get_pretrained_cfg(model).input_size[-1]
    return preprocess_config(size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", resize_mode="squash")


def _timm_trunk(model: str, pretrained: str | Path | None) -> tuple[nn.Module, int, dict]:
    import timm

    if model in TIMM_TINY:
        from timm.models.swin_transformer import SwinTransformer

        net = SwinTransformer(**TIMM_TINY[model])
    elif model in timm.list_models():
        net = timm.create_model(model, pretrained=False)
    else:
        raise ConfigError(f"unknown timm model {model!r}; available: {sorted(TIMM_TINY)} and timm.list_models() "
                          f"(e.g. swin_small_patch4_window7_224)")
    if pretrained is not None:  # the checkpoint includes the classifier, so load before removing it
        net.load_state_dict(load_weights_file(pretrained))
    net.reset_classifier(0)  # pooled features out
    return net, net.num_features, _timm_preprocess(model)


def build_image_backbone(name: str, pretrained: str | Path | None = None, freeze: bool = False) -> ImageBackbone:
    """Build the image trunk ``name`` (see the module docstring), randomly initialised or
    from the local weights file ``pretrained``; ``freeze`` stops its gradients."""
    family, model = _split_name(name)
    builders = {"clip": _clip_tower, "torchvision": _torchvision_trunk, "timm": _timm_trunk}
    trunk, width, preprocess = builders[family](model, pretrained)
    spec = {"name": name, "pretrained": str(pretrained) if pretrained is not None else None, "freeze": bool(freeze)}
    return ImageBackbone(trunk, width, preprocess, spec, freeze=freeze)
