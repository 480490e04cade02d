"""Tiny float64 problems with a known Hessian for the curvature tests.

- :class:`Quadratic`: a module whose loss ``0.5 theta^T A theta`` has Hessian exactly ``A`` (a symmetric
  matrix with a chosen spectrum), its parameter split over two layers ``a`` and ``b``.
- :func:`make_wide_mlp_case`: an MLP 8 -> 24 -> 16 -> 3 (667 parameters), larger than any sketch, for the
  stochastic estimators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cases import Case

__all__ = ["Quadratic", "layer_slices", "make_trained_mlp_case", "make_wide_mlp_case", "quadratic_loss", "symmetric_with_spectrum"]


def symmetric_with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``Q diag(eigenvalues) Q^T`` with a seeded random orthogonal ``Q`` (float64, exactly symmetric)."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    a = (q * eigenvalues.to(torch.float64)) @ q.T
    return 0.5 * (a + a.T)


class _Vector(nn.Module):
    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


class Quadratic(nn.Module):
    """``forward(x)`` returns ``theta = cat(a.w, b.w)`` for every row; with :func:`quadratic_loss` the loss is
    ``0.5 theta^T A theta`` whatever the inputs, so the loss Hessian is ``A``."""

    def __init__(self, n_a: int, n_b: int) -> None:
        super().__init__()
        self.a = _Vector(n_a, 1)
        self.b = _Vector(n_b, 2)

    def forward(self, x: Tensor) -> Tensor:
        theta = torch.cat([self.a.w, self.b.w])
        return theta.expand(x.shape[0], -1)


def quadratic_loss(a: Tensor):
    """``(output, labels) -> mean_i 0.5 o_i^T A o_i``."""

    def loss(out: Tensor, _labels: Tensor) -> Tensor:
        return 0.5 * torch.einsum("ni,ij,nj->n", out, a, out).mean()

    return loss


def make_wide_mlp_case(seed: int = 0, n: int = 12) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 16), nn.Softplus(), nn.Linear(16, 3)
    ).double().eval()
    g = torch.Generator().manual_seed(seed + 300)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("wide-mlp-f64", model, x, y)


def make_trained_mlp_case(seed: int = 0, n: int = 96, steps: int = 100) -> Case:
    """The wide MLP after ``steps`` Adam steps on teacher labels: near a minimum its Hessian is nearly PSD
    with a few outliers over a decaying bulk, like a trained network's (the untrained one is indefinite,
    its trace small next to its nuclear norm)."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 16), nn.Softplus(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(seed + 300)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (x @ teacher + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return Case("trained-mlp-f64", model.eval(), x, y)


def layer_slices(model: nn.Module) -> dict[str, slice]:
    """Coordinates of each layer (module owning parameters) in the flat parameter vector."""
    out: dict[str, slice] = {}
    pos = 0
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        start = out[layer].start if layer in out else pos
        pos += p.numel()
        out[layer] = slice(start, pos)
    return out
