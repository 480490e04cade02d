"""Zeroth-order global importance to set per-layer sparsity, then local pruning (ECoFLaP).

Sung, Yoon, Zhang & Bansal 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-wise Pruning for Vision-Language
Models". Coarse step: a *global* importance from forward passes only - the zeroth-order gradient estimate
``g_hat`` (:func:`gradsense.core.zeroth.zeroth_order_grad`, central differences along ``probes`` Gaussian
directions) - gives each layer ``l`` the score ``I_l = sum_{k in l} |g_hat_k w_k|``. Fine step: within each layer
the weights are ranked by the local Wanda score ``|W_ij| * ||X_j||``.

Layer sparsities (``result.prune(s, scope="layer")``): the sparsity each layer would get if the weights were
pruned globally by ``|g_hat_k w_k|``, kept within ``[s - lam, s + lam]`` (ECoFLaP's bound on how far a layer's
ratio may move from the target), then shifted by a common offset so that exactly ``round(s * n)`` weights go.
Everything here is forward passes: no backward pass at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsense.core.batching import chunk_size_for, estimate_example_bytes
from gradsense.core.distributed import all_reduce_sum
from gradsense.core.zeroth import zeroth_order_grad
from gradsense.importance.engine import Context, MethodOutput, aggregate
from gradsense.importance.structures import UnitGroup, layer_of

__all__ = ["check_ecoflap", "ecoflap"]


def check_ecoflap(options: dict[str, Any]) -> None:
    """Raise before any work on bad ``probes``/``mu``/``lam``."""
    probes = options.get("probes", 32)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}.")
    mu = options.get("mu", 1e-3)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu > 0:
        raise ValueError(f"mu must be a positive number, got {mu!r}.")
    lam = options.get("lam", 0.2)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ValueError(f"lam must be a number in [0, 1], got {lam!r}.")


def ecoflap(ctx: Context, granularity: str, groups: list[UnitGroup], *, probes: int = 32, mu: float = 1e-3,
            lam: float = 0.2, seed: int = 0, **_: Any) -> MethodOutput:
    """ECoFLaP coarse-to-fine importance (see the module docstring)."""
    batches = ctx.batches()
    fm, loss_fn = ctx.fm, ctx.loss_fn
    # the mean over all ranks' examples: each rank's mean_loss is its share, so the estimates add up over ranks
    total = float(all_reduce_sum(torch.tensor(float(sum(x.shape[0] for x, _ in batches)), dtype=torch.float64)))

    def mean_loss(p: dict[str, Tensor]) -> Tensor:
        acc = None
        for x, y in batches:
            v = loss_fn(fm(p, x), y) * (x.shape[0] / total)
            acc = v if acc is None else acc + v
        return acc  # type: ignore[return-value]

    x0 = batches[0][0]
    try:
        per_probe = estimate_example_bytes(ctx.model, x0[:1], forward=lambda r: fm(ctx.params, r), factor=1.0)
        per_probe = per_probe * max(int(x.shape[0]) for x, _ in batches) + 3 * x0.element_size() * ctx.fm.numel
    except Exception:
        per_probe = 64 * 1024**2
    chunk = chunk_size_for(per_probe, max_memory=ctx.max_memory, total=probes, device=x0.device)
    est = zeroth_order_grad(mean_loss, ctx.params, probes=probes, mu=mu, seed=int(seed), chunk_size=chunk)
    ctx.n_forward_batches += est.n_forward * len(batches)
    zo_grad = {k: all_reduce_sum(est.grad[k].clone()) for k in ctx.params}
    global_scores = {k: (zo_grad[k] * w).abs() for k, w in ctx.params.items()}
    tensors = {f"zo_importance/{k}": v.sum().reshape(()) for k, v in global_scores.items()}
    meta = {"probes": probes, "mu": mu, "lam": lam, "n_forward": est.n_forward, "layer_allocation": "ecoflap"}
    if granularity == "layer":
        out: dict[str, Tensor] = {}
        for k, v in global_scores.items():
            out[layer_of(k)] = out[layer_of(k)] + v.sum() if layer_of(k) in out else v.sum()
        return MethodOutput(out, tensors=tensors, meta=meta)
    norms = ctx.input_norms()
    local = {k: w.abs() * norms[k] for k, w in ctx.params.items()}
    for k, v in global_scores.items():
        tensors[f"zo_score/{k}"] = v
    return MethodOutput(aggregate(local, granularity, groups), tensors=tensors, meta=meta)
