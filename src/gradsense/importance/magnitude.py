"""Magnitude: ``s = |w|``, the baseline every pruning paper compares against.

Global magnitude pruning ranks all weights of all layers together; Gupta et al. (2022), "Is Complexity Required
for Neural Network Pruning? A Case Study on Global Magnitude Pruning", showed that with a per-layer *minimum
threshold* - every layer keeps at least a floor of its weights, so no layer is cut off - it matches far more
complex schemes. The floor is an option of pruning: ``result.prune(0.9, scope="global", floor=...)``.
"""

from __future__ import annotations

from typing import Any

from gradsense.importance.engine import Context, MethodOutput, aggregate
from gradsense.importance.structures import UnitGroup

__all__ = ["magnitude"]


def magnitude(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """Element scores ``|w|``, summed over a structure (``sum_{k in S} |w_k|``, the l1 norm).

    Needs no data (no forward or backward pass).
    """
    return MethodOutput(aggregate({k: v.abs() for k, v in ctx.params.items()}, granularity, groups))
