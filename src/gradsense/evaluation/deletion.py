"""Deletion and insertion curves and their areas (Petsiuk, Das & Saenko 2018, "RISE: Randomized Input
Sampling for Explanation of Black-box Models", BMVC).

Units (pixels of an image with all their channels, tokens of a ``(N, T, E)`` embedding sequence, or
features of a ``(N, D)`` table) are sorted by their attribution, largest first. *Deletion* moves the top
``k`` units to a baseline and records the score as ``k`` grows: a good map makes it fall fast (low area).
*Insertion* starts from the baseline and puts the top units back: a good map makes it rise fast (high area).
The score is the class probability by default (``probability=True`` turns class-logit targets into
probabilities, as in the paper). The area is the trapezoid rule over the fraction of units in ``[0, 1]``.

All ``(steps + 1) x N`` modified inputs are a batch dimension: they are built chunk by chunk from the
ranking (never all at once) and go through the model under the memory budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.core.functional import preserve_model
from gradsense.core.targets import TargetLike
from gradsense.evaluation.base import (
    as_probability,
    build_result,
    check_attributions,
    check_count,
    prepare,
    register_metric,
    resolve_target,
    rows_per_chunk,
    score_rows,
)
from gradsense.results.evaluation import CurveResult

__all__ = ["deletion", "insertion", "unit_scores"]

PETSIUK = "Petsiuk et al. 2018, RISE: Randomized Input Sampling for Explanation of Black-box Models (BMVC)"
Unit = Literal["auto", "pixel", "token", "feature", "element"]


def _resolve_unit(unit: str, inputs: Tensor) -> str:
    if unit not in ("auto", "pixel", "token", "feature", "element"):
        raise ValueError(f"unit must be 'auto', 'pixel', 'token', 'feature' or 'element', got {unit!r}.")
    if unit == "auto":
        return {4: "pixel", 3: "token", 2: "feature"}.get(inputs.ndim, "element")
    if unit == "pixel" and inputs.ndim != 4:
        raise ValueError(f"unit='pixel' needs images (N, C, H, W), got inputs of shape {tuple(inputs.shape)}.")
    if unit == "token" and inputs.ndim != 3:
        raise ValueError(f"unit='token' needs (N, T, E) inputs, got shape {tuple(inputs.shape)}.")
    return unit


def unit_scores(attributions: Tensor, inputs: Tensor, unit: str) -> Tensor:
    """Attribution per unit, ``(N, U)``: summed over channels (pixels) or the embedding (tokens)."""
    a = torch.broadcast_to(attributions, inputs.shape) if unit != "pixel" else attributions
    n = inputs.shape[0]
    if unit == "pixel":
        return a.sum(1).reshape(n, -1)
    if unit == "token":
        return a.sum(-1).reshape(n, -1)
    return a.reshape(n, -1)


def _expand_units(mask: Tensor, inputs: Tensor, unit: str) -> Tensor:
    """``(R, U)`` unit mask -> ``(R, ...)`` mask broadcastable to the input rows."""
    r = mask.shape[0]
    if unit == "pixel":
        return mask.reshape(r, 1, *inputs.shape[2:])
    if unit == "token":
        return mask.reshape(r, inputs.shape[1], 1)
    return mask.reshape(r, *inputs.shape[1:])


def _baseline(baseline: Any, inputs: Tensor, mode: str) -> Tensor:
    from gradsense.attribution import make_baseline

    if baseline is None:
        baseline = "blur" if (mode == "insertion" and inputs.ndim == 4) else "zeros"
    return make_baseline(baseline, inputs)


def _curves(
    mode: str,
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    target: TargetLike,
    *,
    steps: int | None,
    unit: str,
    baseline: Any,
    probability: bool,
    chunk_size: int | None,
    max_memory: int | str | None,
    forward: Callable[[Tensor], Any] | None,
    show_progress: bool | None,
) -> CurveResult:
    model, inputs = prepare(model, inputs, mode, chunk_size, max_memory)
    a = check_attributions(attributions, inputs)
    unit = _resolve_unit(unit, inputs)
    x = inputs.detach()
    n = x.shape[0]
    scores_u = unit_scores(a, x, unit)
    n_units = scores_u.shape[1]
    k_steps = min(n_units, 50) if steps is None else check_count(steps, "steps")
    if k_steps > n_units:
        raise ValueError(f"steps={k_steps} is more than the {n_units} {unit}s of each input; use steps <= {n_units}.")
    if not isinstance(probability, bool):
        raise TypeError(f"probability must be a bool, got {type(probability).__name__}.")
    base = _baseline(baseline, x, mode)
    t0 = time.perf_counter()
    # rank[i, u] = position of unit u in example i's order (0 = largest attribution); ties keep index order
    order = torch.sort(-scores_u, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_units, device=x.device).expand(n, -1).contiguous())
    counts = torch.round(torch.arange(k_steps + 1, dtype=torch.float64) * n_units / k_steps).long().to(x.device)
    t_of_row = torch.arange(k_steps + 1, device=x.device).repeat_interleave(n)  # step-major rows
    index = torch.arange(n, device=x.device).repeat(k_steps + 1)

    def make_rows(sl: slice) -> Tensor:
        ex, k = index[sl], counts[t_of_row[sl]]
        top = rank[ex] < k[:, None]  # (rows, U): the top-k units of each row's example
        m = _expand_units(top, x, unit)
        if mode == "deletion":
            return torch.where(m, base[ex], x[ex])
        return torch.where(m, x[ex], base[ex])

    with preserve_model(model):
        resolved = resolve_target(model, x, target, forward)
        scorer = as_probability(resolved) if probability else resolved
        chunk = rows_per_chunk(model, x, chunk_size=chunk_size, max_memory=max_memory,
                               total=(k_steps + 1) * n, forward=forward)
        s = score_rows(model, make_rows, (k_steps + 1) * n, scorer, index, chunk=chunk, forward=forward,
                       show_progress=show_progress, desc=f"{mode}: forwards")
    curves = s.reshape(k_steps + 1, n).T.contiguous()
    fractions = counts.to(curves.dtype) / n_units
    auc = torch.trapezoid(curves, fractions, dim=1)
    settings = {"steps": k_steps, "unit": unit, "baseline": baseline if isinstance(baseline, (str, int, float))
                else ("default" if baseline is None else "tensor"), "probability": probability}
    return build_result(
        CurveResult, {"values": auc, "curves": curves, "fractions": fractions}, metric=mode, model=model,
        settings=settings, higher_is_better=(mode == "insertion"), reference=PETSIUK, t0=t0,
        target=scorer.describe(), score=scorer.describe(), explained=getattr(attributions, "method", None),
    )


@register_metric("deletion")
def deletion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    steps: int | None = None,
    unit: Unit = "auto",
    baseline: str | float | Tensor | None = None,
    probability: bool = True,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
) -> CurveResult:
    """Deletion curve and its area (Petsiuk et al. 2018): lower is better.

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        attributions: Maps shaped like the inputs (or ``(N, H, W)``), or an AttributionResult.
        target: What was explained; class targets are scored as probabilities when ``probability=True``.
        steps: Points of the curve after the start (default ``min(units, 50)``); step ``t`` removes
            ``round(t * U / steps)`` units.
        unit: ``"auto"`` (pixels for images, tokens for ``(N, T, E)``, features for ``(N, D)``) or
            ``"element"``.
        baseline: What removed units become: ``"zeros"`` (default), ``"blur"``, a number or a tensor.
        probability: Score class targets by their softmax probability (as the paper) rather than the logit.
        chunk_size, max_memory: Memory knobs.
        forward: How to run the model.
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.CurveResult`: ``values`` (area per example), ``curves``, ``fractions``.

    Raises:
        ValueError: Attributions of another shape or with NaN, ``steps`` < 1 or above the number of units.
    """
    return _curves("deletion", model, inputs, attributions, target, steps=steps, unit=unit, baseline=baseline,
                   probability=probability, chunk_size=chunk_size, max_memory=max_memory, forward=forward,
                   show_progress=show_progress)


@register_metric("insertion")
def insertion(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    steps: int | None = None,
    unit: Unit = "auto",
    baseline: str | float | Tensor | None = None,
    probability: bool = True,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
) -> CurveResult:
    """Insertion curve and its area (Petsiuk et al. 2018): higher is better.

    Starts from the baseline (default: a blurred copy for images, zeros otherwise) and puts back the top
    units in attribution order. Arguments as :func:`deletion`.

    Returns:
        A :class:`~gradsense.results.CurveResult`.

    Raises:
        ValueError: As :func:`deletion`.
    """
    return _curves("insertion", model, inputs, attributions, target, steps=steps, unit=unit, baseline=baseline,
                   probability=probability, chunk_size=chunk_size, max_memory=max_memory, forward=forward,
                   show_progress=show_progress)
