"""How close is a reconstruction? PSNR, SSIM, the best matching of a batch, label accuracy.

- :func:`psnr`: ``10 log10(R^2 / MSE)`` per image, ``R`` the data range (``hi - lo``).
- :func:`ssim`: the structural similarity of Wang et al. 2004 with the standard settings: a Gaussian window
  of sigma 1.5 truncated at 3.5 sigma (11x11), ``K1 = 0.01``, ``K2 = 0.03``, population (not sample)
  covariances, computed where the whole window fits (the "valid" region, the region scikit-image averages
  over), averaged over channels. Images smaller than 11 pixels use sigma 0.75 (7x7) or 0.5 (5x5). It equals
  ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=s, use_sample_covariance=False,
  data_range=R, channel_axis=0)``.
- :func:`match`: a gradient is the same for every ordering of the batch, so a batch reconstruction is
  compared with the originals under the assignment that minimises the total squared error (Hungarian
  algorithm, ``scipy.optimize.linear_sum_assignment``), as breaching does.
- :func:`label_accuracy`: labels recovered from a gradient are a multiset; the share of the true labels
  found, ``sum_c min(n_c, n_hat_c) / B``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["label_accuracy", "match", "psnr", "ssim", "ssim_sigma"]

K1, K2, SIGMA, TRUNCATE = 0.01, 0.03, 1.5, 3.5


def _check_pair(a: Tensor, b: Tensor) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"expected two tensors, got {type(a).__name__} and {type(b).__name__}.")
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim < 2:
        raise ValueError(f"expected a batch of images (N, ...), got shape {tuple(a.shape)}.")


def psnr(originals: Tensor, reconstructions: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio of every image, in dB (``inf`` for identical images).

    Args:
        originals: ``(N, ...)`` images.
        reconstructions: ``(N, ...)`` images, same shape.
        data_range: ``hi - lo`` of the images' value range.

    Returns:
        ``(N,)`` float64 tensor.

    Raises:
        ValueError: Shapes differ or ``data_range`` is not positive.
    """
    _check_pair(originals, reconstructions)
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}.")
    diff = (originals.detach().double() - reconstructions.detach().double()).reshape(originals.shape[0], -1)
    mse = diff.pow(2).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim_sigma(height: int, width: int) -> float:
    """The Gaussian window's sigma for images of this size: 1.5 (11x11) where it fits, else 0.75 or 0.5."""
    for sigma in (SIGMA, 0.75, 0.5):
        if 2 * int(TRUNCATE * sigma + 0.5) + 1 <= min(height, width):
            return sigma
    raise ValueError(f"SSIM needs images of at least 5x5 pixels, got {height}x{width}.")


def _window(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter(img: Tensor, w: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filtering of ``(M, 1, H, W)``."""
    k = w.numel()
    out = torch.nn.functional.conv2d(img, w.view(1, 1, 1, k))
    return torch.nn.functional.conv2d(out, w.view(1, 1, k, 1))


def ssim(originals: Tensor, reconstructions: Tensor, data_range: float = 1.0, sigma: float | None = None) -> Tensor:
    """Structural similarity (Wang et al. 2004) of every image, mean over the valid region and channels.

    Args:
        originals: ``(N, C, H, W)`` or ``(N, H, W)`` images.
        reconstructions: Same shape.
        data_range: ``hi - lo`` of the images' value range.
        sigma: Gaussian window sigma (default :func:`ssim_sigma` of the image size).

    Returns:
        ``(N,)`` float64 tensor in ``[-1, 1]``.

    Raises:
        ValueError: Shapes differ, images are not 2-D, or smaller than the window.
    """
    _check_pair(originals, reconstructions)
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}.")
    a, b = originals.detach().double(), reconstructions.detach().double()
    if a.ndim == 3:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if a.ndim != 4:
        raise ValueError(f"SSIM needs images (N, C, H, W) or (N, H, W), got shape {tuple(originals.shape)}.")
    n, c, h, w_ = a.shape
    sigma = ssim_sigma(h, w_) if sigma is None else float(sigma)
    if 2 * int(TRUNCATE * sigma + 0.5) + 1 > min(h, w_):
        raise ValueError(f"the SSIM window for sigma={sigma} is larger than the images ({h}x{w_}).")
    win = _window(sigma, a.dtype, a.device)
    x, y = a.reshape(n * c, 1, h, w_), b.reshape(n * c, 1, h, w_)
    ux, uy = _filter(x, win), _filter(y, win)
    uxx, uyy, uxy = _filter(x * x, win), _filter(y * y, win), _filter(x * y, win)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean(dim=(1, 2))


def match(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """The ordering of ``reconstructions`` that best matches ``originals`` (least total squared error).

    Args:
        originals: ``(N, ...)``.
        reconstructions: ``(M, ...)``; with ``M < N`` only ``M`` originals get a match.

    Returns:
        ``(N,)`` int64 index into ``reconstructions`` for every original (``-1`` where none is left).
    """
    from scipy.optimize import linear_sum_assignment

    a = originals.detach().double().reshape(originals.shape[0], -1)
    b = reconstructions.detach().double().reshape(reconstructions.shape[0], -1)
    cost = torch.cdist(a, b).pow(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    out = np.full(a.shape[0], -1, dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)


def label_accuracy(true: Tensor, recovered: Tensor | None, num_classes: int | None = None) -> float:
    """Share of the true labels found, as multisets: ``sum_c min(n_c, n_hat_c) / B`` (``nan`` if none)."""
    if recovered is None or recovered.numel() == 0:
        return math.nan
    k = int(max(int(true.max()), int(recovered.max())) + 1) if num_classes is None else num_classes
    n = torch.bincount(true.reshape(-1).long().cpu(), minlength=k)
    m = torch.bincount(recovered.reshape(-1).long().cpu(), minlength=k)
    return float(torch.minimum(n, m).sum()) / true.numel()
