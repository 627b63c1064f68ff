"""A tiny but real hashing method for the trainer's tests, and a script that trains it.

``toy``: a small conv net (with BatchNorm) hashes 8x8 images, an MLP (with dropout, so the
RNG matters) hashes 16-word bags of words. Each iteration alternates an image step and a
text step (two optimisers), with a pairwise likelihood loss between the modalities and a
quantisation loss towards a discrete code matrix B. B is updated once per epoch from
per-sample buffers of the latest outputs, like EGATH's B; before the first epoch the buffers
are filled by one pass of the untrained nets, like HFAH's memory banks. Synthetic data: labels pick
class patterns for the images and class words for the texts, plus noise.

As a script (used for torchrun and kill tests)::

    python toy_method.py OUT_DIR [section.key=value ...]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from cmhash.text import Vocabulary
from cmhash.training.config import MethodConfig
from cmhash.training.method import Batch, DatasetInfo, HashingMethod, register_method

N_LABELS, TEXT_DIM, IMAGE_SIZE = 4, 16, 8


class ToyDataset(Dataset):
    """``n`` synthetic items ``(image, bow, labels, index)``; the same ``seed`` gives the same items."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = (torch.rand(n, N_LABELS, generator=g) < 0.25).float()
        self.labels[self.labels.sum(1) == 0, 0] = 1.0  # every item has a label
        patterns = torch.Generator().manual_seed(1234)  # class patterns shared by all splits
        image_patterns = torch.randn(N_LABELS, 3, IMAGE_SIZE, IMAGE_SIZE, generator=patterns)
        word_weights = torch.randn(N_LABELS, TEXT_DIM, generator=patterns)
        self.images = torch.einsum("nc,chwx->nhwx", self.labels, image_patterns)
        self.images += 0.5 * torch.randn(self.images.shape, generator=g)
        self.bows = ((self.labels @ word_weights + 0.5 * torch.randn(n, TEXT_DIM, generator=g)) > 0.8).float()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.bows[i], self.labels[i], i

    def info(self) -> DatasetInfo:
        return DatasetInfo(
            n_train=len(self),
            n_labels=N_LABELS,
            text_dim=TEXT_DIM,
            train_labels=self.labels.clone(),
            label_names=[f"class{i}" for i in range(N_LABELS)],
            image_size=IMAGE_SIZE,
            preprocessing={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
            vocabulary=Vocabulary.from_words([f"word{i}" for i in range(TEXT_DIM)]).to_dict(),
        )


@dataclass
class ToyConfig(MethodConfig):
    bits: int = 16
    hidden: int = 32
    lr: float = 0.03
    lr_decay: float = 0.9  # per epoch
    quantisation: float = 0.05
    dropout: float = 0.1
    nan_at_step: int | None = None  # global step at which the loss becomes NaN (tests the NaN stop)


class ImageNet(nn.Module):
    def __init__(self, bits: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.hash = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, bits), nn.Tanh())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.hash(self.features(image))


class TextNet(nn.Module):
    def __init__(self, text_dim: int, bits: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(text_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, bits), nn.Tanh()
        )

    def forward(self, bow: torch.Tensor) -> torch.Tensor:
        return self.net(bow)


