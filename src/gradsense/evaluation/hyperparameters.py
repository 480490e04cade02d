"""Hyperparameter sensitivity of an attribution method (Bansal, Agarwal & Nguyen 2020, "SAM: The
Sensitivity of Attribution Methods to Hyperparameters", CVPR).

The same method, on the same inputs, with different hyperparameters (noise levels, steps, baselines, ...)
and random seeds should tell the same story if its maps are to be trusted. For every example this metric
computes the maps of every setting of ``grid`` (the product of the listed values) times ``seeds`` random
draws and reports their agreement: the mean pairwise Spearman rank correlation (``values``, higher = more
stable), the mean pairwise SSIM of the maps (1-D for tabular ones), and the relative spread ``mean_units(std over settings) /
mean_units(|map|)``.

Seeds are a batch dimension: the ``seeds`` draws of one setting are one explainer call on the inputs tiled
``seeds`` times (a stochastic method draws independent noise for every copy), which the method chunks under
its memory budget.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import preserve_model
from gradsense.core.targets import TargetLike
from gradsense.evaluation.base import (
    Explainer,
    build_result,
    check_attributions,
    check_count,
    explain_rows,
    make_explainer,
    prepare,
    register_metric,
    resolve_target,
)
from gradsense.evaluation.similarity import map_2d, spearman, ssim
from gradsense.results.evaluation import MetricResult

__all__ = ["hyperparameter_sensitivity", "settings_grid"]

SAM = "Bansal et al. 2020, SAM: The Sensitivity of Attribution Methods to Hyperparameters (CVPR)"


def settings_grid(grid: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of the values in ``grid`` (``{}`` alone for an empty or missing grid).

    Raises:
        TypeError: ``grid`` is not a dict of lists.
        ValueError: A key with no values.
    """
    if grid is None:
        return [{}]
    if not isinstance(grid, dict):
        raise TypeError(f"grid must be a dict {{option: [values]}}, got {type(grid).__name__}.")
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], (list, tuple)):
            raise TypeError(f"grid[{k!r}] must be a list of values, got {type(grid[k]).__name__}.")
        if not grid[k]:
            raise ValueError(f"grid[{k!r}] is empty; give at least one value.")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


@register_metric("hyperparameter_sensitivity", "sam", "hyperparameters")
def hyperparameter_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    explainer: Explainer | None = None,
    explainer_options: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    seeds: int = 1,
    absolute: bool = True,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    show_progress: bool | None = False,
) -> MetricResult:
    """Spread of an attribution method's maps over hyperparameters and seeds (SAM, Bansal et al. 2020).

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        attributions: An AttributionResult (names the explainer), a tensor (shape-checked) or None.
        target: What is explained.
        explainer: Attribution method name (or callable ``(model, inputs, target) -> maps``, for seeds only).
        explainer_options: Options shared by every setting.
        grid: ``{option: [values]}``; every combination is one setting, e.g.
            ``{"noise_level": [0.1, 0.2], "n_samples": [16, 64]}`` for SmoothGrad or
            ``{"steps": [16, 64], "baseline": ["zeros", "blur"]}`` for IG.
        seeds: Random draws per setting (tiled into one batch; ``1`` = one map per setting).
        absolute: Compare absolute values of the maps.
        chunk_size, max_memory: Memory knobs of the explainer.
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.MetricResult`: ``values`` (mean pairwise Spearman per example),
        ``ssim`` (mean pairwise SSIM), ``spread`` (relative std over settings), and
        ``maps`` ``(settings * seeds, N, ...)``; meta ``settings_list``.

    Raises:
        ValueError: Fewer than two maps to compare, an option the method does not take, bad attributions.
        TypeError: ``grid`` is not a dict of lists.
    """
    model, inputs = prepare(model, inputs, "hyperparameter_sensitivity", chunk_size, max_memory)
    if attributions is not None:
        check_attributions(attributions, inputs)
    k = check_count(seeds, "seeds")
    combos = settings_grid(grid)
    if len(combos) * k < 2:
        raise ValueError("hyperparameter_sensitivity needs at least two maps: give grid={option: [values, ...]} "
                         "and/or seeds >= 2.")
    if grid and not isinstance(explainer if explainer is not None else getattr(attributions, "method", None), str):
        raise ValueError("grid= needs an explainer given by name (its options are what the grid varies).")
    fns = [make_explainer(explainer, attributions, {**(explainer_options or {}), **c}, chunk_size=chunk_size,
                          max_memory=max_memory) for c in combos]  # checks every option before any work
    name = fns[0][1]
    t0 = time.perf_counter()
    n = inputs.shape[0]
    x = inputs.detach()
    with preserve_model(model):
        resolved = resolve_target(model, x, target)
        maps = []
        from gradsense.core.batching import progress

        for fn, _ in progress(fns, total=len(fns), desc="hyperparameters: settings", enabled=show_progress):
            rows = x.repeat(k, *([1] * (x.ndim - 1)))
            index = torch.arange(n, device=x.device).repeat(k)
            m = explain_rows(fn, model, rows, resolved, index, n, x)
            maps.append(m.reshape(k, n, *m.shape[1:]))
    all_maps = torch.cat(maps)  # (M, N, ...)
    prep = [map_2d(m, x.ndim) for m in all_maps]
    prep = [p.abs() if absolute else p for p in prep]
    pairs = list(itertools.combinations(range(len(prep)), 2))
    sp = torch.stack([spearman(prep[i], prep[j]) for i, j in pairs])
    ss = torch.stack([ssim(prep[i], prep[j]) for i, j in pairs]).mean(0)  # 1-D maps: the 1-D SSIM
    stack = torch.stack(prep).double()  # (M, N, ...)
    spread = stack.std(0).reshape(n, -1).mean(1) / stack.abs().mean(0).reshape(n, -1).mean(1).clamp_min(1e-30)
    settings = {"explainer": name, "explainer_options": explainer_options, "grid": grid, "seeds": k,
                "absolute": absolute}
    return build_result(
        MetricResult, {"values": sp.nanmean(0), "ssim": ss, "spread": spread, "maps": all_maps},
        metric="hyperparameter_sensitivity", model=model, settings=settings, higher_is_better=True,
        reference=SAM, t0=t0, explained=name, settings_list=[c for c in combos for _ in range(k)],
        target=resolved.describe(),
    )
