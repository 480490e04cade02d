"""Predicted vs actual change: how far does a gradient-based estimate describe the model?

A gradient map ``g`` (the exact input gradient, or any estimate of it: a SmoothGrad map, a zeroth-order
estimate) predicts the change of the output under a perturbation ``delta = r u`` (``u`` a unit direction) to
first order, ``r g . u``; with the curvature (an exact Hessian-vector product, forward-over-reverse) to second
order, ``r g . u + r^2 u^T H u / 2``. Both are compared with the actual change ``f(x + r u) - f(x)`` over a
geometric grid of radii, and for each example we report the radius at which the relative error
``sum_u |predicted - actual| / sum_u |actual|`` first passes ``tol`` (10% by default). This answers the
concern behind "Gradient-Normalized Smoothness" and PQI (Taylor estimates can be far off) with a number per
example: the radius up to which a gradient explanation is a faithful local account.

Radii x directions x examples are a batch dimension: all forwards run in chunks under the memory budget,
and the Hessian-vector products are one ``jvp(grad(f))`` per chunk of (direction, example) rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.batching import chunks
from gradsense.core.checks import check_eval_mode
from gradsense.core.functional import preserve_model
from gradsense.core.grad import input_gradients
from gradsense.core.targets import Batch, TargetLike
from gradsense.evaluation.base import (
    build_result,
    check_attributions,
    check_count,
    check_number,
    generator,
    prepare,
    register_metric,
    resolve_target,
    rows_per_chunk,
    score_rows,
)
from gradsense.results.evaluation import TaylorResult

__all__ = ["taylor"]

TAYLOR = ("first/second-order Taylor prediction vs the actual change; motivated by Gradient-Normalized "
          "Smoothness and PQI (Taylor estimates can be far off)")


def _relative_error(pred: Tensor, actual: Tensor) -> Tensor:
    """``sum_d |pred - actual| / sum_d |actual|`` over dim 1 of ``(R, D, N)`` -> ``(N, R)``."""
    num = (pred - actual).abs().sum(1)
    den = actual.abs().sum(1)
    err = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                      torch.where(num > 0, torch.full_like(num, float("inf")), torch.zeros_like(num)))
    return err.T.contiguous()


def _first_pass(err: Tensor, radii: Tensor, tol: float) -> Tensor:
    """The first radius where ``err > tol`` for each row of ``err`` ``(N, R)``; ``inf`` if none."""
    over = err > tol
    first = torch.where(over.any(1), over.float().argmax(1), torch.full((err.shape[0],), -1, device=err.device))
    out = torch.full((err.shape[0],), float("inf"), dtype=torch.float64)
    hit = first >= 0
    out[hit.cpu()] = radii.double().cpu()[first[hit].cpu()]
    return out


@register_metric("taylor", "predicted_vs_actual")
def taylor(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    radii: Tensor | list[float] | None = None,
    relative: bool = True,
    n_directions: int = 8,
    directions: Tensor | None = None,
    order: int = 2,
    tol: float = 0.1,
    seed: int | None = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
) -> TaylorResult:
    """Radius up to which the first- (and second-) order prediction of the output change holds within ``tol``.

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        attributions: The gradient estimate to test, shaped like the inputs (e.g. a Saliency or SmoothGrad
            map, an AttributionResult), or ``None`` for the exact input gradient.
        target: The scalar whose change is predicted.
        radii: Increasing perturbation norms (default ``logspace(-3, 0, 13)``).
        relative: Radii are relative to each example's norm ``||x||`` (absolute input units if False).
        n_directions: Random unit directions per example and radius.
        directions: Explicit directions ``(n_directions, N, ...)`` instead of random ones (each is scaled to
            unit norm).
        order: ``1`` (gradient only) or ``2`` (also the curvature term, by Hessian-vector products).
        tol: Relative error that counts as "passed".
        seed: Seed of the directions.
        chunk_size, max_memory: Memory knobs.
        forward: How to run the model on a batch.
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.TaylorResult`: ``values`` = ``radius_order1`` per example, ``radius_order2``,
        ``error_order1``/``error_order2`` ``(N, R)``, ``radii``.

    Raises:
        ValueError: ``n_directions < 1``, ``order`` not 1 or 2, radii not positive and increasing, bad
            attributions, BatchNorm/Dropout in train mode (the model must be one deterministic function), before
            any work.
    """
    model, inputs = prepare(model, inputs, "taylor", chunk_size, max_memory)
    # the expansion is compared with the function itself: it must be one deterministic function of x
    check_eval_mode(model, "taylor")
    g_given = check_attributions(attributions, inputs, required=False)
    d = check_count(n_directions, "n_directions")
    if directions is not None:
        if not isinstance(directions, Tensor) or directions.ndim != inputs.ndim + 1 or \
                tuple(directions.shape[1:]) != tuple(inputs.shape):
            got = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
            raise ValueError(f"directions must have shape (n_directions, *inputs.shape) = (D, {', '.join(map(str, inputs.shape))}), got {got}.")
        if not bool(torch.isfinite(directions).all()) or bool((directions.reshape(directions.shape[0], inputs.shape[0], -1).abs().sum(-1) == 0).any()):
            raise ValueError("directions must be finite and non-zero.")
        d = directions.shape[0]
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2, got {order!r}.")
    check_number(tol, "tol")
    r = torch.logspace(-3, 0, 13, dtype=torch.float64) if radii is None else torch.as_tensor(radii, dtype=torch.float64)
    if r.ndim != 1 or r.numel() == 0 or not bool(torch.isfinite(r).all()) or bool((r <= 0).any()) or \
            bool((r[1:] <= r[:-1]).any()):
        raise ValueError(f"radii must be a non-empty increasing list of positive numbers, got {r.tolist()}.")
    t0 = time.perf_counter()
    x = inputs.detach()
    n = x.shape[0]
    gen = generator(seed)
    if directions is None:
        u = torch.randn((d, *x.shape), generator=gen, dtype=x.dtype).to(x.device)
    else:
        u = directions.detach().to(x.device, x.dtype)
    u = u / torch.linalg.vector_norm(u.reshape(d, n, -1), dim=2).reshape(d, n, *([1] * (x.ndim - 1)))
    scale = torch.linalg.vector_norm(x.reshape(n, -1), dim=1) if relative else torch.ones(n, dtype=x.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(x.dtype)
    r_abs = r.to(x.device, x.dtype)[:, None] * scale[None, :]  # (R, N)
    n_r = r.numel()
    run = forward or model
    with preserve_model(model):
        resolved = resolve_target(model, x, target, forward)
        if g_given is None:
            g, _ = input_gradients(model, x, resolved, forward=forward, chunk_size=chunk_size, max_memory=max_memory)
        else:
            g = torch.broadcast_to(g_given, x.shape)
        chunk = rows_per_chunk(model, x, chunk_size=chunk_size, max_memory=max_memory, total=n_r * d * n,
                               forward=forward)
        ex = torch.arange(n, device=x.device)
        f_x = score_rows(model, lambda sl: x[sl], n, resolved, ex, chunk=chunk, forward=forward)
        # row (ri, di, i) -> x_i + r_abs[ri, i] * u[di, i]; radius-major, then direction, then example
        ri = torch.arange(n_r, device=x.device).repeat_interleave(d * n)
        di = torch.arange(d, device=x.device).repeat_interleave(n).repeat(n_r)
        ii = ex.repeat(n_r * d)

        def make_rows(sl: slice) -> Tensor:
            step = r_abs[ri[sl], ii[sl]].reshape(-1, *([1] * (x.ndim - 1)))
            return x[ii[sl]] + step * u[di[sl], ii[sl]]

        f_pert = score_rows(model, make_rows, n_r * d * n, resolved, ii, chunk=chunk, forward=forward,
                            show_progress=show_progress, desc="taylor: perturbed forwards")
        curv = None
        if order == 2:
            curv = torch.empty(d * n, dtype=x.dtype, device=x.device)
            hchunk = rows_per_chunk(model, x, chunk_size=chunk_size, max_memory=max_memory, total=d * n,
                                    forward=forward, factor=4.0)
            xr, ur = x.repeat(d, *([1] * (x.ndim - 1))), u.reshape(d * n, *x.shape[1:])
            idx_rows = ex.repeat(d)
            for sl in chunks(d * n, hchunk):
                idx = idx_rows[sl]

                def total(z: Tensor, idx: Tensor = idx) -> Tensor:
                    return resolved(run(z), Batch(inputs=z, index=idx)).sum()

                with torch.enable_grad():
                    _, hu = torch.func.jvp(torch.func.grad(total), (xr[sl],), (ur[sl],))
                curv[sl] = (hu.detach() * ur[sl]).reshape(hu.shape[0], -1).sum(1)
    actual = f_pert.reshape(n_r, d, n) - f_x[None, None, :]
    slope = (g[None] * u).reshape(d, n, -1).sum(-1)  # (D, N): g . u
    pred1 = r_abs[:, None, :] * slope[None]
    err1 = _relative_error(pred1, actual)
    tensors = {"radii": r, "error_order1": err1, "f_x": f_x}
    tensors["radius_order1"] = _first_pass(err1, r, tol)
    if curv is not None:
        pred2 = pred1 + 0.5 * r_abs[:, None, :] ** 2 * curv.reshape(d, n)[None]
        err2 = _relative_error(pred2, actual)
        tensors["error_order2"] = err2
        tensors["radius_order2"] = _first_pass(err2, r, tol)
    tensors["values"] = tensors["radius_order1"]
    settings = {"n_directions": d, "order": order, "tol": tol, "relative": relative,
                "gradient": "exact" if g_given is None else "given"}
    return build_result(
        TaylorResult, tensors, metric="taylor", model=model, settings=settings, higher_is_better=True,
        reference=TAYLOR, t0=t0, seed=seed, target=resolved.describe(),
        explained=getattr(attributions, "method", None) if attributions is not None else "exact gradient",
    )
