"""Hessian-aware scores: the second-order loss change of removing a weight or a structure, with Hutch++ traces.

For a structure ``S`` (a weight, a channel, a head, a layer) with weights ``w_S``, removing it changes the loss by

    Delta L_S = -<g_S, w_S> + 1/2 w_S^T H_SS w_S + O(|w_S|^3).

The Hessian block is replaced by its average diagonal, ``H_SS ~ Tr(H_SS)/n_S * I`` (Yu, Zhou, Zhang et al. 2022,
"Hessian-Aware Pruning and Optimal Neural Implant", whose structure saliency at a minimum is
``Tr(H_S)/n_S * ||w_S||^2``; Dong et al. 2020, "HAWQ-V2", for layers):

    s_S = | -<g_S, w_S> + 1/2 Tr(H_SS)/n_S * ||w_S||^2 |

which for a single weight is the exact second-order change ``|-g_k w_k + 1/2 H_kk w_k^2|``.

- channels, heads, layers: ``Tr(H_SS)`` of every structure from one adaptive Hutch++ run
  (:func:`gradsense.curvature.hutchpp`; Meyer et al. 2021) over vmap-batched Hessian-vector products, stopping
  when the total's standard error is ``rtol`` of it; each structure's standard error is reported.
- weights: the Hessian diagonal by Hutchinson's estimator ``diag(H) = E[z * Hz]`` (Bekas, Kokiopoulou & Saad
  2007) with ``probes`` Rademacher vectors, or exactly (``probes="exact"``: one product per coordinate, for
  models of at most 5000 selected parameters).

Every run also records ``Tr(H_l)`` of each selected tensor for HAWQ-V2 bit allocation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradsense.curvature import RowProducts, hutchpp, operator
from gradsense.curvature.hutchpp import rademacher
from gradsense.importance.engine import Context, MethodOutput
from gradsense.importance.structures import UnitGroup, layer_of, unit_index

__all__ = ["check_hessian", "hessian"]


def check_hessian(options: dict[str, Any]) -> None:
    """Raise before any work on bad ``probes``/``rtol``/``max_hvp``."""
    probes = options.get("probes", 32)
    if probes != "exact" and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 2):
        raise ValueError(f"probes must be an int >= 2 or 'exact', got {probes!r}.")
    rtol = options.get("rtol", 0.01)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol must be a positive number, got {rtol!r}.")
    max_hvp = options.get("max_hvp", 2000)
    if isinstance(max_hvp, bool) or not isinstance(max_hvp, int) or max_hvp < 2:
        raise ValueError(f"max_hvp must be an int >= 2, got {max_hvp!r}.")


def _offsets(params: dict[str, Tensor]) -> dict[str, tuple[int, int]]:
    out, pos = {}, 0
    for n, p in params.items():
        out[n] = (pos, pos + p.numel())
        pos += p.numel()
    return out


def hessian(ctx: Context, granularity: str, groups: list[UnitGroup], *, probes: int | str = 32, rtol: float = 0.01,
            max_hvp: int = 2000, seed: int = 0, **_: Any) -> MethodOutput:
    """Hessian-aware saliency (see the module docstring)."""
    op = operator(ctx.model, ctx.loss_fn, ctx.data, params=ctx.names, batch_size=ctx.batch_size,
                  max_memory=ctx.max_memory)
    products = RowProducts(op)  # half of the budget for the products, from the operator
    g = ctx.mean_grad()
    params = dict(op.params)
    offsets = _offsets(params)
    n = op.numel
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"curvature": "hessian"}
    try:
        if granularity == "weight":
            if probes == "exact":
                if n > 5000:
                    raise ValueError(f"probes='exact' needs one Hessian-vector product per parameter; {n} selected "
                                     "parameters are too many (at most 5000). Use an int number of probes.")
                sums = torch.zeros(n, dtype=torch.float64)
                for start in range(0, n, 64):
                    rows = torch.eye(n, dtype=op.dtype, device=op.device)[start : start + 64]
                    sums[start : start + rows.shape[0]] = (rows * products(rows)).sum(1).double().cpu()
                diag, se = sums, torch.zeros(n, dtype=torch.float64)
                samples = None
            else:
                gen = torch.Generator().manual_seed(int(seed))
                acc = torch.zeros(n, dtype=torch.float64)
                acc2 = torch.zeros(n, dtype=torch.float64)
                per_param: list[Tensor] = []
                for start in range(0, probes, 8):
                    z = rademacher(min(8, probes - start), n, gen, op.dtype, op.device)
                    d = (z * products(z)).double().cpu()
                    acc += d.sum(0)
                    acc2 += (d * d).sum(0)
                    per_param.append(torch.stack([d[:, a:b].sum(1) for a, b in offsets.values()], dim=1))
                diag = acc / probes
                se = torch.sqrt(torch.clamp(acc2 / probes - diag**2, min=0) * probes / (probes - 1) / probes)
                samples = torch.cat(per_param)  # (probes, n_params): per-tensor trace samples
            el = {}
            for i, (k, (a, b)) in enumerate(offsets.items()):
                w = params[k]
                dk = diag[a:b].reshape(w.shape).to(w.dtype)
                el[k] = (-g[k] * w + 0.5 * dk * w * w).abs()
                tensors[f"hdiag/{k}"] = dk
                tensors[f"hdiag_stderr/{k}"] = se[a:b].reshape(w.shape).to(w.dtype)
                tensors[f"curvature/{k}"] = diag[a:b].sum()
                if samples is not None:
                    tensors[f"curvature_stderr/{k}"] = samples[:, i].std(correction=1) / math.sqrt(probes)
                else:
                    tensors[f"curvature_stderr/{k}"] = torch.zeros((), dtype=torch.float64)
            meta.update(n_hvp=products.n_hvp, probes=probes)
            return MethodOutput(el, tensors=tensors, meta=meta)

        # structures: one Hutch++ run for all of them, plus every tensor (for bits)
        if granularity in ("channel", "head"):
            struct_idx = unit_index(groups, offsets, {k: v.shape for k, v in params.items()})
            keys = [(grp.name, grp.size) for grp in groups]
        else:
            layers: dict[str, list[str]] = {}
            for k in params:
                layers.setdefault(layer_of(k), []).append(k)
            struct_idx = [torch.cat([torch.arange(*offsets[k]) for k in members]) for members in layers.values()]
            keys = [(name, 1) for name in layers]
        param_idx = [torch.arange(a, b) for a, b in offsets.values()]
        est = hutchpp(products, n, rtol=rtol, max_matvec=max_hvp, groups=[i.to(op.device) for i in struct_idx + param_idx],
                      seed=int(seed), dtype=op.dtype, device=op.device)
        flat_w = torch.cat([p.reshape(-1) for p in params.values()]).double()
        flat_g = torch.cat([g[k].reshape(-1) for k in params]).double()
        traces, errs = est.group_values, est.group_stderr
        scores: dict[str, Tensor] = {}
        pos = 0
        dtype = next(iter(params.values())).dtype
        for name, size in keys:
            vals, tr, tse = [], [], []
            for _ in range(size):
                idx = struct_idx[pos].cpu()
                w, gg = flat_w[idx], flat_g[idx]
                t = float(traces[pos])
                vals.append(abs(float(-(gg * w).sum()) + 0.5 * t / max(idx.numel(), 1) * float((w * w).sum())))
                tr.append(t)
                tse.append(float(errs[pos]))
                pos += 1
            shape = (size,) if granularity != "layer" else ()
            scores[name] = torch.tensor(vals, dtype=dtype).reshape(shape)
            tensors[f"trace/{name}"] = torch.tensor(tr, dtype=torch.float64).reshape(shape)
            tensors[f"trace_stderr/{name}"] = torch.tensor(tse, dtype=torch.float64).reshape(shape)
        for j, k in enumerate(params):
            tensors[f"curvature/{k}"] = traces[len(struct_idx) + j].reshape(())
            tensors[f"curvature_stderr/{k}"] = errs[len(struct_idx) + j].reshape(())
        meta.update(n_hvp=products.n_hvp, converged=est.converged, rank=est.rank, trace=est.value,
                    trace_stderr=est.stderr, rtol=rtol)
        return MethodOutput(scores, tensors=tensors, meta=meta)
    finally:
        products.release()
