"""Slow, obviously-correct twins of the engine's primitives, used as test oracles.

Nothing here imports gradsense: every quantity is computed the plain way, with ``torch.autograd``
on the module itself or on a flat parameter vector through ``torch.func.functional_call``, one
example or one coordinate at a time. Use them on tiny float64 problems only.

- :func:`finite_difference_grad`: central differences, one coordinate at a time.
- :func:`per_example_loop_grads`: a Python loop of ``torch.autograd.grad`` on batches of one.
- :func:`full_batch_grad`: ``torch.autograd.grad`` of the batch loss.
- :func:`dense_hessian`: ``torch.autograd.functional.hessian`` of the loss of a flat parameter vector.
- :func:`dense_ggn`: ``J^T H_out J`` from ``torch.autograd.functional.jacobian``/``hessian``.
- :func:`dense_empirical_fisher`: ``mean_i g_i g_i^T`` from the per-example loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "dense_empirical_fisher",
    "dense_ggn",
    "dense_hessian",
    "finite_difference_grad",
    "full_batch_grad",
    "param_names",
    "per_example_loop_grads",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def finite_difference_grad(f: Callable[[Tensor], Tensor], x: Tensor, eps: float = 1e-6) -> Tensor:
    """Gradient of the scalar ``f(x)`` by central differences ``(f(x + eps e_i) - f(x - eps e_i)) / 2 eps``.

    ``x`` must be float64 (float32 central differences are too noisy to be an oracle).
    """
    if x.dtype != torch.float64:
        raise TypeError(f"finite_difference_grad needs float64 inputs, got {x.dtype}")
    base = x.detach().clone()
    out = torch.zeros_like(base)
    flat_out = out.view(-1)
    with torch.no_grad():
        for i in range(base.numel()):
            plus, minus = base.clone(), base.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            flat_out[i] = (f(plus).reshape(()) - f(minus).reshape(())) / (2 * eps)
    return out


def param_names(model: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to differentiate (all of them by default), in the model's order."""
    names = [n for n, _ in model.named_parameters()]
    if params is None:
        return names
    unknown = set(params) - set(names)
    if unknown:
        raise KeyError(f"unknown parameters {sorted(unknown)}")
    return [n for n in names if n in set(params)]


def per_example_loop_grads(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """``{name: (N, *shape)}``: ``d loss_fn(model(x[i:i+1]), y[i:i+1]) / d param`` for each ``i``, one at a time."""
    names = param_names(model, params)
    named = dict(model.named_parameters())
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [named[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            rows[n].append(torch.zeros_like(named[n]) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in rows.items()}


def full_batch_grad(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """``d loss_fn(model(x), y) / d param`` with plain autograd on the whole batch."""
    names = param_names(model, params)
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), [named[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(named[n]) if g is None else g.detach() for n, g in zip(names, grads)}


def _flat_function(
    model: nn.Module, names: list[str]
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    named = dict(model.named_parameters())
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def split(theta: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}

    return theta0, split


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> Tensor:
    """The ``(P, P)`` Hessian of ``loss_fn(model(x), y)`` w.r.t. the flattened parameters (model order)."""
    names = param_names(model, params)
    theta0, split = _flat_function(model, names)

    def f(theta: Tensor) -> Tensor:
        return loss_fn(functional_call(model, split(theta), (x,)), y)

    return torch.autograd.functional.hessian(f, theta0)


def dense_ggn(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> Tensor:
    """Generalised Gauss-Newton ``J^T H_out J`` of ``loss_fn(model(x), y)``.

    ``J`` is the Jacobian of the flattened batch output w.r.t. the flat parameters and ``H_out`` the
    Hessian of the loss w.r.t. the flattened batch output, both dense.
    """
    names = param_names(model, params)
    theta0, split = _flat_function(model, names)
    with torch.no_grad():
        out0 = model(x)

    def outputs(theta: Tensor) -> Tensor:
        return functional_call(model, split(theta), (x,)).reshape(-1)

    def loss_of_output(z: Tensor) -> Tensor:
        return loss_fn(z.reshape(out0.shape), y)

    jac = torch.autograd.functional.jacobian(outputs, theta0)  # (N*C, P)
    h_out = torch.autograd.functional.hessian(loss_of_output, out0.reshape(-1))  # (N*C, N*C)
    return jac.T @ h_out @ jac


def dense_empirical_fisher(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[str] | None = None
) -> Tensor:
    """Empirical Fisher ``(1/N) sum_i g_i g_i^T`` with ``g_i`` from :func:`per_example_loop_grads`."""
    grads = per_example_loop_grads(model, loss_fn, x, y, params)
    g = torch.cat([v.reshape(v.shape[0], -1) for v in grads.values()], dim=1)  # (N, P)
    return g.T @ g / g.shape[0]
