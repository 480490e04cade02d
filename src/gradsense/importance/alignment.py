"""Importance for one data set that does not hurt another: Fisher and gradient alignment (GAPrune).

After Tang & Yang 2025, "GAPrune: Gradient-Alignment Pruning for Domain-Aware Embeddings": a parameter matters if
it is important for the *domain* data (its Fisher information there) and if moving it serves the domain and the
*general* data alike (their gradients agree). With ``F^d``, ``F^g`` the empirical Fisher diagonals and
``g^d``, ``g^g`` the mean gradients on the domain (``data``) and general (``reference=``) sets:

    a_k = g^d_k g^g_k / (sqrt(F^d_k F^g_k) + eps)           in [-1, 1] (the mean gradients in units of their RMS)
    s_k = 1/2 F^d_k w_k^2 * max(0, 1 + gamma * a_k)

so a weight whose domain and general gradients point the same way gains importance, and one whose gradients
conflict loses it (``gamma = 0`` is the plain domain Fisher score). The paper's Domain-Alignment Importance
combines the same two signals; this is our exact, documented form of it.
"""

from __future__ import annotations

from typing import Any

import torch

from gradsense.core.distributed import DataLike
from gradsense.importance.engine import Context, MethodOutput, aggregate, data_size
from gradsense.importance.structures import UnitGroup

__all__ = ["gaprune"]


def gaprune(ctx: Context, granularity: str, groups: list[UnitGroup], *, reference: DataLike = None,
            gamma: float = 1.0, **_: Any) -> MethodOutput:
    """GAPrune-style domain-alignment importance (see the module docstring).

    Args:
        reference: The general data set (required), in any form ``data`` accepts.
        gamma: Weight of the alignment term (default 1).
    """
    gd, fd = ctx.per_example_stats()
    other = Context(ctx.model, ctx.loss_fn, reference, ctx.names, batch_size=ctx.batch_size,
                    max_memory=ctx.max_memory, chunk_size=ctx.chunk_size)
    gg, fg = other.per_example_stats()
    ctx.n_example_grads += other.n_example_grads
    el, align = {}, {}
    for k, w in ctx.params.items():
        a = gd[k] * gg[k] / (torch.sqrt(fd[k] * fg[k]) + torch.finfo(w.dtype).tiny)
        align[k] = a
        el[k] = 0.5 * fd[k] * w * w * torch.clamp(1 + gamma * a, min=0)
    mean_align = float(sum(float(a.sum()) for a in align.values()) / max(sum(a.numel() for a in align.values()), 1))
    return MethodOutput(aggregate(el, granularity, groups),
                        tensors={f"curvature/{k}": v.sum().double() for k, v in fd.items()},
                        meta={"curvature": "fisher", "mean_alignment": mean_align})


def check_gaprune(options: dict[str, Any]) -> None:
    """Raise before any work unless ``reference=`` data and a valid ``gamma`` are given."""
    if options.get("reference") is None:
        raise ValueError(
            "method='gaprune' compares two data sets: pass reference= (the general data) next to data (the domain data)."
        )
    data_size(options["reference"])
    gamma = options.get("gamma", 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}.")
