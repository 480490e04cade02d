"""Similarity of attribution maps, batched over examples: Spearman rank correlation (ties get their
average rank, as ``scipy.stats.spearmanr``) and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality
Assessment: From Error Visibility to Structural Similarity"), used by the randomisation check and by the
hyperparameter-sensitivity metric.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, *, window: int = 7, sigma: float = 1.5, normalize: bool = True) -> Tensor:
    """Mean structural similarity of each pair of 2-D maps ``(N, H, W)``.

    Each map is first scaled to ``[0, 1]`` by its own minimum and maximum (``normalize=True``, as Adebayo
    et al. do), so the data range is 1 and ``C1 = 0.01^2``, ``C2 = 0.03^2``. The local statistics use a
    Gaussian window (``sigma`` 1.5, side ``min(window, H, W)`` rounded down to odd), "valid" positions only,
    with the unbiased (``n / (n - 1)``-corrected) covariance, as ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, use_sample_covariance=True)``. Maps with a side of 1 give NaN.
    """
    a, b = a.double(), b.double()
    if a.ndim != 3 or a.shape != b.shape:
        raise ValueError(f"ssim needs two (N, H, W) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    n, h, w = a.shape
    size = min(window, h, w)
    size = size if size % 2 == 1 else size - 1
    if size < 2:
        return torch.full((n,), math.nan, dtype=torch.float64, device=a.device)
    if normalize:
        def scale(m: Tensor) -> Tensor:
            flat = m.reshape(n, -1)
            lo, hi = flat.min(1).values, flat.max(1).values
            span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
            return (m - lo[:, None, None]) / span[:, None, None]

        a, b = scale(a), scale(b)
    g = _gaussian_window(size, sigma, a.dtype, a.device)
    kernel = (g[:, None] * g[None, :])[None, None]
    x, y = a[:, None], b[:, None]

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel)

    mx, my = filt(x), filt(y)
    cov_norm = size * size / (size * size - 1)
    vx = cov_norm * (filt(x * x) - mx * mx)
    vy = cov_norm * (filt(y * y) - my * my)
    vxy = cov_norm * (filt(x * y) - mx * my)
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)
