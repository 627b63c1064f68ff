"""HFAH (cmhash.training.methods.hfah): loss terms against hand-computed values, the stable
NLL, the adversarial steps, the attention gate, ablation switches, divergence detection,
towers, and learning on the generated shapes and on mirflickr-mini."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import cmhash  # noqa: E402
from cmhash.metrics import mean_average_precision  # noqa: E402
from cmhash.training.distributed import DistEnv  # noqa: E402
from cmhash.training.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cmhash.training.errors import ConfigError  # noqa: E402
from cmhash.training.method import Batch, DatasetInfo  # noqa: E402
from cmhash.training.methods.hfah import (ABLATIONS, HFAH, AdversarialDivergenceError, HFAHConfig,  # noqa: E402
                                          HybridAttention, ImageTower, MultiScaleFusion, TextNet,
                                          pairwise_loss)
from cmhash.training.run import evaluate, list_configs, load_config, load_trained, prepare_data, train  # noqa: E402
from cmhash.training.trainer import StepContext, Trainer, build_method  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import toy_method  # noqa: E402
from conftest import SHARED_DATA, require  # noqa: E402

# Small sizes of the real model classes (spec §5 'tiny'); every learning rate 1e-3 (spec §8).
TINY = ["model.backbone=tiny-cnn", "model.bits=16", "model.hidden=64", "model.feature_dim=32", "model.tiny_width=32",
        "model.text_windows=[1,2,4]", "model.image_size=16", "model.label_pretrain_epochs=2", "model.lr_label=1e-3",
        "model.lr_text=1e-3",
        "model.lr_image=1e-3", "model.lr_image_backbone=1e-3", "model.lr_disc=1e-3"]


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def nll_by_hand(left, right, similarity) -> float:
    """mean_ij softplus(theta_ij) - s_ij theta_ij, theta = 1/2 <left_i, right_j>, in float64 loops."""
    left, right, similarity = left.double().tolist(), right.double().tolist(), similarity.double().tolist()
    total = 0.0
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            theta = 0.5 * sum(x * y for x, y in zip(a, b))
            total += softplus(theta) - similarity[i][j] * theta
    return total / (len(left) * len(right))


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def toy_run_config(tmp_path, *overrides):
    return load_config(None, ["method=hfah", f"train.out_dir={tmp_path}", "train.device=cpu", "train.progress=false",
                              "train.batch_size=16", "train.epochs=1", "train.eval_every=0", *TINY, *overrides])


class ToyImages(Dataset):
    """toy_method's synthetic items with 16-pixel images (tiny-cnn needs a multiple of 8)."""

    def __init__(self, n: int, seed: int) -> None:
        self.base = toy_method.ToyDataset(n, seed)
        self.images = nn.functional.interpolate(self.base.images, size=16, mode="nearest")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.images[i], self.base.bows[i], self.base.labels[i], i

    def info(self) -> DatasetInfo:
        info = self.base.info()
        info.image_size = 16
        return info


def toy_method_and_ctx(tmp_path, *overrides, n: int = 48):
    config = toy_run_config(tmp_path, *overrides)
    data = ToyImages(n, seed=0)
    method = build_method(config, data.info())
    ctx = StepContext(torch.device("cpu"), DistEnv(), None)
    return method, ctx, data


def full_batch(data: ToyImages, index) -> Batch:
    index = torch.as_tensor(index)
    return Batch(image=data.images[index], text=data.base.bows[index].float(), labels=data.base.labels[index],
                 index=index)


def fill(method: HFAH, data: ToyImages) -> None:
    """What on_fit_start does after pre-training: every bank from the nets, then B."""
    with torch.no_grad():
        batch = full_batch(data, torch.arange(len(data)))
        method._write_banks(batch.index, label=method.label_net(batch.labels)[:2],
                            text=method.text_net.encode(batch.text), image=method.image_net.encode(batch.image))
    method.B = method.unified_codes()


