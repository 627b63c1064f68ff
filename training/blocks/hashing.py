"""Hash heads and binarisation."""

from __future__ import annotations

import torch
from torch import nn

from ..config import check_bits


def binarize(relaxed: torch.Tensor) -> torch.Tensor:
    """sign with 0 -> +1 (torch.sign would give 0), as the papers and cmhash.pack_codes."""
    return torch.where(relaxed >= 0, 1.0, -1.0).to(relaxed.dtype)


class HashHead(nn.Module):
    """Linear + tanh: features (N, in_dim) -> relaxed codes (N, bits) in (-1, 1).
    Kaiming-normal weight and zero bias, as GCDH initialises its hash layers."""

    def __init__(self, in_dim: int, bits: int):
        super().__init__()
        self.bits = check_bits(bits)
        self.linear = nn.Linear(in_dim, bits)
        nn.init.kaiming_normal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(features))
