"""Pretrained backbone weights by library tag (open_clip, timm, torchvision), without network.

Every test runs with the hub offline and every cache (Hugging Face, torch hub, open_clip's
URL cache) in a temporary folder. Weight files written here in each library's own format
(random weights, small architectures) are put where the library's own cache keeps a
download, then loaded twice: through cmhash's backbone and through the library's own model
loading; both must give the same outputs. Empty caches must give the typed error before
any data is read.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cmhash.preprocess import ImagePreprocessor
from cmhash.training.blocks.backbones import (TIMM_TINY, TIMM_TINY_BASE, backbone_preprocess, build_image_backbone,
                                              resolve_backbone_weights)
from cmhash.training.blocks.pretrained import architecture_only
from cmhash.training.errors import ConfigError, MissingWeightsFileError, PretrainedWeightsError
from cmhash.training.method import get_method
from cmhash.training.run import load_config, train

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# a small open_clip model in open_clip's own config format, registered under this name
TINY_CLIP = "cmhash-test-tiny-vit"
TINY_CLIP_CFG = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
HUB_PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Offline hub, and every library cache in tmp_path (empty)."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(hub),
                        "TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                        "HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub reads these once at import; open_clip and timm call it without a cache_dir
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return {"hub": hub, "torch": tmp_path / "torch" / "hub" / "checkpoints"}


def hub_file(hub: Path, repo: str, filename: str) -> Path:
    """Where the Hugging Face cache keeps ``repo``'s ``filename`` at its main revision."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random open_clip CLIP of the tiny config, registered with open_clip, and its state dict."""
    folder = tmp_path_factory.mktemp("clip_cfg")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_outputs(ours, theirs, size: int) -> None:
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- each library's own file format


def test_open_clip_hub_checkpoint_loads_as_open_clip_loads_it(caches, tiny_clip):
    repo = "cmhash-test/tiny-clip"
    torch.save(tiny_clip, hub_file(caches["hub"], repo, "open_clip_pytorch_model.bin"))  # as open_clip's hub files
    hub_file(caches["hub"], repo, "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": HUB_PREPROCESS}))
    ours = build_image_backbone(f"clip:{TINY_CLIP}", f"hf-hub:{repo}")
    theirs = open_clip.create_model(f"hf-hub:{repo}")  # open_clip's own loading, offline, from the same cache
    same_outputs(ours.trunk, theirs.visual, 32)
    weights = hub_file(caches["hub"], repo, "open_clip_pytorch_model.bin")
    assert ours.provenance == {"library": "open_clip", "model": TINY_CLIP, "tag": f"hf-hub:{repo}",
                               "file": "open_clip_pytorch_model.bin", "sha256": sha256(weights)}
    # the preprocessing is the hub config's, which is what open_clip's own transform uses
    assert ours.preprocess == ImagePreprocessor(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                                                interpolation="bilinear", resize_mode="squash").to_dict()
    theirs_cfg = theirs.visual.preprocess_cfg
    assert {k: ours.preprocess[k] for k in HUB_PREPROCESS} == {k: list(theirs_cfg[k]) if k in ("mean", "std")
                                                               else theirs_cfg[k] for k in HUB_PREPROCESS}
    assert backbone_preprocess(f"clip:{TINY_CLIP}", f"hf-hub:{repo}") == ours.preprocess


def test_open_clip_local_file_loads_as_open_clip_loads_it(tmp_path, caches, tiny_clip):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.items()}, str(path))
    ours = build_image_backbone(f"clip:{TINY_CLIP}", str(path))
    theirs = open_clip.create_model(TINY_CLIP, pretrained=str(path))
    same_outputs(ours.trunk, theirs.visual, 32)
    assert ours.provenance["tag"] is None and ours.provenance["file"] == "tiny.safetensors"
    assert ours.provenance["sha256"] == sha256(path)


