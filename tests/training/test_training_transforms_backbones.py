import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cmhash.training.blocks import build_image_backbone, load_weights_file
from cmhash.training.data import CLIP_MEAN, CLIP_STD, build_transform, preprocess_config
from cmhash.training.errors import ConfigError


def _reference_preprocess(image: Image.Image, p: dict) -> np.ndarray:
    """What the runtime must do from the recorded dict alone: PIL + numpy, no torch."""
    w, h = image.size
    size = p["image_size"]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[p["interpolation"]]
    image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return ((pixels - np.array(p["mean"])) / np.array(p["std"])).transpose(2, 0, 1)


def test_eval_transform_reproducible_from_the_recorded_dict():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8))
    p = preprocess_config(32)
    assert p == {"image_size": 32, "resize_mode": "shortest", "interpolation": "bicubic",
                 "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "fill_color": 0}
    out = build_transform(p)(image)
    np.testing.assert_allclose(out.numpy(), _reference_preprocess(image, p), atol=1e-5)


def test_augmentation_only_for_training():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    p = preprocess_config(64)
    evaluation = build_transform(p)(image)
    torch.testing.assert_close(build_transform(p, train=True, augment=False)(image), evaluation)
    torch.manual_seed(0)
    augmented = build_transform(p, train=True, augment=True)
    assert any(not torch.equal(augmented(image), evaluation) for _ in range(3))
    torch.testing.assert_close(build_transform(p, train=False, augment=True)(image), evaluation)


@pytest.mark.parametrize("name,width", [("clip:tiny-resnet", 128), ("clip:tiny-vit", 128)])
def test_tiny_clip_towers(name, width):
    backbone = build_image_backbone(name)
    trunk_class = {"clip:tiny-resnet": "ModifiedResNet", "clip:tiny-vit": "VisionTransformer"}[name]
    assert type(backbone.trunk).__name__ == trunk_class  # the real open_clip classes
    size = backbone.preprocess["image_size"]
    features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, width) == (2, backbone.output_dim)


def test_torchvision_trunk_drops_classifier():
    backbone = build_image_backbone("torchvision:tiny-resnet")
    assert backbone.output_dim == 512 and backbone.preprocess["interpolation"] == "bilinear"
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_local_weights_round_trip_and_freeze(tmp_path):
    source = build_image_backbone("clip:tiny-vit")
    path = tmp_path / "clip.safetensors"
    # a whole-CLIP checkpoint: the image tower's tensors under "visual."
    save_file({f"visual.{k}": v.contiguous() for k, v in source.trunk.state_dict().items()}
              | {"text.dummy": torch.zeros(1)}, str(path))
    loaded = build_image_backbone("clip:tiny-vit", pretrained=path, freeze=True)
    x = torch.randn(2, 3, 64, 64)
    source.eval()
    torch.testing.assert_close(loaded(x), source(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.trunk.training and loaded.spec["freeze"]
    pt = tmp_path / "tower.pt"
    torch.save(source.trunk.state_dict(), pt)
    assert set(load_weights_file(pt)) == set(source.trunk.state_dict())


class _Pickled:
    pass


def test_pickled_objects_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Pickled()}, path)
    with pytest.raises(ConfigError, match="without unpickling"):
        load_weights_file(path)


def test_bad_backbone_names_and_weights(tmp_path):
    with pytest.raises(ConfigError, match="available"):
        build_image_backbone("clip:ViT-Z-99")
    with pytest.raises(ConfigError, match="clip:<model>"):
        build_image_backbone("resnet18")
    bad = tmp_path / "w.safetensors"
    save_file({"nonsense": torch.zeros(2)}, str(bad))
    with pytest.raises(ConfigError, match="does not fit"):
        build_image_backbone("clip:tiny-vit", pretrained=bad)
    with pytest.raises(FileNotFoundError):
        build_image_backbone("clip:tiny-vit", pretrained=tmp_path / "absent.safetensors")
