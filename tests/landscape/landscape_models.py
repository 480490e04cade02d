"""Seeded float64 model factories for the landscape tests (two checkpoints need two seeds, which the shared
``mlp``/``bn_cnn`` fixtures do not give)."""

from __future__ import annotations

import torch
from torch import nn


def make_mlp(seed: int = 0) -> nn.Module:
    """tanh/softplus MLP 4 -> 5 -> 4 -> 3, float64, eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)).double().eval()


def make_bn_cnn(seed: int = 0) -> nn.Module:
    """conv -> BatchNorm2d -> softplus -> linear on 1x5x5 inputs, float64, eval mode, non-trivial statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3), nn.BatchNorm2d(2), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3),
    ).double()
    with torch.no_grad():
        model[1].weight.copy_(1.0 + 0.3 * torch.randn(2, dtype=torch.float64))
        model[1].bias.copy_(0.2 * torch.randn(2, dtype=torch.float64))
        model.train()
        for _ in range(3):
            model(2.0 * torch.randn(6, 1, 5, 5, dtype=torch.float64) + 0.5)
    return model.eval()
