"""Seeded tiny float64 models for the privacy tests (import as ``from privacy_cases import ...``).

- :func:`sigmoid_cnn`: conv(1->3, 3x3) - sigmoid - linear(108->6) - sigmoid - linear(6->C) on 1x6x6 images,
  the DLG paper's kind of network at toy size (smooth, no pooling).
- :func:`relu_mlp`: flatten - linear(d->h) - ReLU - linear(h->C): a Linear first layer (analytic attack).
- :func:`relu_nobias_head`: conv - ReLU - flatten - linear without bias (iDLG's weight-row rule).
- :func:`bn_cnn`: conv - BatchNorm2d - sigmoid - linear, eval mode with non-trivial running statistics.
- :func:`dropout_mlp`: linear - tanh - Dropout(0.3) - linear, train mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

C = 4


def sigmoid_cnn(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(108, 6), nn.Sigmoid(),
                         nn.Linear(6, classes)).double().eval()


def relu_mlp(seed: int = 0, d: int = 36, h: int = 32, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, classes)).double().eval()


def relu_nobias_head(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, classes, bias=False)).double()
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # live ReLU features (all-dead features leave nothing to read)
    return model.eval()


def bn_cnn(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Sigmoid(), nn.Flatten(),
                          nn.Linear(72, classes)).double()
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.rand(8, 1, 6, 6, dtype=torch.float64) * 2)
    return model.eval()


def dropout_mlp(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, classes)).double().train()


def images(n: int, seed: int = 1, side: int = 6) -> Tensor:
    """``n`` smooth-ish float64 images in [0, 1] of shape (1, side, side)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g, dtype=torch.float64)
