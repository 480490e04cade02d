"""Seeded float64 problems for the influence tests, and their independent oracles.

- :func:`logreg_problem`: multinomial logistic regression (one ``nn.Linear``) on separable-ish Gaussian blobs,
  trained to convergence by L-BFGS on ``mean CE + wd/2 |theta|^2`` (strongly convex).
- :func:`mlp_problem`: a tanh MLP 4 -> 6 -> 3, trained a little.
- :func:`loop_grads`: per-example gradients by a Python loop of ``torch.autograd.grad`` (flattened, model order).
- :func:`dense_curvature`: the dense Hessian of the mean loss (``torch.autograd.functional.hessian``).

Nothing here imports gradsense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

CE = F.cross_entropy


def blobs(n: int, d: int, classes: int, seed: int, spread: float = 1.5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64) * spread
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def fit_lbfgs(model: nn.Module, x: Tensor, y: Tensor, wd: float, weights: Tensor | None = None,
              iters: int = 200, loss: Callable[..., Tensor] = CE) -> nn.Module:
    """Minimise ``sum_i w_i loss_i / n + wd/2 |theta|^2`` (``w`` = 1 by default) with L-BFGS, in place."""
    n = x.shape[0]
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        per = loss(model(x), y, reduction="none")
        value = (w * per).sum() / n + wd / 2 * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    for p in model.parameters():
        p.grad = None
    return model


def logreg_problem(n: int = 60, d: int = 4, classes: int = 3, seed: int = 0, wd: float = 0.05):
    torch.manual_seed(seed)
    x, y = blobs(n + 20, d, classes, seed)
    model = nn.Linear(d, classes).double()
    fit_lbfgs(model, x[:n], y[:n], wd)
    return model.eval(), (x[:n], y[:n]), (x[n:], y[n:]), wd


def mlp_problem(n: int = 24, seed: int = 1):
    torch.manual_seed(seed)
    x, y = blobs(n + 6, 4, 3, seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    fit_lbfgs(model, x[:n], y[:n], 0.01, iters=50)
    return model.eval(), (x[:n], y[:n]), (x[n:], y[n:])


def loop_grads(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor,
               names: list[str] | None = None) -> Tensor:
    """``(n, D)`` per-example gradients, one ``torch.autograd.grad`` per example (model parameter order)."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    rows = []
    for i in range(x.shape[0]):
        value = loss(model(x[i:i + 1]), y[i:i + 1])
        g = torch.autograd.grad(value, [params[k] for k in names])
        rows.append(torch.cat([t.reshape(-1) for t in g]).detach())
    return torch.stack(rows)


def dense_curvature(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Dense Hessian of the mean loss w.r.t. all parameters (flat, model order)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(theta: Tensor) -> Tensor:
        parts = torch.split(theta, sizes)
        state = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes)}
        return loss(functional_call(model, state, (x,)), y)

    return torch.autograd.functional.hessian(f, theta0)