def test_timm_hub_checkpoint_loads_as_timm_loads_it(caches):
    tag = f"{TIMM_TINY_BASE}.ms_in1k"
    torch.manual_seed(0)
    source = timm.create_model(TIMM_TINY_BASE, **TIMM_TINY["tiny-swin"])
    path = hub_file(caches["hub"], timm.get_pretrained_cfg(tag).hf_hub_id, "model.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))  # as timm's hub files
    ours = build_image_backbone("timm:tiny-swin", "ms_in1k")
    theirs = timm.create_model(tag, pretrained=True, **TIMM_TINY["tiny-swin"])  # timm's own hub loading
    theirs.reset_classifier(0)
    same_outputs(ours.trunk, theirs, 64)
    assert ours.provenance == {"library": "timm", "model": TIMM_TINY_BASE, "tag": tag, "file": "model.safetensors",
                               "sha256": sha256(path)}
    cfg = timm.get_pretrained_cfg(tag)  # the tag's preprocessing, at the tiny variant's 64 pixels
    assert (ours.preprocess["mean"], ours.preprocess["interpolation"]) == (list(cfg.mean), cfg.interpolation)
    assert ours.preprocess["image_size"] == 64 and ours.preprocess["resize_size"] == math.floor(64 / cfg.crop_pct)


def test_torchvision_cached_weights_load_as_torchvision_loads_them(caches):
    entry = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    caches["torch"].mkdir(parents=True)
    path = caches["torch"] / Path(entry.url).name  # where torch.hub keeps the download
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)  # as torchvision's files
    ours = build_image_backbone("torchvision:mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1")
    theirs = torchvision.models.get_model("mobilenet_v3_small", weights="IMAGENET1K_V1")  # from the same cache
    theirs.classifier[-1] = torch.nn.Identity()
    same_outputs(ours.trunk, theirs, 64)
    assert ours.provenance == {"library": "torchvision", "model": "mobilenet_v3_small",
                               "tag": "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "file": path.name,
                               "sha256": sha256(path)}
    # the short tag names the same entry
    assert build_image_backbone("torchvision:mobilenet_v3_small", "IMAGENET1K_V1").provenance == ours.provenance


def test_architecture_only_fetches_nothing_and_keeps_the_weights_architecture(caches):
    with architecture_only():
        weights = resolve_backbone_weights("clip:ViT-B-32", "openai")  # not cached: still fine
    assert weights.path is None and weights.model_cfg["quick_gelu"] is True  # OpenAI's weights need QuickGELU


# --------------------------------------------------------------------------- offline and unknown tags


@pytest.mark.parametrize("name, overrides, tag, folder", [
    ("egath/mirflickr25k-16", [], "openai", "hub"),
    ("tegah/mirflickr25k-16", [], "swin_small_patch4_window7_224.ms_in22k_ft_in1k", "hub"),
    ("hfah/mirflickr25k-16", [], "AlexNet_Weights.IMAGENET1K_V1", "torch"),
])
def test_offline_empty_cache_is_a_typed_error_before_any_data(tmp_path, caches, name, overrides, tag, folder):
    absent = tmp_path / "no-such-data"
    config = load_config(name, [f"data.arrays={absent}/labels_tags.npz", f"data.image_root={absent}",
                                f"train.out_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(PretrainedWeightsError) as caught:
        train(config)
    error = caught.value
    assert error.tag == tag and error.cache_dir == str(caches[folder])
    assert tag.rsplit(".", 1)[-1] in " ".join(error.valid_tags)
    message = str(error)
    assert tag in message and str(caches[folder]) in message and "model.pretrained=/path" in message
    assert "HF_HUB_OFFLINE" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backbone, tag, listed", [
    ("clip:ViT-B-32", "no-such-tag", "laion2b_s34b_b79k"),
    ("timm:swin_small_patch4_window7_224", "in99k", "swin_small_patch4_window7_224.ms_in22k"),
    ("timm:swin_small_patch4_window7_224", "resnet50.a1_in1k", "swin_small_patch4_window7_224.ms_in1k"),
    ("torchvision:alexnet", "IMAGENET9K_V9", "AlexNet_Weights.IMAGENET1K_V1"),
    ("torchvision:alexnet", "ResNet18_Weights.IMAGENET1K_V1", "AlexNet_Weights.IMAGENET1K_V1"),
])
def test_unknown_tags_list_the_valid_ones(caches, backbone, tag, listed):
    with pytest.raises(PretrainedWeightsError, match="no such") as caught:
        resolve_backbone_weights(backbone, tag)
    assert listed in caught.value.valid_tags and tag in str(caught.value)


