"""Post-quantisation integral (PQI): which weights' quantisation costs loss, by integrating the gradient.

After "Identifying Sensitive Weights via Post-quantization Integral" (Yu et al. 2025): the loss change of
quantising ``W`` to ``Q(W)`` is exactly the path integral of the gradient along the straight line,

    L(Q(W)) - L(W) = sum_k Delta_k * int_0^1 g_k(W + t Delta) dt,       Delta = Q(W) - W,

so ``s_k = |Delta_k * int_0^1 g_k(W + t Delta) dt|`` is each weight's share of the real loss change; the Taylor
estimate ``|Delta_k g_k(W)|`` uses the gradient at ``t = 0`` only and misses the curvature along the path. The
integral is the trapezoid rule on ``steps`` intervals; the ``steps + 1`` gradients are a batch dimension
(``vmap`` over the path points). ``Q`` is :func:`gradsense.importance.bits.quantize` at ``bits``. The result's
meta holds the measured ``L(Q(W)) - L(W)``, the integral's total (equal to it up to the quadrature error) and the
Taylor total ``g . Delta``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from gradsense.core.distributed import all_reduce_sum
from gradsense.core.zeroth import vmap_failure
from gradsense.importance.bits import check_bits, quantize
from gradsense.importance.engine import Context, MethodOutput, aggregate
from gradsense.importance.structures import UnitGroup

__all__ = ["check_pqi", "pqi"]


def check_pqi(options: dict[str, Any]) -> None:
    """Raise before any work on bad ``bits``/``steps``."""
    check_bits(options.get("bits", 4))
    steps = options.get("steps", 8)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")


def pqi(ctx: Context, granularity: str, groups: list[UnitGroup], *, bits: int = 4, steps: int = 8,
        **_: Any) -> MethodOutput:
    """PQI scores (see the module docstring)."""
    params = ctx.params
    delta = {k: quantize(w, bits) - w for k, w in params.items()}
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    c = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
    c[0] = c[-1] = 0.5 / steps
    fm, loss_fn = ctx.fm, ctx.loss_fn

    def batch_loss(p: dict[str, Tensor], x: Tensor, y: Any) -> Tensor:
        return loss_fn(fm(p, x), y)

    g_fn = grad(batch_loss)
    batched = vmap(g_fn, in_dims=(0, None, None))
    points = {k: params[k].unsqueeze(0) + t.to(params[k].dtype).reshape(-1, *[1] * params[k].ndim) * delta[k].unsqueeze(0)
              for k in params}
    acc = {k: torch.zeros((steps + 1, *v.shape), dtype=v.dtype, device=v.device) for k, v in params.items()}
    seen = 0.0
    use_vmap = True
    for x, y in ctx.batches():
        if use_vmap:
            try:
                g = batched(points, x, y)
            except (RuntimeError, NotImplementedError) as err:
                if not vmap_failure(err):
                    raise
                warnings.warn(f"gradients along the path under vmap failed ({type(err).__name__}: {str(err)[:100]}); "
                              "computing one point at a time.", RuntimeWarning, stacklevel=2)
                use_vmap = False
        if not use_vmap:
            rows = [g_fn({k: v[i] for k, v in points.items()}, x, y) for i in range(steps + 1)]
            g = {k: torch.stack([r[k] for r in rows]) for k in params}
        for k in acc:
            acc[k].add_(g[k].detach(), alpha=float(x.shape[0]))
        seen += x.shape[0]
        ctx.n_grad_batches += steps + 1
    seen = float(all_reduce_sum(torch.tensor(seen, dtype=torch.float64)))  # all ranks' examples and sums
    acc = {k: all_reduce_sum(v) for k, v in acc.items()}
    integral = {k: torch.einsum("s,s...->...", c.to(v.dtype), v / seen) for k, v in acc.items()}
    g0 = {k: v[0] / seen for k, v in acc.items()}
    el = {k: (delta[k] * integral[k]).abs() for k in params}
    quantised = {k: params[k] + delta[k] for k in params}
    measured = float(ctx.loss(quantised) - ctx.loss())
    meta = {
        "bits": bits,
        "steps": steps,
        "loss_change": measured,
        "integral": float(sum(float((delta[k] * integral[k]).sum()) for k in params)),
        "taylor": float(sum(float((delta[k] * g0[k]).sum()) for k in params)),
    }
    tensors = {f"taylor_score/{k}": (delta[k] * g0[k]).abs() for k in params}
    return MethodOutput(aggregate(el, granularity, groups), tensors=tensors, meta=meta)
