"""Tiny float64 models with closed-form behaviour for the evaluation tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Linear1(nn.Module):
    """``f(x) = w . x + b`` as a (N, 1) output, for (N, D) or (N, C, H, W) inputs (flattened)."""

    def __init__(self, d: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1) @ self.w + self.b)[:, None]


class Quadratic(nn.Module):
    """``f(x) = x^T A x / 2 + c . x`` with symmetric ``A``, as a (N, 1) output."""

    def __init__(self, d: int, seed: int = 0, linear: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = nn.Parameter(m + m.T)
        self.c = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64) if linear
                              else torch.zeros(d, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        z = x.reshape(x.shape[0], -1)
        return (0.5 * ((z @ self.A) * z).sum(1) + z @ self.c)[:, None]


class Cubic(nn.Module):
    """``f(x) = k * sum_j x_j^3`` as a (N, 1) output."""

    def __init__(self, k: float = 0.7) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return (self.k * (x.reshape(x.shape[0], -1) ** 3).sum(1))[:, None]


def tiny_cnn(seed: int = 0, channels: int = 2) -> nn.Module:
    """conv(2 -> 3) -> softplus -> linear(3*4*4 -> 3) on 2x4x4 images, float64, eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 3, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double().eval()
