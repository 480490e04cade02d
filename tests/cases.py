"""Seeded, tiny float64 model factories shared by the tests (import them as ``from cases import ...``).

- :func:`make_mlp`: tanh/softplus MLP 4 -> 5 -> 4 -> 3 (64 parameters), float64, eval mode.
- :func:`make_bn_cnn`: conv -> BatchNorm2d -> softplus -> linear on 1x5x5 inputs (81 parameters), float64,
  eval mode with non-trivial running statistics (a few train-mode forwards under ``no_grad`` first).
- :func:`make_dropout_mlp`: MLP with ``Dropout(0.5)``, float64, eval mode.
- :func:`make_mlp_case`, :func:`make_cnn_case`: those models with data (:class:`Case`).

They live here rather than in ``conftest.py`` because several folders have a ``conftest.py`` and
``from conftest import`` picks whichever pytest loaded last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

N_CLASSES = 3
N_EXAMPLES = 10


@dataclass
class Case:
    """A model with data: ``x`` (N, ...) float64 inputs and ``y`` (N,) class labels."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    n_classes: int = N_CLASSES


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, N_CLASSES)
    ).double()
    return model.eval()


def make_bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3),
        nn.BatchNorm2d(2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, N_CLASSES),
    ).double()
    with torch.no_grad():
        bn = model[1]
        bn.weight.copy_(1.0 + 0.3 * torch.randn(2, dtype=torch.float64))
        bn.bias.copy_(0.2 * torch.randn(2, dtype=torch.float64))
        model.train()
        for _ in range(3):  # non-trivial running statistics
            model(2.0 * torch.randn(6, 1, 5, 5, dtype=torch.float64) + 0.5)
    model.eval()
    assert not torch.allclose(bn.running_mean, torch.zeros(2, dtype=torch.float64))
    assert not torch.allclose(bn.running_var, torch.ones(2, dtype=torch.float64))
    return model


def make_dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, N_CLASSES)).double()
    return model.eval()


def make_mlp_case(seed: int = 0, n: int = N_EXAMPLES) -> Case:
    model = make_mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("mlp-f64", model, x, y)


def make_cnn_case(seed: int = 0, n: int = N_EXAMPLES) -> Case:
    model = make_bn_cnn(seed)
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    return Case("bn-cnn-eval-f64", model, x, y)


CASES: dict[str, Callable[[], Case]] = {"mlp-f64": make_mlp_case, "bn-cnn-eval-f64": make_cnn_case}