def test_weights_sources_are_checked(tmp_path, caches):
    with pytest.raises(MissingWeightsFileError):
        build_image_backbone("clip:tiny-vit", str(tmp_path / "absent.safetensors"))
    with pytest.raises(ConfigError, match="keep one"):
        load_config("egath/demo", ["model.pretrained=openai", "model.backbone_weights=x.safetensors"])
    with pytest.raises(ConfigError, match="backbone_weights"):
        load_config("hfah/demo", ["model.pretrained=AlexNet_Weights.IMAGENET1K_V1"])  # tiny-cnn is HFAH's own


# --------------------------------------------------------------------------- the papers' configs


PAPER_DATASETS = ("mirflickr25k", "nuswide10", "mscoco")


def test_paper_configs_name_the_papers_weights_and_their_preprocessing():
    from torchvision.models import get_weight

    import cmhash.training.run as run

    for name in sorted(run.list_configs()):
        config = load_config(name)
        method = get_method(config.method)
        if not name.split("/")[1].startswith(PAPER_DATASETS):
            assert config.model.pretrained is None, name  # demo and mirflickr-mini: from scratch, anywhere
            continue
        with architecture_only():  # looked up in the libraries' registries, nothing fetched
            weights = method.fetch_pretrained(config.model)
        preprocess = method.image_preprocessing(config.model)
        if config.method == "egath":
            assert (config.model.backbone, config.model.pretrained) == ("clip:ViT-B-32", "openai")
            cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
            assert weights.model_cfg["quick_gelu"] is True and cfg["hf_hub"].startswith("timm/")
            assert (preprocess["mean"], preprocess["interpolation"]) == (list(cfg["mean"]), cfg["interpolation"])
        elif config.method == "tegah":
            assert weights.tag == "swin_small_patch4_window7_224.ms_in22k_ft_in1k"
            assert weights.tag in timm.list_pretrained("swin_small_patch4_window7_224*")
        else:
            entry = get_weight(config.model.pretrained)
            assert entry is torchvision.models.AlexNet_Weights.IMAGENET1K_V1 and weights.tag == config.model.pretrained
            transform = entry.transforms()
            assert (preprocess["image_size"], preprocess["resize_size"]) == (transform.crop_size[0], transform.resize_size[0])
            assert preprocess["mean"] == list(transform.mean) and preprocess["interpolation"] == "bilinear"


# --------------------------------------------------------------------------- preprocessing = the library's own


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # smooth-ish, not square
    return Image.fromarray(base).resize((301, 217), Image.Resampling.BICUBIC)


def test_timm_tag_preprocessing_equals_timms_eval_transform():
    from timm.data import create_transform, resolve_data_config

    tag = "swin_small_patch4_window7_224.ms_in22k_ft_in1k"
    ours = ImagePreprocessor.from_dict(backbone_preprocess("timm:swin_small_patch4_window7_224", "ms_in22k_ft_in1k"))
    transform = create_transform(**resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg(tag).to_dict()))
    for seed in range(3):
        image = _photo(seed)
        np.testing.assert_allclose(ours.transform(image), transform(image).numpy(), atol=1e-5)