def constant_output(module: nn.Sequential, value: torch.Tensor) -> None:
    """Make an MLP output ``value`` whatever its input: last layer weight 0, bias = value."""
    last = [m for m in module if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(value)


# --------------------------------------------------------------------------- loss terms


def test_ssah_squared_pair_loss_matches_hand_computed_value():
    left, right, s = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    expected = (0.5 * (1 - softplus(1)) ** 2 + 0.5 * softplus(0) ** 2) / 2  # theta = [[1], [0]]
    assert float(pairwise_loss(left, right, s, "ssah_sq")) == pytest.approx(expected, rel=1e-6)


def test_pairwise_nll_matches_hand_computed_values():
    left = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    right = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # theta = 1/2 left right^T = [[1, .5], [0, 1], [1, 0]]
    expected = ((softplus(1) - 1) + softplus(0.5) + softplus(0) + (softplus(1) - 1) + (softplus(1) - 1)
                + softplus(0)) / 6
    assert float(pairwise_loss(left, right, s)) == pytest.approx(expected, abs=1e-6)
    assert nll_by_hand(left, right, s) == pytest.approx(expected, abs=1e-12)


def test_nll_is_finite_and_exact_for_huge_inner_products():
    # 512-d features of magnitude 30: inner products near +-230,000, far past exp's float32 range
    g = torch.Generator().manual_seed(0)
    left = 30 * torch.randn(6, 512, generator=g)
    right = torch.cat([left[:2], -left[2:4]]).clone().requires_grad_(True)  # theta = +-|left|^2 / 2 at (i, i)
    s = (torch.rand(6, 4, generator=g) < 0.5).float()
    loss = pairwise_loss(left, right, s)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(nll_by_hand(left, right.detach(), s), rel=1e-5)
    theta = 0.5 * left @ right.detach().T
    assert theta.abs().max() > 1e5
    naive = (torch.log(1 + torch.exp(theta)) - s * theta).mean()
    assert not torch.isfinite(naive)  # the overflow the stable form avoids
    loss.backward()
    assert torch.isfinite(right.grad).all()


def test_label_loss_terms_match_hand_computed_values(tmp_path):
    method, _, data = toy_method_and_ctx(tmp_path, "model.alpha_q=0.5", "model.beta_cls=2.0")
    fill(method, data)
    index = torch.tensor([3, 7, 11])
    labels = data.base.labels[index]
    with torch.no_grad():
        f, h, p = method.label_net(labels)
        terms = method.label_losses(labels, index)
    bank_f, bank_h = method.banks["F_label"], method.banks["H_label"]
    assert torch.equal(bank_f[index], f) and torch.equal(bank_h[index], h)  # rows refreshed before the loss
    s = ((data.base.labels @ labels.T) > 0).float()
    expected = {
        "label_feature_nll": nll_by_hand(bank_f, f, s),
        "label_code_nll": nll_by_hand(bank_h, h, s),
        "label_quantisation": float(((h - sign(h)) ** 2).sum() / h.numel()),
        "label_prediction": float(((p - labels) ** 2).sum() / p.numel()),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    total = (expected["label_feature_nll"] + expected["label_code_nll"] + 0.5 * expected["label_quantisation"]
             + 2.0 * expected["label_prediction"])
    assert float(terms["label"]) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_modality_loss_terms_match_hand_computed_values(tmp_path, modality):
    method, _, data = toy_method_and_ctx(tmp_path, "model.beta_c=0.5", "model.gamma_r=3.0", "model.delta_adv=0.25")
    fill(method, data)
    d = method.config.feature_dim
    own_value, cross_value = torch.linspace(-1, 1, d), torch.linspace(2, 0, d)
    own, cross = ((method.recon.txt_to_txt, method.recon.txt_to_img) if modality == "text"
                  else (method.recon.img_to_img, method.recon.img_to_txt))
    constant_output(own, own_value)
    constant_output(cross, cross_value)
    d_own, d_other = method.disc[modality], method.disc["image" if modality == "text" else "text"]
    constant_output(d_own, torch.tensor([0.7]))
    constant_output(d_other, torch.tensor([-1.3]))
    batch = full_batch(data, [0, 5, 9, 20])
    with torch.no_grad():
        net = method.text_net if modality == "text" else method.image_net
        f, h = net.encode(batch.text if modality == "text" else batch.image)
        terms = method.modality_losses(modality, f, h, batch)
    other = "image" if modality == "text" else "text"
    s = ((data.base.labels @ batch.labels.T) > 0).float()
    B = method.B[batch.index]
    expected = {
        f"{modality}_feature_nll": nll_by_hand(method.banks["F_label"], f, s),
        f"{modality}_consistency": float(((h - sign(h)) ** 2).mean() + ((B - h) ** 2).mean()),
        f"{modality}_reconstruction": float(((own_value - f) ** 2).mean()
                                            + ((cross_value - method.banks[f"F_{other}"][batch.index]) ** 2).mean()),
        # flipped labels: the cross reconstruction should pass the other space's D as real (1),
        # the own one fool its own D into fake (0)
        f"{modality}_adversarial": softplus(1.3) + softplus(0.7),
    }
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    total = (expected[f"{modality}_feature_nll"] + 0.5 * expected[f"{modality}_consistency"]
             + 3.0 * expected[f"{modality}_reconstruction"] + 0.25 * expected[f"{modality}_adversarial"])
    assert float(terms[modality]) == pytest.approx(total, rel=1e-5)


def test_discriminator_loss_matches_hand_computed_value(tmp_path):
    method, _, data = toy_method_and_ctx(tmp_path)
    fill(method, data)
    constant_output(method.disc["text"], torch.tensor([0.4]))
    constant_output(method.disc["image"], torch.tensor([-2.0]))
    loss = method.discriminator_loss(method.banks["H_text"][:5], method.banks["H_image"][:5])
    # D1: BCE(0.4, real) + BCE(0.4, fake); D2: BCE(-2, real) + BCE(-2, fake)
    expected = softplus(-0.4) + softplus(0.4) + softplus(2.0) + softplus(-2.0)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- adversarial steps


def adversarial_loss(method: HFAH, batch: Batch) -> float:
    """Eqs. 11-12 (what D minimises and the generators maximise) on the nets' current codes."""
    with torch.no_grad():
        h_text = method.text_net(batch.text)
        h_image = method.image_net(batch.image)
        return float(method.discriminator_loss(h_text, h_image))


def test_discriminator_and_generator_steps_move_their_objectives(tmp_path):
    torch.manual_seed(0)
    method, ctx, data = toy_method_and_ctx(tmp_path, "model.lr_disc=1e-2", "model.lr_text=1e-2",
                                           "model.lr_image=1e-2", "model.lr_image_backbone=1e-2")
    fill(method, data)
    batch = full_batch(data, torch.arange(16))

    # discriminator steps alone: L_adv falls
    before = adversarial_loss(method, batch)
    for _ in range(20):
        with torch.no_grad():
            method._write_banks(batch.index, text=method.text_net.encode(batch.text),
                                image=method.image_net.encode(batch.image))
        method._step(ctx, "disc", {"disc": method.discriminator_loss(method.banks["H_text"][batch.index],
                                                                      method.banks["H_image"][batch.index])})
    trained_d = adversarial_loss(method, batch)
    assert trained_d < before - 0.1

    # generator steps on the adversarial term alone (D frozen): L_adv rises again
    disc_state = {k: v.clone() for k, v in method.disc.state_dict().items()}
    for _ in range(20):
        for modality, net, x in (("text", method.text_net, batch.text), ("image", method.image_net, batch.image)):
            f, h = net.encode(x)
            adv = method.modality_losses(modality, f, h, batch)[f"{modality}_adversarial"]
            method._step(ctx, modality, {modality: adv})
    assert all(torch.equal(v, method.disc.state_dict()[k]) for k, v in disc_state.items())  # D untouched
    assert adversarial_loss(method, batch) > trained_d + 0.1


# --------------------------------------------------------------------------- networks


def test_attention_gate_starts_as_identity():
    torch.manual_seed(0)
    attention = HybridAttention(64, reduction=8)
    x = torch.randn(2, 64, 8, 8)
    assert float(attention.gate.detach()) == 0.0
    assert torch.equal(attention(x), x)
    with torch.no_grad():
        attention.gate.fill_(0.5)
    assert not torch.allclose(attention(x), x)  # the gate really opens the branch

    # the whole image network at initialisation equals the same network without attention
    torch.manual_seed(1)
    with_attention = ImageTower(HFAHConfig(backbone="tiny-cnn", bits=16, feature_dim=32, tiny_width=32, image_size=16))
    torch.manual_seed(1)
    plain = ImageTower(HFAHConfig(backbone="tiny-cnn", bits=16, feature_dim=32, tiny_width=32, image_size=16,
                                attention=False))
    plain.load_state_dict({k: v for k, v in with_attention.state_dict().items() if not k.startswith("attention.")})
    images = torch.randn(3, 3, 16, 16)
    assert torch.equal(with_attention(images), plain(images))


def test_cbam_mode_has_no_gate_and_attends():
    attention = HybridAttention(16, reduction=4, mode="cbam")
    assert attention.gate is None
    x = torch.rand(2, 16, 6, 6) + 0.1
    y = attention(x)
    assert y.shape == x.shape and (y.abs() <= x.abs() + 1e-6).all() and not torch.allclose(y, x)


def test_multiscale_fusion_shapes_and_initial_branches():
    fusion = MultiScaleFusion(12, [1, 2, 4])
    bow = torch.zeros(2, 12)
    bow[0, :4] = 1.0
    out = fusion(bow)
    assert out.shape == (2, 4 * 12) and fusion.output_dim == 48
    assert torch.equal(out[:, :12], bow)  # the raw input first
    assert torch.allclose(out[:, 12:24], bow)  # window 1 with weight 1, bias 0: identity
    assert out[0, 24:].sum() > 0  # no branch starts dead
    with pytest.raises(ConfigError, match="wider than the 12-word"):
        MultiScaleFusion(12, [5, 20])


def test_alexnet_backbone_puts_attention_on_conv5(tmp_path):
    config = HFAHConfig(bits=16)  # torchvision:alexnet, random weights
    net = ImageTower(config)
    assert isinstance(net.conv[-1], nn.ReLU) and not any(isinstance(m, nn.Dropout) for m in net.head.modules())
    assert net.conv(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 13, 13)
    assert isinstance(net.attention, HybridAttention) and net.attention.mlp[0].out_channels == 256 // 16
    f, h = net.encode(torch.randn(2, 3, 224, 224))
    assert f.shape == (2, 512) and h.shape == (2, 16)
    # pretrained weights come only from a local file, through the shared loader
    with pytest.raises(FileNotFoundError):
        ImageTower(HFAHConfig(bits=16, backbone_weights=str(tmp_path / "missing.pth")))


def test_cnnf_layer_table():
    net = ImageTower(HFAHConfig(backbone="cnnf", bits=16))
    assert net.conv(torch.zeros(1, 3, 224, 224)).shape == (1, 256, 13, 13)
    assert net.head(torch.zeros(1, 256, 13, 13)).shape == (1, 4096)


def _matconvnet_vgg_f(path, rng, average_image):
    """A file laid out like MatConvNet's imagenet-vgg-f.mat (random weights, every layer of
    the network, 1x1 filters squeezed by MATLAB's conventions as scipy reads them back)."""
    from scipy.io import savemat

    shapes = {"conv1": (11, 11, 3, 64), "conv2": (5, 5, 64, 256), "conv3": (3, 3, 256, 256),
              "conv4": (3, 3, 256, 256), "conv5": (3, 3, 256, 256), "fc6": (6, 6, 256, 4096),
              "fc7": (1, 1, 4096, 4096), "fc8": (1, 1, 4096, 1000)}
    raw, layers = {}, []
    for name in ("conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2", "conv3", "relu3",
                 "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "fc7", "relu7", "fc8", "prob"):
        layer = {"name": name, "type": name.rstrip("0123456789").replace("fc", "conv")}
        if name in shapes:
            h, w, i, o = shapes[name]
            filters = (rng.standard_normal(shapes[name]) / math.sqrt(h * w * i)).astype(np.float32)
            biases = (0.1 * rng.standard_normal(o)).astype(np.float32)
            raw[name] = filters, biases
            cell = np.empty(2, dtype=object)
            cell[:] = [filters, biases]
            layer["weights"] = cell
        layers.append(layer)
    cells = np.empty(len(layers), dtype=object)
    cells[:] = layers
    savemat(path, {"layers": cells, "normalization": {"averageImage": average_image, "imageSize": [224, 224, 3]}})
    return raw


@pytest.mark.slow
def test_cnnf_loads_matconvnet_weights_and_its_input_convention(tmp_path):
    rng = np.random.default_rng(0)
    average = np.array([122.7, 114.9, 101.6])
    raw = _matconvnet_vgg_f(tmp_path / "imagenet-vgg-f.mat", rng,
                            np.broadcast_to(average, (224, 224, 3)).astype(np.float32))
    net = ImageTower(HFAHConfig(backbone="cnnf", bits=16, backbone_weights=str(tmp_path / "imagenet-vgg-f.mat")))
    pixels = torch.rand(2, 3, 224, 224)  # [0, 1] RGB
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def weights(name):  # MatConvNet (h, w, in, out) -> torch (out, in, h, w)
        filters, biases = raw[name]
        return torch.from_numpy(filters.transpose(3, 2, 0, 1).copy()), torch.from_numpy(biases)

    # CNN-F as MatConvNet runs it: 0-255 RGB minus the average image
    lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    x = 255.0 * pixels - torch.tensor(average, dtype=torch.float32).view(1, 3, 1, 1)
    x = F.max_pool2d(F.pad(lrn(F.relu(F.conv2d(x, *weights("conv1"), stride=4))), (0, 1, 0, 1)), 3, 2)
    x = F.max_pool2d(lrn(F.relu(F.conv2d(x, *weights("conv2"), padding=2))), 3, 2)
    for name in ("conv3", "conv4", "conv5"):
        x = F.relu(F.conv2d(x, *weights(name), padding=1))
    x = F.max_pool2d(x, 3, 2)
    for name in ("fc6", "fc7"):
        x = F.relu(F.conv2d(x, *weights(name)))
    expect = x.flatten(1)

    with torch.no_grad():
        got = net.head(net.conv((pixels - mean) / std))  # what the pipeline feeds: ImageNet-normalised pixels
    assert got.shape == (2, 4096)
    assert float((got - expect).abs().max()) <= 1e-3 * float(expect.abs().max())


def test_cnnf_matconvnet_file_errors(tmp_path):
    not_mat = tmp_path / "vgg-f.mat"
    not_mat.write_bytes(b"MATLAB? no")
    with pytest.raises(ConfigError, match="not a MATLAB file"):
        ImageTower(HFAHConfig(backbone="cnnf", bits=16, backbone_weights=str(not_mat)))
    from scipy.io import savemat

    savemat(tmp_path / "other.mat", {"layers": np.array([{"name": "conv1", "type": "conv"}], dtype=object),
                                     "normalization": {"averageImage": np.zeros(3)}})
    with pytest.raises(ConfigError, match="no \\(filters, biases\\) pair|no layer"):
        ImageTower(HFAHConfig(backbone="cnnf", bits=16, backbone_weights=str(tmp_path / "other.mat")))
    with pytest.raises(ConfigError, match="224-pixel"):
        ImageTower(HFAHConfig(backbone="cnnf", bits=16, image_size=112, backbone_weights=str(tmp_path / "other.mat")))


def test_config_validation():
    with pytest.raises(ConfigError, match="model.backbone"):
        HFAHConfig(backbone="clip:ViT-B-32")
    with pytest.raises(ConfigError, match="attention_mode"):
        HFAHConfig(attention_mode="soft")
    with pytest.raises(ConfigError, match="multiple of 8"):
        HFAHConfig(bits=12)
    with pytest.raises(ConfigError, match="divisible by 8"):
        ImageTower(HFAHConfig(backbone="tiny-cnn", image_size=20))


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_switches(tmp_path, variant):
    overrides = [f"model.{k}={str(v).lower()}" for k, v in ABLATIONS[variant].items()]
    method, _, _ = toy_method_and_ctx(tmp_path, *overrides)
    recon = variant == "hfah"
    assert ("recon" in method.modules()) == recon and ("disc" in method.optimizers()) == recon
    assert isinstance(method.image_net.attention, HybridAttention) == (variant in ("hfah", "hfah-3"))
    assert isinstance(method.text_net.fusion, MultiScaleFusion) == (variant != "hfah-1")


def test_towers_are_plain_modules_without_training_parts(tmp_path):
    method, _, data = toy_method_and_ctx(tmp_path)
    image_tower, text_tower = method.image_tower(), method.text_tower()
    training_only = {id(p) for name in ("label_net", "recon", "disc") for p in method.modules()[name].parameters()}
    for tower in (image_tower, text_tower):
        assert isinstance(tower, nn.Module)
        assert not {id(p) for p in tower.parameters()} & training_only
        assert not any(t.dim() > 0 and t.shape[0] == len(data) for t in tower.state_dict().values())
    batch = full_batch(data, [0, 1, 2])
    for codes in (image_tower(batch.image), text_tower(batch.text)):
        assert codes.shape == (3, 16) and (codes.abs() < 1).all()


# --------------------------------------------------------------------------- training and divergence


def test_fit_fills_banks_updates_B_and_resumes_exactly(tmp_path):
    config = toy_run_config(tmp_path / "a", "train.epochs=2", "train.eval_every=1")
    train = ToyImages(48, seed=0)
    method = build_method(config, train.info())
    result = Trainer(config, method, train, ToyImages(16, seed=1), ToyImages(32, seed=2)).fit()
    assert len(result.history) == 2 and "map_i2t" in result.last and "B_changed" in result.last
    assert all(float(bank.abs().sum()) > 0 for bank in method.banks.values())
    assert torch.equal(method.B, sign(method.banks["H_label"] + method.banks["H_text"] + method.banks["H_image"]))

    resumed_config = toy_run_config(tmp_path / "a", "train.epochs=2", "train.eval_every=1")
    first = toy_run_config(tmp_path / "b", "train.epochs=1", "train.eval_every=1")
    Trainer(first, build_method(first, train.info()), train, ToyImages(16, seed=1), ToyImages(32, seed=2)).fit()
    second = toy_run_config(tmp_path / "b", "train.epochs=2", "train.eval_every=1", "train.resume=true")
    again = build_method(second, train.info())
    Trainer(second, again, train, ToyImages(16, seed=1), ToyImages(32, seed=2)).fit()
    assert resumed_config.model == second.model
    for name, module in method.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, again.modules()[name].state_dict()[key]), f"{name}.{key}"
    assert torch.equal(method.B, again.B)


def test_exploding_losses_stop_training_with_a_typed_error(tmp_path):
    config = toy_run_config(tmp_path, "train.epochs=3", "model.lr_text=30.0", "model.lr_image=30.0",
                            "model.lr_image_backbone=30.0")
    train = ToyImages(48, seed=0)
    with pytest.raises(AdversarialDivergenceError, match="exploded") as info:
        Trainer(config, build_method(config, train.info()), train).fit()
    assert info.value.kind == "exploding-loss" and info.value.value > config.model.max_loss
    assert isinstance(info.value, cmhash.CmhashError)


def test_collapsed_discriminator_stops_training_with_a_typed_error(tmp_path):
    # the generators ignore the discriminators (delta_adv = 0) and D learns fast: it wins outright
    # (measured: epoch-mean D loss 2.73, 1.82, 0.22, 0.004, 0.0, ...)
    train = ToyImages(48, seed=0)
    collapse = ["train.epochs=6", "train.batch_size=8", "model.lr_disc=3e-2", "model.min_disc_loss=0.05",
                "model.collapse_epochs=2"]
    config = toy_run_config(tmp_path, *collapse, "model.delta_adv=0.0")
    with pytest.raises(AdversarialDivergenceError, match="collapsed discriminator") as info:
        Trainer(config, build_method(config, train.info()), train).fit()
    assert info.value.kind == "collapsed-discriminator" and info.value.value < 0.05
    # with the generators playing, the same fast discriminator does not win outright
    healthy = toy_run_config(tmp_path / "healthy", *collapse)
    history = Trainer(healthy, build_method(healthy, train.info()), train).fit().history
    assert min(row["disc_epoch_loss"] for row in history) > 0.05


# --------------------------------------------------------------------------- configs and the run path


def test_every_shipped_config_is_valid():
    shipped = {name for name in list_configs() if name.startswith("hfah/")}
    assert {"hfah/demo", "hfah/mirflickr-mini", "hfah/mirflickr25k", "hfah/nuswide10"} <= shipped
    expected = {f"hfah/{d}-{b}" for d in ("mirflickr25k", "nuswide10") for b in (16, 32, 64)}  # the published names
    for name in sorted(shipped | expected):
        config = load_config(name)
        assert config.method == "hfah"
        if name in expected:  # the spec's settings (§8)
            m = config.model
            assert m.bits == int(name.rsplit("-", 1)[1]) and m.backbone == "torchvision:alexnet"
            assert (m.hidden, m.feature_dim, m.label_pretrain_epochs) == (4096, 512, 10)
            assert m.text_windows == [5, 10, 15, 30, 50]
            assert m.lr_label == 1e-2 and m.lr_disc == 1e-3 and m.lr_schedule == "cosine"
            assert m.lr_text == pytest.approx(10 ** -3.5, rel=1e-3)
            assert m.lr_image_backbone == pytest.approx(10 ** -4.5, rel=1e-3)
            assert config.train.batch_size == 128 and config.train.epochs == 30


def test_trains_through_the_run_path_and_reloads_the_towers(tmp_path):
    config = load_config("hfah/demo", [
        f"train.out_dir={tmp_path}", "train.progress=false", "train.device=cpu", "train.epochs=1", "data.n=120",
        "data.split={query: 20, train: 60, seed: 0}", *TINY, "model.image_size=32", "model.label_pretrain_epochs=1"])
    result = train(config)
    _, method, _ = load_trained(result.out_dir / "last")
    prepared = prepare_data(config)
    image, text = (torch.stack([prepared.query[k][j] for k in range(4)]) for j in (0, 1))
    with torch.no_grad():
        codes = method.image_tower()(image), method.text_tower()(text.float())
    assert all(c.shape == (4, 16) for c in codes)
    assert set(method.modules()) == {"label_net", "text_net", "image_net", "recon", "disc"}
    scores = evaluate(result.out_dir / "last")
    assert scores["i2t"]["map"] == pytest.approx(result.last["map_i2t"], abs=1e-9)


# --------------------------------------------------------------------------- learning


def random_codes_map(q_lab: np.ndarray, d_lab: np.ndarray, bits: int, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    return float(np.mean([mean_average_precision(rng.integers(0, 256, (len(q_lab), bits // 8), dtype=np.uint8),
                                                 rng.integers(0, 256, (len(d_lab), bits // 8), dtype=np.uint8),
                                                 q_lab, d_lab) for _ in range(repeats)]))


def run_shipped(name: str, tmp_path, *overrides):
    config = load_config(name, [f"train.out_dir={tmp_path}", "train.progress=false",
                                                 "train.device=cpu", *overrides])
    started = time.perf_counter()
    result = train(config)
    prepared = prepare_data(config)
    chance = random_codes_map(prepared.query.labels.numpy(), prepared.database.labels.numpy(), config.model.bits)
    return result.last["map_i2t"], result.last["map_t2i"], chance, time.perf_counter() - started


@pytest.mark.slow
def test_demo_learns_the_generated_shapes(tmp_path):
    i2t, t2i, chance, seconds = run_shipped("hfah/demo", tmp_path)
    print(f"hfah/demo: mAP I->T {i2t:.3f}, T->I {t2i:.3f} (random codes {chance:.3f}) in {seconds:.0f}s")
    assert i2t >= 0.85 and t2i >= 0.85


def test_beats_random_codes_on_mirflickr_mini(tmp_path):
    root = require(SHARED_DATA / "mirflickr-mini")
    i2t, t2i, chance, seconds = run_shipped("hfah/mirflickr-mini", tmp_path, f"data.root={root}")
    print(f"hfah/mirflickr-mini: mAP I->T {i2t:.3f}, T->I {t2i:.3f} (random codes {chance:.3f}) in {seconds:.0f}s")
    assert i2t > chance + 0.02 and t2i > chance + 0.02


def test_towers_export_to_onnx_and_match(tmp_path):
    """Every tower op has an ONNX form (LRN, ReduceMean/Max, Conv, AveragePool, linear Resize):
    ONNX Runtime gives the same codes as torch, at another batch size than the exported one."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    config = HFAHConfig(backbone="tiny-cnn", image_size=32, bits=32, feature_dim=64, tiny_width=64)
    image_net = ImageTower(config).eval()
    with torch.no_grad():
        image_net.attention.gate.fill_(0.7)  # the attention branch in use
    text_net = TextNet(300, 32, 256, 64, True, True, [5, 10, 15, 30, 50]).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"image": (image_net, torch.randn(3, 3, 32, 32, generator=g)),
              "text": (text_net, (torch.rand(3, 300, generator=g) < 0.05).float())}
    for name, (net, x) in inputs.items():
        path = str(tmp_path / f"{name}.onnx")
        torch.onnx.export(net, (x,), path, input_names=["x"], output_names=["h"], opset_version=17,
                          dynamic_axes={"x": {0: "n"}, "h": {0: "n"}}, dynamo=False)
        x5 = torch.cat([x, x[:2]])
        out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x5.numpy()})[0]
        with torch.no_grad():
            ref = net(x5).numpy()
        assert np.abs(out - ref).max() < 1e-4, name
        assert ((out >= 0) == (ref >= 0)).all(), name
