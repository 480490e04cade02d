"""Scores from weights, activations and gradients: GBLM-Pruner and Wanda.

- ``gblm`` (Das, Ma & Shen 2023, "Beyond Size: How Gradients Shape Pruning Decisions in Large Language
  Models"): ``s_ij = |W_ij| * (||X_j|| + alpha * ||G_ij||)``, with ``||X_j||`` the norm of input feature ``j`` over
  the calibration tokens and ``||G_ij||`` the l2 norm of the per-example gradients of ``W_ij`` over the calibration
  samples. Both are normalised by the number of samples here - ``||X_j|| = sqrt((1/N) sum_{n,t} x_{ntj}^2)`` and
  ``||G_ij|| = sqrt((1/N) sum_n g_{n,ij}^2) = sqrt(F_ij)`` - so that ``alpha`` does not depend on ``N``.
- ``wanda`` (Sun, Liu, Bair & Kolter 2024, "A Simple and Effective Pruning Approach for Large Language
  Models"): ``s_ij = |W_ij| * ||X_j||``, GBLM with ``alpha = 0`` and no backward pass.

Both score the weights of ``Linear``/``Conv1d``/``Conv2d`` layers (a conv's input features are its unfolded
patches). The papers prune within each output row: ``prune(scope="row")``.
"""

from __future__ import annotations

from typing import Any

from gradsense.importance.engine import Context, MethodOutput, aggregate
from gradsense.importance.structures import UnitGroup

__all__ = ["gblm", "wanda"]


def gblm(ctx: Context, granularity: str, groups: list[UnitGroup], *, alpha: float = 100.0, **_: Any) -> MethodOutput:
    """GBLM-Pruner ``|W| * (||X|| + alpha ||G||)``; ``alpha`` (default 100) weighs the gradient term."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a non-negative number, got {alpha!r}.")
    norms = ctx.input_norms()
    _, f = ctx.per_example_stats()
    el = {k: w.abs() * (norms[k] + alpha * f[k].sqrt()) for k, w in ctx.params.items()}
    return MethodOutput(aggregate(el, granularity, groups),
                        tensors={f"curvature/{k}": v.sum().double() for k, v in f.items()},
                        meta={"curvature": "fisher"})


def wanda(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """Wanda ``|W| * ||X||`` (forward passes only)."""
    norms = ctx.input_norms()
    return MethodOutput(aggregate({k: w.abs() * norms[k] for k, w in ctx.params.items()}, granularity, groups))