def test_torchvision_tag_preprocessing_equals_torchvisions_pil_transform():
    from torchvision import transforms as T

    entry = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    ours = ImagePreprocessor.from_dict(backbone_preprocess("torchvision:alexnet", "AlexNet_Weights.IMAGENET1K_V1"))
    spec = entry.transforms()
    reference = T.Compose([T.Resize(spec.resize_size, interpolation=spec.interpolation), T.CenterCrop(spec.crop_size),
                           T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    for seed in range(3):
        image = _photo(seed)
        np.testing.assert_allclose(ours.transform(image), reference(image).numpy(), atol=1e-5)
        # torchvision's own transforms() resizes the tensor (antialiased), a hair away from Pillow
        assert np.abs(ours.transform(image) - spec(image).numpy()).mean() < 0.02


# --------------------------------------------------------------------------- provenance: checkpoint, bundle, eval


def test_provenance_goes_from_checkpoint_to_bundle_and_eval(tmp_path_factory, caches, tiny_clip, capsys):
    pytest.importorskip("onnxruntime")
    from cmhash.bundle import describe_pretrained, load_bundle
    from cmhash.cli import main as cli
    from cmhash.encoder import Encoder
    from cmhash.training.checkpoint import read_checkpoint
    from fixtures.roundtrip import train_and_export

    repo = "cmhash-test/tiny-clip"
    weights = hub_file(caches["hub"], repo, "open_clip_pytorch_model.bin")
    torch.save(tiny_clip, weights)
    hub_file(caches["hub"], repo, "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": HUB_PREPROCESS}))
    _, out, bundle, report = train_and_export(tmp_path_factory, "egath", [
        f"model.backbone=clip:{TINY_CLIP}", f"model.pretrained=hf-hub:{repo}", "data.n=120",
        "data.split={query: 20, train: 60, seed: 0}", "model.d_model=32", "model.heads=2", "model.ffn_dim=64",
        "model.hidden=64", "model.gat_hidden=32", "model.label_embedding_dim=16"])
    expected = {"library": "open_clip", "model": TINY_CLIP, "tag": f"hf-hub:{repo}",
                "file": "open_clip_pytorch_model.bin", "sha256": sha256(weights)}
    assert read_checkpoint(out / "last").meta["pretrained"] == expected
    manifest = load_bundle(bundle).manifest
    assert manifest["provenance"]["pretrained"] == expected
    hub_preprocess = backbone_preprocess(f"clip:{TINY_CLIP}", f"hf-hub:{repo}")
    assert manifest["modalities"]["image"]["preprocess"] == hub_preprocess  # what the weights were trained with
    assert Encoder.load(bundle, threads=1).preprocessor == ImagePreprocessor.from_dict(hub_preprocess)
    assert cli(["eval", str(out)]) == 0
    assert f"backbone started from {describe_pretrained(expected)}" in capsys.readouterr().out
    weights.unlink()  # a trained checkpoint holds every weight: rebuilding it fetches nothing
    from cmhash.training.run import load_trained

    assert load_trained(out)[1].pretrained_provenance() is None
    assert expected["sha256"][:16] in describe_pretrained(expected)


def test_bundle_validates_the_pretrained_record():
    from cmhash.bundle import _validate_pretrained, describe_pretrained
    from cmhash.errors import BundleError

    def fail(message):
        raise BundleError(message)

    _validate_pretrained(None, fail)
    _validate_pretrained({"library": "timm", "model": "m", "tag": None, "file": "f", "sha256": "a" * 64}, fail)
    for bad in ([], {"library": 3}, {"sha256": "xyz"}, {"tag": ["openai"]}):
        with pytest.raises(BundleError, match="provenance.pretrained"):
            _validate_pretrained(bad, fail)
    assert describe_pretrained(None).startswith("random initialisation")


def test_resize_size_is_recorded_only_when_used():
    plain = ImagePreprocessor(image_size=224)
    assert "resize_size" not in plain.to_dict()  # records written before resize_size read the same
    cropped = ImagePreprocessor(image_size=224, resize_size=256, interpolation="bilinear")
    assert ImagePreprocessor.from_dict(cropped.to_dict()) == cropped and cropped.to_dict()["resize_size"] == 256
    assert cropped.transform(_photo(0)).shape == (3, 224, 224)
    from cmhash.errors import InvalidArgumentError

    for bad in ({"resize_size": 200}, {"resize_size": 256, "resize_mode": "squash"}, {"resize_size": 2.5}):
        with pytest.raises(InvalidArgumentError, match="resize_size"):
            ImagePreprocessor(image_size=224, **bad)
