"""Scores -> pruning masks: unstructured (global or per layer, with a per-layer floor), N:M, channels, heads.

Every mask is a boolean tensor shaped like its parameter, ``True`` = keep. Counts are exact: at sparsity ``s``
a set of ``n`` candidates loses ``round(s * n)`` of them (``floor(s * n + 1/2)``) - all selected weights together
for ``scope="global"``, each tensor (or each layer's units) for ``scope="layer"``, each output row of each tensor
(the weight viewed as ``(out, in * kernel)``) for ``scope="row"``, the comparison group of Wanda (Sun et al. 2024,
whose reference code removes ``int(s * n)`` per row: the same count whenever ``s * n`` is a whole number). Ties
are broken by position (the earlier element goes first), so masks are deterministic.

- **unstructured**: the lowest-scored weights go. With ``floor`` (global scope; Gupta et al. 2022's minimum
  threshold for global magnitude pruning) every tensor keeps at least ``floor`` weights (an int) or that fraction
  of its weights (a float in (0, 1)): those are reserved before the global ranking.
- **N:M** (``"2:4"``): in every group of ``M`` consecutive weights along the input dimension (the weight viewed
  as ``(out, in * kernel)``), the ``N`` highest-scored are kept - sparsity ``1 - N/M`` exactly (NVIDIA's 2:4
  pattern is ``N=2, M=4``). Tensors with fewer than two dimensions stay dense.
- **channel** / **head**: whole units go; every layer keeps at least one unit (so the pruned model still runs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "check_nm",
    "check_sparsity",
    "exact_counts",
    "n_remove",
    "nm_masks",
    "parse_structure",
    "unit_keep",
    "unstructured_masks",
]


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` as a float in ``[0, 1)``, else a clear ``ValueError``/``TypeError``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}.")
    if not (0 <= sparsity < 1) or math.isnan(sparsity):
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of weights or units to remove), got {sparsity!r}. "
            "For 90% sparsity pass 0.9."
        )
    return float(sparsity)


def parse_structure(structure: object) -> tuple[str, tuple[int, int] | None]:
    """``"unstructured"``, ``"channel"``, ``"head"`` or ``"N:M"`` -> ``(kind, (n, m) or None)``."""
    if not isinstance(structure, str):
        raise TypeError(f"structure must be a string ('unstructured', 'N:M' like '2:4', 'channel', 'head'), got {structure!r}.")
    if structure in ("unstructured", "channel", "head"):
        return structure, None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if not m:
        raise ValueError(f"structure must be 'unstructured', 'N:M' (e.g. '2:4'), 'channel' or 'head', got {structure!r}.")
    n_keep, group = int(m.group(1)), int(m.group(2))
    if not 0 < n_keep < group:
        raise ValueError(f"structure {structure!r}: N:M needs 0 < N < M (keep N of every M weights).")
    return "nm", (n_keep, group)


def n_remove(sparsity: float, n: int) -> int:
    """How many of ``n`` candidates go at ``sparsity``: ``floor(s * n + 1/2)``."""
    return min(n, math.floor(sparsity * n + 0.5))


def _floor_count(floor: int | float, n: int) -> int:
    if isinstance(floor, float) and 0 < floor < 1:
        return min(n, math.ceil(floor * n))
    return min(n, int(floor))


def check_floor(floor: object) -> int | float:
    """A floor: an int >= 0 (weights) or a float in (0, 1) (fraction of each tensor)."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise TypeError(f"floor must be an int (weights per tensor) or a fraction in (0, 1), got {floor!r}.")
    if isinstance(floor, float) and not (0 < floor < 1) and floor != 0:
        raise ValueError(f"floor as a float must be a fraction in (0, 1), got {floor!r}.")
    if floor < 0:
        raise ValueError(f"floor must be >= 0, got {floor!r}.")
    return floor


def unstructured_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    scope: str,
    *,
    floor: int | float = 0,
    counts: Mapping[str, int] | None = None,
    cap: bool = False,
) -> dict[str, Tensor]:
    """Unstructured masks from element scores.

    Args:
        scores: ``{name: element scores}``.
        sparsity: Fraction of weights to remove.
        scope: ``"global"`` (one ranking of all weights), ``"layer"`` (each tensor on its own) or ``"row"`` (each
            output row of each tensor on its own; tensors of fewer than two dimensions count as one row).
        floor: Global scope only: weights (int) or fraction (float) every tensor keeps at least.
        counts: ``{name: weights to remove}`` per tensor (overrides ``sparsity`` for ``scope="layer"``).
        cap: Remove at most what the floor leaves instead of raising.

    Returns:
        ``{name: bool mask}``.

    Raises:
        ValueError: A floor that leaves fewer candidates than must be removed.
    """
    names = list(scores)
    if scope == "row":
        out = {}
        for k in names:
            rows = scores[k].reshape(scores[k].shape[0] if scores[k].ndim >= 2 else 1, -1).double().cpu()
            r = n_remove(sparsity, rows.shape[1])
            keep = torch.ones(rows.shape, dtype=torch.bool)
            keep.scatter_(1, torch.argsort(rows, dim=1, stable=True)[:, :r], False)
            out[k] = keep.reshape(scores[k].shape).to(scores[k].device)
        return out
    if scope == "layer":
        out = {}
        for k in names:
            flat = scores[k].reshape(-1).double().cpu()
            r = counts[k] if counts is not None else n_remove(sparsity, flat.numel())
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            keep[torch.argsort(flat, stable=True)[:r]] = False
            out[k] = keep.reshape(scores[k].shape).to(scores[k].device)
        return out
    flats = [scores[k].reshape(-1).double().cpu() for k in names]
    sizes = [f.numel() for f in flats]
    flat = torch.cat(flats)
    total = flat.numel()
    r = n_remove(sparsity, total)
    reserved = torch.zeros(total, dtype=torch.bool)
    if floor:
        pos = 0
        for f in flats:
            k = _floor_count(floor, f.numel())
            if k:
                top = torch.argsort(f, descending=True, stable=True)[:k]
                reserved[pos + top] = True
            pos += f.numel()
    candidates = torch.nonzero(~reserved).reshape(-1)
    if cap:
        r = min(r, candidates.numel())
    if r > candidates.numel():
        raise ValueError(
            f"floor={floor!r} reserves {int(reserved.sum())} of {total} weights, so sparsity {sparsity} "
            f"({r} to remove) cannot be reached; lower the floor or the sparsity."
        )
    order = candidates[torch.argsort(flat[candidates], stable=True)]
    keep = torch.ones(total, dtype=torch.bool)
    keep[order[:r]] = False
    out, pos = {}, 0
    for k, n in zip(names, sizes):
        out[k] = keep[pos : pos + n].reshape(scores[k].shape).to(scores[k].device)
        pos += n
    return out


