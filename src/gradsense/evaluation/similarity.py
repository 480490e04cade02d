"""Similarity of attribution maps, batched over examples: Spearman rank correlation (ties get their
average rank, as ``scipy.stats.spearmanr``) and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality
Assessment: From Error Visibility to Structural Similarity"; the numbers of ``skimage.metrics``'
Gaussian-weighted variant), used by the randomisation check and by the hyperparameter-sensitivity metric.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["average_ranks", "map_2d", "spearman", "ssim"]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``1..D`` of each row of ``x`` ``(N, D)``; tied values get the mean of their ranks."""
    n, d = x.shape
    sorted_vals, order = torch.sort(x, dim=1, stable=True)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # (N, D) group id per sorted position
    pos = torch.arange(d, device=x.device, dtype=torch.float64).expand(n, d)
    first = torch.full((n, d), float(d), dtype=torch.float64, device=x.device).scatter_reduce(
        1, group, pos, reduce="amin", include_self=True)
    last = torch.full((n, d), -1.0, dtype=torch.float64, device=x.device).scatter_reduce(
        1, group, pos, reduce="amax", include_self=True)
    avg_sorted = (first.gather(1, group) + last.gather(1, group)) / 2 + 1
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair of ``a`` and ``b`` (flattened after the batch dim).

    A constant row has no ranking: its correlation is NaN (as scipy's).
    """
    ra = average_ranks(a.reshape(a.shape[0], -1).double())
    rb = average_ranks(b.reshape(b.shape[0], -1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    return (ra * rb).sum(1) / den


def map_2d(maps: Tensor, inputs_ndim: int) -> Tensor:
    """Image maps ``(N, C, H, W)`` summed over channels to ``(N, H, W)``; other maps flattened to ``(N, 1, D)``."""
    if inputs_ndim == 4 and maps.ndim == 4:
        return maps.sum(1)
    return maps.reshape(maps.shape[0], 1, -1)


def _gaussian_taps(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``scipy.ndimage.gaussian_filter``'s kernel with ``truncate=3.5`` (radius ``int(3.5 sigma + 0.5)``)."""
    radius = int(3.5 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * t**2 / sigma**2)
    return g / g.sum()


def _filter_axis(t: Tensor, taps: Tensor, dim: int) -> Tensor:
    """Correlate ``t`` with ``taps`` along ``dim``, borders extended by mirror reflection including the edge
    sample (``scipy.ndimage``'s ``mode="reflect"``: ``d c b a | a b c d | d c b a``, repeated as needed)."""
    n, r = t.shape[dim], (taps.numel() - 1) // 2
    idx = torch.arange(-r, n + r, device=t.device) % (2 * n)
    idx = torch.where(idx < n, idx, 2 * n - 1 - idx)
    padded = t.index_select(dim, idx).movedim(dim, -1)
    out = padded.unfold(-1, taps.numel(), 1) @ taps
    return out.movedim(-1, dim)


def ssim(a: Tensor, b: Tensor, *, window: int = 7, sigma: float = 1.5, normalize: bool = True) -> Tensor:
    """Mean structural similarity of each pair of maps ``(N, H, W)`` (``H = 1``: 1-D maps of length ``W``).

    Computed as ``skimage.metrics.structural_similarity(a, b, win_size=window, gaussian_weights=True,
    sigma=sigma, use_sample_covariance=True, data_range=R)`` (Wang et al. 2004 with a Gaussian-weighted window,
    as Adebayo et al. use): the local means and (``NP / (NP - 1)``-corrected) covariances come from
    ``scipy.ndimage.gaussian_filter(sigma, truncate=3.5, mode="reflect")``, and the SSIM map is averaged after
    cropping ``(window - 1) // 2`` samples from every border. ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``.

    - ``normalize=True`` (default): each map is first scaled to ``[0, 1]`` by its own minimum and maximum (as
      Adebayo et al. do) and ``R = 1``; a constant map becomes all zeros, so two constant maps score 1.
    - ``normalize=False``: the maps as they are, ``R`` = the pair's joint value range (``max - min`` over both
      maps, 1 if that is 0), Quantus' ``ssim`` convention.

    An axis of length 1 is not filtered (``(N, 1, W)`` maps get skimage's 1-D SSIM, ``NP = window``). The window
    is shortened to the shortest filtered side (rounded down to odd); with no side of length 3 or more the
    result is NaN.
    """
    a, b = a.double(), b.double()
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"ssim needs two (N, H, W) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    n = a.shape[0]
    axes = [d for d in (1, 2) if a.shape[d] > 1]
    size = min([window, *(a.shape[d] for d in axes)])
    size = size if size % 2 == 1 else size - 1
    if not axes or size < 3:
        return torch.full((n,), math.nan, dtype=torch.float64, device=a.device)
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    if normalize:
        def scale(m: Tensor, flat: Tensor) -> Tensor:
            lo, hi = flat.min(1).values, flat.max(1).values
            span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
            return (m - lo[:, None, None]) / span[:, None, None]

        a, b = scale(a, flat_a), scale(b, flat_b)
        data_range = torch.ones(n, dtype=a.dtype, device=a.device)
    else:
        both = torch.cat([flat_a, flat_b], 1)
        data_range = both.max(1).values - both.min(1).values
        data_range = torch.where(data_range > 0, data_range, torch.ones_like(data_range))
    taps = _gaussian_taps(sigma, a.dtype, a.device)

    def filt(t: Tensor) -> Tensor:
        for d in axes:
            t = _filter_axis(t, taps, d)
        return t

    mx, my = filt(a), filt(b)
    n_window = size ** len(axes)
    cov_norm = n_window / (n_window - 1)
    vx = cov_norm * (filt(a * a) - mx * mx)
    vy = cov_norm * (filt(b * b) - my * my)
    vxy = cov_norm * (filt(a * b) - mx * my)
    c1 = ((0.01 * data_range) ** 2)[:, None, None]
    c2 = ((0.03 * data_range) ** 2)[:, None, None]
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (size - 1) // 2
    for d in axes:
        s = s.narrow(d, pad, s.shape[d] - 2 * pad)
    return s.reshape(n, -1).mean(1)