@register_method("toy")
class ToyMethod(HashingMethod):
    Config = ToyConfig

    def __init__(self, config: ToyConfig, info: DatasetInfo) -> None:
        super().__init__(config, info)
        self.image_net = ImageNet(config.bits, config.hidden)
        self.text_net = TextNet(info.text_dim, config.bits, config.hidden, config.dropout)
        n, k = info.n_train, config.bits
        self.B = torch.where(torch.randn(n, k) >= 0, 1.0, -1.0)
        self.B0 = self.B  # B after on_fit_start (kept to compare processes in the torchrun test)
        self.H_image = torch.zeros(n, k)
        self.H_text = torch.zeros(n, k)
        self.b_updates = torch.tensor(0)
        self._optimizers = {
            "image": torch.optim.Adam(self.image_net.parameters(), lr=config.lr, weight_decay=1e-4),
            "text": torch.optim.Adam(self.text_net.parameters(), lr=config.lr, weight_decay=1e-4),
        }
        self._schedulers = {
            name: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
            for name, opt in self._optimizers.items()
        }

    def modules(self) -> dict[str, nn.Module]:
        return {"image_net": self.image_net, "text_net": self.text_net}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"B": self.B, "B0": self.B0, "H_image": self.H_image, "H_text": self.H_text, "b_updates": self.b_updates}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.B, self.B0, self.H_image, self.H_text = tensors["B"], tensors["B0"], tensors["H_image"], tensors["H_text"]
        self.b_updates = tensors["b_updates"]

    def sample_buffers(self) -> dict[str, torch.Tensor]:
        return {"H_image": self.H_image, "H_text": self.H_text}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return self._schedulers

    @torch.no_grad()
    def on_fit_start(self, ctx) -> None:
        # Like HFAH's bank fill: one pass of the untrained nets, then B from the filled buffers.
        for module in self.modules().values():
            module.eval()
        for batch in ctx.train_batches():
            self.H_image[batch.index] = self.image_net(batch.image).float()
            self.H_text[batch.index] = self.text_net(batch.text).float()
        ctx.sync_sample_buffers()  # every process needs all rows before computing B
        self.B = self.B0 = torch.where(self.H_image + self.H_text >= 0, 1.0, -1.0)

    def _loss(self, h_anchor, h_other, labels, codes):
        similar = (labels @ labels.T > 0).float()
        theta = 0.5 * h_anchor @ h_other.T
        pairwise = (F.softplus(theta) - similar * theta).mean()  # -log-likelihood of the similarities
        quantisation = (codes - h_anchor).pow(2).mean()
        if self.config.nan_at_step is not None and self._global_step == self.config.nan_at_step:
            pairwise = pairwise * float("nan")
        return pairwise + self.config.quantisation * quantisation, pairwise, quantisation

    def train_step(self, batch: Batch, ctx) -> dict[str, float]:
        self._global_step = ctx.global_step
        codes = self.B[batch.index]
        with ctx.autocast():
            h_text = self.text_net(batch.text).detach()
            h_image = self.image_net(batch.image)
            loss_i, pair_i, quant_i = self._loss(h_image, h_text, batch.labels, codes)
        ctx.backward_step(loss_i, self._optimizers["image"], name="image", terms={"pairwise": pair_i})
        self.H_image[batch.index] = h_image.detach().float()

        with ctx.autocast():
            h_text = self.text_net(batch.text)
            loss_t, pair_t, quant_t = self._loss(h_text, self.H_image[batch.index], batch.labels, codes)
        ctx.backward_step(loss_t, self._optimizers["text"], name="text", terms={"pairwise": pair_t})
        self.H_text[batch.index] = h_text.detach().float()
        return {"pairwise": (pair_i + pair_t).item() / 2, "quantisation": (quant_i + quant_t).item() / 2}

    def on_epoch_end(self, epoch: int, ctx) -> dict[str, float]:
        new_B = torch.where(self.H_image + self.H_text >= 0, 1.0, -1.0)
        changed = (new_B != self.B).float().mean().item()
        self.B = new_B
        self.b_updates = self.b_updates + 1
        return {"b_changed": changed}

    def image_tower(self) -> nn.Module:
        return self.image_net

    def text_tower(self) -> nn.Module:
        return self.text_net


def main(argv: list[str]) -> None:
    """Train ``toy`` on synthetic data into OUT_DIR, with config overrides."""
    from safetensors.torch import save_file

    from cmhash.training.run import load_config
    from cmhash.training.trainer import Trainer, build_method

    out_dir, *overrides = argv
    config = load_config(None, ["method=toy", f"train.out_dir={out_dir}", "train.device=cpu", *overrides])
    train_set, query_set, database_set = ToyDataset(64, seed=0), ToyDataset(16, seed=1), ToyDataset(48, seed=2)
    method = build_method(config, train_set.info())
    Trainer(config, method, train_set, query_set, database_set).fit()
    if "RANK" in os.environ:  # torchrun: every rank leaves its final tensors for comparison
        final = {f"{n}.{k}": v for n, m in method.modules().items() for k, v in m.state_dict().items()}
        final.update({f"state/{k}": v for k, v in method.state_tensors().items()})
        save_file({k: v.contiguous() for k, v in final.items()}, str(Path(out_dir) / f"final-rank{os.environ['RANK']}.safetensors"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1:])
