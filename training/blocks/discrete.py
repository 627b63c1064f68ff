"""The discrete code-matrix update of EGATH (GCDH's optimisation step), run
once per epoch over the whole training set.

State: B in {-1,+1}^(n x k), the code matrix the quantisation loss pulls towards; P, an
n x k matrix with orthonormal columns (a decorrelated, balanced relaxation of B); Q, the
multiplier of the constraint B = P; gamma, the penalty weight, grown by rho each epoch.
"""

from __future__ import annotations

import torch

from .hashing import binarize, check_bits


class DiscreteCodes:
    def __init__(self, n: int, bits: int, seed: int = 0, gamma: float = 0.01, rho: float = 1.05, mu: float = 0.5,
                 ridge: float = 1.0, procrustes_scale: float = 1.0):
        check_bits(bits)
        generator = torch.Generator().manual_seed(seed)
        self.B = binarize(torch.randn(n, bits, generator=generator))
        self.P = self.B.clone()
        self.Q = torch.zeros(n, bits)
        self.gamma, self.rho, self.mu, self.ridge = float(gamma), float(rho), float(mu), float(ridge)
        self.procrustes_scale = float(procrustes_scale)  # GCDH: unscaled (1.0); sqrt(n) balances P with B

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """B for a batch of training-sample indices."""
        return self.B[index]

    @torch.no_grad()
    def update(self, labels: torch.Tensor, image_codes: torch.Tensor, text_codes: torch.Tensor) -> torch.Tensor:
        """One epoch's update from the training labels L (n x C) and the latest relaxed
        codes of every training sample (n x k each, detached). Returns R (C x k)."""
        L = labels.float()
        # 1. ridge map from labels to codes: R = (L^T L + ridge I)^-1 L^T B
        gram = L.T @ L + self.ridge * torch.eye(L.shape[1], device=L.device)
        R = torch.linalg.solve(gram, L.T @ self.B)
        # 2. codes: sign(L R + gamma P - Q + mu (H_I + H_T)), 0 -> +1
        self.B = binarize(L @ R + self.gamma * self.P - self.Q + self.mu * (image_codes + text_codes))
        # 3. P = the orthonormal-column matrix nearest to B + Q / gamma (Procrustes: U V^T of
        #    its thin SVD; the thin SVD completes U on a rank-deficient argument)
        U, _, Vh = torch.linalg.svd(self.B + self.Q / self.gamma, full_matrices=False)
        self.P = self.procrustes_scale * (U @ Vh)
        # 4. multiplier ascent, 5. larger penalty
        self.Q = self.Q + self.gamma * (self.B - self.P)
        self.gamma *= self.rho
        return R

    def state_dict(self) -> dict:
        return {"B": self.B, "P": self.P, "Q": self.Q, "gamma": torch.tensor(self.gamma)}

    def load_state_dict(self, state: dict) -> None:
        self.B, self.P, self.Q = state["B"].clone(), state["P"].clone(), state["Q"].clone()
        self.gamma = float(state["gamma"])