def check_nm(shapes: Mapping[str, torch.Size], n_keep: int, group: int) -> None:
    """Raise a ``ValueError`` naming the first tensor whose input dimension ``group`` (M) does not divide."""
    for k, shape in shapes.items():
        if len(shape) < 2:
            continue
        width = math.prod(shape[1:])
        if width % group:
            raise ValueError(
                f"structure '{n_keep}:{group}': M={group} does not divide the input dimension {width} of "
                f"{k!r} (shape {tuple(shape)}). Choose an M that divides it, or leave {k!r} out with params=."
            )


def nm_masks(scores: Mapping[str, Tensor], n_keep: int, group: int) -> dict[str, Tensor]:
    """N:M masks: keep the ``n_keep`` highest-scored of every ``group`` consecutive weights along the input dim.

    Raises:
        ValueError: A tensor whose input dimension (``in * kernel``) ``group`` does not divide, naming it.
    """
    check_nm({k: s.shape for k, s in scores.items()}, n_keep, group)
    out = {k: torch.ones_like(s, dtype=torch.bool) for k, s in scores.items() if s.ndim < 2}
    for k, s in scores.items():
        if s.ndim < 2:
            continue
        g = s.reshape(s.shape[0], -1, group).double().cpu()
        order = torch.argsort(g, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(-1, order[..., :n_keep], True)
        out[k] = keep.reshape(s.shape).to(s.device)
    return out


def unit_keep(unit_scores: Mapping[str, Tensor], sparsity: float, scope: str) -> dict[str, Tensor]:
    """Which units stay (``{group: (size,) bool}``); every group keeps at least one unit (globally, fewer than
    ``round(s * n)`` go when that would empty a layer; the result's ``achieved`` says how many).

    Raises:
        ValueError: If the sparsity would remove every unit of a layer.
    """
    names = list(unit_scores)
    if scope == "layer":
        out = {}
        for k in names:
            s = unit_scores[k].reshape(-1).double().cpu()
            r = n_remove(sparsity, s.numel())
            if r >= s.numel():
                raise ValueError(f"sparsity {sparsity} would remove all {s.numel()} units of {k!r}; lower it.")
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[torch.argsort(s, stable=True)[:r]] = False
            out[k] = keep
        return out
    return {k: v.reshape(-1) for k, v in unstructured_masks(
        {k: unit_scores[k].reshape(-1) for k in names}, sparsity, "global", floor=1, cap=True).items()}


def exact_counts(sizes: Mapping[str, int], ratios: Mapping[str, float], total: int,
                 lo: Mapping[str, float], hi: Mapping[str, float]) -> dict[str, int]:
    """Integer removal counts near ``ratios * sizes`` within ``[lo, hi] * sizes`` that add up to ``total``.

    A common offset ``t`` is found by bisection so that ``sum_l clip(r_l + t, lo_l, hi_l) n_l = total``; the
    counts are then rounded down and the remainder given to the largest fractional parts.
    """
    names = list(sizes)

    def amount(t: float) -> float:
        return sum(min(max(ratios[k] + t, lo[k]), hi[k]) * sizes[k] for k in names)

    a, b = -1.0, 1.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if amount(mid) < total:
            a = mid
        else:
            b = mid
    real = {k: min(max(ratios[k] + b, lo[k]), hi[k]) * sizes[k] for k in names}
    counts = {k: math.floor(real[k] + 1e-9) for k in names}
    caps = {k: math.floor(hi[k] * sizes[k] + 1e-9) for k in names}
    left = total - sum(counts.values())
    order = sorted(names, key=lambda k: -(real[k] - counts[k]))
    while left > 0:
        moved = False
        for k in order:
            if left and counts[k] < caps[k]:
                counts[k] += 1
                left -= 1
                moved = True
        if not moved:
            break
    while left < 0:
        for k in order[::-1]:
            if left and counts[k] > 0:
                counts[k] -= 1
                left += 1
    return counts
