"""Localisation against ground truth, and ranking attribution methods on it (Shah, Jain & Netrapalli 2021,
"Do Input Gradients Highlight Discriminative Features?", NeurIPS; pointing game: Zhang et al. 2018,
"Top-down Neural Attention by Excitation Backprop", IJCV).

With a mask that marks where the label lives (``gs.zoo.dataset("block-digits").masks``):

- *attribution mass*: the share of the map's (absolute) mass inside the mask; a map that ignores the
  image scores the mask's area fraction (0.5 on block-digits), a perfect one scores 1.
- *pointing game*: 1 if the map's largest unit (pixel) lies inside the mask, else 0.

:func:`method_table` runs several attribution methods on the same examples and ranks them by
localisation (and, optionally, by deletion/insertion areas), for ``gradsense evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import model_fingerprint
from gradsense.core.targets import TargetLike
from gradsense.evaluation.base import build_result, check_attributions, prepare, register_metric
from gradsense.results.evaluation import MethodTable, MetricResult, mean_and_stderr

__all__ = ["attribution_mass", "default_methods", "method_table", "pointing_game", "unit_maps"]

SHAH = "Shah et al. 2021, Do Input Gradients Highlight Discriminative Features? (NeurIPS)"
POINTING = "Zhang et al. 2018, Top-down Neural Attention by Excitation Backprop (IJCV)"


def _check_mask(mask: Any, inputs: Tensor) -> Tensor:
    if mask is None:
        raise ValueError("this metric needs mask=: a 0/1 (or bool) tensor shaped like the inputs marking the "
                         "ground-truth region (e.g. gs.zoo.dataset('block-digits').masks).")
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor shaped like the inputs, got {type(mask).__name__}.")
    m = mask.detach().to(inputs.device)
    ok = tuple(m.shape) == tuple(inputs.shape) or (
        inputs.ndim >= 3 and tuple(m.shape) in ((inputs.shape[0], *inputs.shape[2:]), (inputs.shape[0], 1, *inputs.shape[2:])))
    if not ok:
        raise ValueError(f"mask has shape {tuple(m.shape)} but the inputs have shape {tuple(inputs.shape)}; give one "
                         "mask per input, shaped like it (or (N, H, W) for images).")
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("mask must hold only 0/1 (or True/False) values.")
    return m


def unit_maps(values: Tensor, inputs: Tensor, *, reduce: str = "sum") -> Tensor:
    """``(N, U)`` per-unit values: pixels (channels reduced) for images, elements otherwise."""
    n = inputs.shape[0]
    if inputs.ndim == 4:
        v = values if values.ndim == 4 else values.unsqueeze(1)
        v = v.sum(1) if reduce == "sum" else v.amax(1)
        return v.reshape(n, -1)
    return torch.broadcast_to(values, inputs.shape).reshape(n, -1)


def _prepared(attributions: Any, inputs: Tensor, mask: Any, absolute: bool) -> tuple[Tensor, Tensor]:
    a = check_attributions(attributions, inputs)
    m = _check_mask(mask, inputs)
    a = a.abs() if absolute else a.clamp_min(0)
    return unit_maps(a, inputs), unit_maps(m.to(inputs.dtype), inputs, reduce="max") > 0


@register_metric("attribution_mass", "localization", "mass")
def attribution_mass(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike = None,
    mask: Tensor | None = None,
    absolute: bool = True,
) -> MetricResult:
    """Share of the attribution mass inside the ground-truth mask (Shah et al. 2021): higher is better.

    Args:
        model: The module (only fingerprinted; no forward pass is needed).
        inputs: ``(N, ...)`` inputs.
        attributions: Maps shaped like the inputs (or ``(N, H, W)``), or an AttributionResult.
        target: Unused (kept for the common signature).
        mask: 0/1 tensor shaped like the inputs (or ``(N, H, W)``): 1 where the label lives.
        absolute: Mass of ``|map|`` (default) or of its positive part.

    Returns:
        A :class:`~gradsense.results.MetricResult`; ``values`` in ``[0, 1]`` (NaN for an all-zero map, and for
        an empty mask, where there is nothing to localise - as Quantus' ``RelevanceMassAccuracy``), ``area``
        the mask's area fraction (the score of a map that ignores the image).

    Quantus' ``RelevanceMassAccuracy`` defaults to the signed map (``abs=False``) after dividing it by its
    maximum; on non-negative maps it equals this metric with either ``absolute`` setting.

    Raises:
        ValueError: Missing mask, shapes that do not fit, NaN attributions.
    """
    prepare(model, inputs, "attribution_mass")
    t0 = time.perf_counter()
    a, m = _prepared(attributions, inputs, mask, absolute)
    total = a.sum(1)
    inside = (a * m).sum(1)
    values = torch.where((total > 0) & m.any(1), inside / torch.where(total > 0, total, torch.ones_like(total)),
                         torch.full_like(total, float("nan")))
    return build_result(
        MetricResult, {"values": values, "area": m.to(a.dtype).mean(1)}, metric="attribution_mass", model=model,
        settings={"absolute": absolute}, higher_is_better=True, reference=SHAH, t0=t0,
        explained=getattr(attributions, "method", None),
    )


@register_metric("pointing_game", "pointing")
def pointing_game(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike = None,
    mask: Tensor | None = None,
    absolute: bool = True,
    ties: str = "all",
) -> MetricResult:
    """Pointing game (Zhang et al. 2018): 1 if the map's largest unit is inside the mask, else 0.

    Args:
        model, inputs, attributions, target, mask, absolute: As :func:`attribution_mass`.
        ties: When several units share the maximum: ``"all"`` (default) counts a hit only if every tied unit
            is inside the mask, so a constant map cannot point; ``"any"`` counts a hit if one of them is
            (Quantus' ``PointingGame``, where a constant map always hits).

    Returns:
        A :class:`~gradsense.results.MetricResult` with ``values`` of 0/1 per example (NaN for an empty mask,
        as Quantus).

    Raises:
        ValueError: As :func:`attribution_mass`; ``ties`` not ``"all"``/``"any"``.
    """
    if ties not in ("all", "any"):
        raise ValueError(f"ties must be 'all' or 'any', got {ties!r}.")
    prepare(model, inputs, "pointing_game")
    t0 = time.perf_counter()
    a, m = _prepared(attributions, inputs, mask, absolute)
    top = a == a.amax(1, keepdim=True)
    inside = (top & m).sum(1)
    hit = (inside == top.sum(1)) if ties == "all" else (inside > 0)
    values = torch.where(m.any(1), hit.to(a.dtype), torch.full_like(a[:, 0], float("nan")))
    return build_result(
        MetricResult, {"values": values}, metric="pointing_game", model=model,
        settings={"absolute": absolute, "ties": ties}, higher_is_better=True, reference=POINTING, t0=t0,
        explained=getattr(attributions, "method", None),
    )


def default_methods(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """Every registered attribution method that applies to an image CNN, with quick settings."""
    from gradsense.attribution import METHODS

    quick: dict[str, dict[str, Any]] = {
        "integrated_gradients": {"steps": 32},
        "smoothgrad": {"n_samples": 32},
        "smoothgrad_sq": {"n_samples": 32},
        "vargrad": {"n_samples": 32},
        "smooth_gradcam_plus_plus": {"n_samples": 16},
        "expected_gradients": {"n_samples": 32},
    }
    skip = {"legrad"}  # needs a vision transformer's attention maps
    names = sorted({cls.name for cls in METHODS.values()} - skip)
    return [(n, quick.get(n, {})) for n in names]


def method_table(
    model: nn.Module,
    inputs: Tensor,
    *,
    target: TargetLike,
    mask: Tensor | None = None,
    methods: Sequence[str | tuple[str, dict[str, Any]]] | str = "all",
    references: Tensor | None = None,
    curves: bool = True,
    steps: int | None = 32,
    include_random: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> MethodTable:
    """Run attribution methods on the same examples and rank them by localisation (or deletion AUC).

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        target: What to explain (e.g. the labels).
        mask: Ground-truth mask (then the table has attribution mass and pointing game, ranked by mass);
            without it the table is ranked by deletion AUC.
        methods: ``"all"`` (:func:`default_methods`), or method names / ``(name, options)`` pairs.
        references: Reference inputs for Expected Gradients (skipped without them).
        curves: Also compute deletion and insertion areas.
        steps: Steps of the deletion/insertion curves.
        include_random: Add a uniform random map as a control row ("random").
        seed: Seed of the random map.
        chunk_size, max_memory: Memory knobs of the methods and metrics.

    Returns:
        A :class:`~gradsense.results.MethodTable`, best first; methods that cannot run on this model are
        listed in ``meta['skipped']`` with the reason.

    Raises:
        ValueError: Unknown method names, bad inputs, a mask that does not fit, before any work.
    """
    import gradsense as gs
    from gradsense.attribution import get_method
    from gradsense.evaluation.deletion import deletion, insertion

    prepare(model, inputs, "method_table", chunk_size, max_memory)
    if mask is not None:
        _check_mask(mask, inputs)
    if not curves and mask is None:
        raise ValueError("method_table needs a mask (localisation) or curves=True (deletion/insertion) to rank by.")
    if isinstance(methods, str):
        if methods != "all":
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        else:
            methods = default_methods(model)  # type: ignore[assignment]
    specs = [(m, {}) if isinstance(m, str) else (m[0], dict(m[1])) for m in methods]
    if not specs:
        raise ValueError("methods is empty; give method names or 'all'.")
    for name, _ in specs:
        get_method(name)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    rows: list[tuple[str, dict[str, float]]] = []
    skipped: dict[str, str] = {}
    mem = {"chunk_size": chunk_size, "max_memory": max_memory}
    entries: list[tuple[str, Tensor, float]] = []
    for name, opts in specs:
        canonical = get_method(name).name
        if canonical == "expected_gradients":
            if references is None:
                skipped[canonical] = "needs references= (reference inputs)"
                continue
            opts = {"references": references, **opts}
        t1 = time.perf_counter()
        try:
            res = gs.attribute(model, inputs, target=target, method=name, **mem, **opts)
        except (ValueError, TypeError) as err:  # e.g. a CAM method on a model without conv layers
            skipped[canonical] = str(err).split("\n")[0][:200]
            continue
        entries.append((canonical, res.attributions, time.perf_counter() - t1))
    if include_random:
        rnd = torch.rand(inputs.shape, generator=gen, dtype=inputs.dtype).to(inputs.device)
        entries.append(("random", rnd, 0.0))
    for label, maps, seconds in entries:
        cols: dict[str, float] = {"seconds": seconds}
        if mask is not None:
            for key, fn in (("mass", attribution_mass), ("pointing", pointing_game)):
                r = fn(model, inputs, maps, target=target, mask=mask)
                cols[key], cols[f"{key}_stderr"] = r.mean, r.stderr
        if curves:
            for key, fn in (("deletion_auc", deletion), ("insertion_auc", insertion)):
                r = fn(model, inputs, maps, target=target, steps=steps, **mem)
                cols[key], cols[f"{key}_stderr"] = r.mean, r.stderr
        rows.append((label, cols))
    rank_by = "mass" if mask is not None else "deletion_auc"
    sign = -1.0 if rank_by == "mass" else 1.0
    rows.sort(key=lambda r: (sign * r[1][rank_by], r[0]))
    columns = [c for c in ("mass", "pointing", "deletion_auc", "insertion_auc", "seconds") if c in rows[0][1]]
    tensors = {c: torch.tensor([r[1][c] for r in rows], dtype=torch.float64) for c in rows[0][1]}
    mean_mass = None
    if mask is not None:
        mean_mass = mean_and_stderr(unit_maps(mask.to(inputs.dtype), inputs, reduce="max").mean(1))[0]
    return MethodTable.build(
        tensors, method="method_table", settings={"steps": steps if curves else None, "curves": curves},
        model=model_fingerprint(model), seed=seed, wall_time_s=time.perf_counter() - t0,
        methods=[r[0] for r in rows], columns=columns, rank_by=rank_by, skipped=skipped,
        n_examples=int(inputs.shape[0]), mask_area=mean_mass,
        labels={"mass": "mass in mask", "pointing": "pointing game", "deletion_auc": "deletion AUC (lower better)",
                "insertion_auc": "insertion AUC", "seconds": "seconds"},
    )
