"""Tiny float64 models for the importance tests (seeded; import as ``from importance_cases import ...``).

- :func:`regression_case`: ``Linear(4, 3)`` with the MSE loss - the loss is exactly quadratic in the weights, so
  second-order Taylor expansions are exact.
- :func:`conv_chain`: conv -> BatchNorm -> ReLU -> conv -> ReLU -> flatten -> linear on 1x5x5 inputs (a plain
  ``nn.Sequential`` chain), eval mode with non-trivial BatchNorm statistics.
- :class:`WithUnused`: an MLP with a ``Linear`` that ``forward`` never calls.
- :func:`tiny_vit`: gradsense's ``TinyViT`` with 2 heads, 4x4 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsense.zoo.models import TinyViT


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


@dataclass
class Data:
    model: nn.Module
    x: Tensor
    y: Tensor


def regression_case(seed: int = 0, n: int = 20) -> Data:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3)).double().eval()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return Data(model, x, y)


def conv_chain(seed: int = 0, n: int = 12) -> Data:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 3),
    ).double()
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, 5, 5, dtype=torch.float64) + 0.3)
        model[1].weight.copy_(1 + 0.3 * torch.randn(4, dtype=torch.float64))
        model[1].bias.copy_(0.2 * torch.randn(4, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Data(model, x, y)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.unused = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def unused_case(seed: int = 0, n: int = 10) -> Data:
    torch.manual_seed(seed)
    model = WithUnused().double().eval()
    g = torch.Generator().manual_seed(seed + 2)
    return Data(model, torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def tiny_vit(seed: int = 0, n: int = 6) -> Data:
    torch.manual_seed(seed)
    model = TinyViT(image_size=4, patch_size=2, dim=8, depth=1, heads=2, mlp_ratio=1.0, num_classes=3).double().eval()
    with torch.no_grad():  # trunc_normal(0.02) init is nearly linear: give the attention something to do
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 3)
    return Data(model, torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


CE = F.cross_entropy


def remove_each_weight(model: nn.Module, loss_fn, x: Tensor, y: Tensor, name: str) -> Tensor:
    """Oracle: the exact loss change of setting each entry of parameter ``name`` to 0, one at a time."""
    p = dict(model.named_parameters())[name]
    out = torch.zeros_like(p)
    with torch.no_grad():
        base = float(loss_fn(model(x), y))
        for i in range(p.numel()):
            old = p.view(-1)[i].item()
            p.view(-1)[i] = 0.0
            out.view(-1)[i] = float(loss_fn(model(x), y)) - base
            p.view(-1)[i] = old
    return out
