"""Taylor scores: the loss change of removing a weight, to first and second order.

Removing weight ``k`` moves it by ``delta_k = -w_k``; with ``g = grad L`` (the mean loss gradient over the
calibration data) and ``H`` the Hessian, Taylor's theorem gives

    Delta L_k = -g_k w_k + 1/2 H_kk w_k^2 + O(w_k^3).

- ``taylor``: first order, ``s_k = |g_k w_k|``, summed over a structure (Ma, Fang & Wang 2023, "LLM-Pruner: On
  the Structural Pruning of Large Language Models", element-wise importance with sum aggregation; Molchanov et
  al. 2019, "Importance Estimation for Neural Network Pruning"). One gradient pass over the data.
- ``taylor2``: LLM-Pruner's second-order variant ``s_k = |g_k w_k - 1/2 F_kk w_k^2|`` with the Hessian diagonal
  replaced by the empirical Fisher diagonal ``F_kk = (1/N) sum_n (d l_n / d w_k)^2`` (per-example gradients under
  ``vmap``).
- ``fisher``: the diagonal-Fisher (optimal-brain-damage) saliency ``s_k = 1/2 F_kk w_k^2`` (LeCun, Denker &
  Solla 1990 with ``H ~ F``; Theis et al. 2018, "Faster gaze prediction with dense networks and Fisher
  pruning"), summed over a structure.

The Fisher-based scores also record each tensor's Fisher trace ``Tr(F_l)`` for bit allocation.
"""

from __future__ import annotations

from typing import Any

from gradsense.importance.engine import Context, MethodOutput, aggregate
from gradsense.importance.structures import UnitGroup

__all__ = ["fisher", "taylor", "taylor2"]


def _traces(fisher: dict) -> dict:
    return {f"curvature/{k}": v.sum().double() for k, v in fisher.items()}


def taylor(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """First-order Taylor ``s_k = |g_k w_k|`` (LLM-Pruner), summed over a structure."""
    g = ctx.mean_grad()
    return MethodOutput(aggregate({k: (g[k] * w).abs() for k, w in ctx.params.items()}, granularity, groups))


def taylor2(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """Second-order Taylor with the Fisher diagonal, ``s_k = |g_k w_k - 1/2 F_kk w_k^2|`` (LLM-Pruner)."""
    g, f = ctx.per_example_stats()
    el = {k: (g[k] * w - 0.5 * f[k] * w * w).abs() for k, w in ctx.params.items()}
    return MethodOutput(aggregate(el, granularity, groups), tensors=_traces(f), meta={"curvature": "fisher"})


def fisher(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """Diagonal-Fisher saliency ``s_k = 1/2 F_kk w_k^2`` (optimal brain damage with the Fisher)."""
    _, f = ctx.per_example_stats()
    el = {k: 0.5 * f[k] * w * w for k, w in ctx.params.items()}
    return MethodOutput(aggregate(el, granularity, groups), tensors=_traces(f), meta={"curvature": "fisher"})
