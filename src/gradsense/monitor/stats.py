"""The statistics the monitor computes, as pure functions and small state machines.

- :func:`noise_estimates`: unbiased ``|G|^2`` and ``tr(Sigma)`` from the squared norms of mean gradients over
  batches of two sizes (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training",
  Appendix A); per-example norms are the special case ``B_small = 1``.
- :func:`ratio_of_means`: the noise scale ``B_simple = tr(Sigma) / |G|^2`` over a window of steps with its
  standard error (delta method), the way McCandlish et al. and nanoGNS smooth numerator and denominator
  separately before dividing.
- :class:`SpikeDetector`: per-series running level, trend and residual variance of ``log`` values and the
  z-score of each new value against its prediction.
- :func:`gram_cosines`: pairwise cosines of several objectives' gradients, globally and per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["FewSpikeDetector", "ScalarSpikeDetector", "SpikeDetector", "gram_cosines", "noise_estimates", "ratio_of_means"]


def noise_estimates(small_sq: Tensor | float, b_small: float, big_sq: Tensor | float, b_big: float
                    ) -> tuple[Tensor | float, Tensor | float]:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from two batch sizes (McCandlish et al. 2018, App. A).

    With ``G_B`` the mean gradient of ``B`` independent examples, ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Given the
    average ``|G_small|^2`` over batches of size ``b_small`` and ``|G_big|^2`` for size ``b_big``:

        |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

    With per-example gradients, ``b_small = 1`` and ``|G_small|^2`` is the mean of ``||g_i||^2``: the estimates
    are then the unbiased sample covariance trace ``N/(N-1) (mean ||g_i||^2 - |G_N|^2)`` and
    ``|G_N|^2 - tr(Sigma)/N``.

    Args:
        small_sq: Mean squared norm of the small-batch mean gradients (tensor: one value per group).
        b_small: Small batch size.
        big_sq: Squared norm of the big-batch mean gradient.
        b_big: Big batch size (> ``b_small``).

    Returns:
        ``(grad_sq, trace)``: the estimates of ``|G|^2`` and ``tr(Sigma)`` (either may come out negative: they
        are unbiased, not constrained).

    Raises:
        ValueError: If ``b_big <= b_small``.
    """
    if not b_big > b_small:
        raise ValueError(f"the big batch ({b_big}) must be larger than the small batch ({b_small}).")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def ratio_of_means(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """``mean(num) / mean(den)`` and its standard error by the delta method.

    Used for the noise scale over a window of steps: ``num`` are per-step estimates of ``tr(Sigma)`` and ``den``
    of ``|G|^2``. Missing (NaN) pairs are skipped.

    Returns:
        ``(ratio, stderr)``; ``(nan, nan)`` with fewer than 2 pairs or a non-positive mean denominator.
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    keep = np.isfinite(num) & np.isfinite(den)
    num, den = num[keep], den[keep]
    n = num.size
    if n == 0:
        return math.nan, math.nan
    mn, md = float(num.mean()), float(den.mean())
    if md <= 0:
        return math.nan, math.nan
    ratio = mn / md
    if n < 2:
        return ratio, math.nan
    vn, vd = float(num.var(ddof=1)), float(den.var(ddof=1))
    cov = float(np.cov(num, den, ddof=1)[0, 1])
    var = (vn / md**2 + mn**2 * vd / md**4 - 2 * mn * cov / md**3) / n
    return ratio, math.sqrt(max(var, 0.0))


class SpikeDetector:
    """Running level, trend and residual variance of ``log(value)`` per series, and the z-score of new values.

    For each series the detector keeps a level ``l`` and a trend ``b`` of the log values (Holt's linear
    exponential smoothing: a steady warm-up or decay of a norm is followed, not flagged) and ``v``, the
    exponentially weighted mean of squared one-step prediction residuals. A new value ``x`` scores

        z = (log x - (l + b)) / sqrt(v + floor^2),

    the distance from the predicted log value in running standard deviations; ``floor`` (log units, 0.1 = 10%)
    keeps a series that barely moves from alarming on a small change. An alarm is a value with ``z > threshold``
    after ``warmup`` values of that series; it enters the statistics clipped to the prediction plus ``threshold``
    standard deviations, so one spike neither hides the next nor drags the level. Values that are not positive and
    finite are skipped (non-finite gradients are reported by name elsewhere).

    Args:
        n: Number of series.
        threshold: z above which a value is a spike.
        decay: Weight of the past in the residual variance (0.98: about 50 steps).
        warmup: Values per series before alarms may be raised.
        floor: Minimum standard deviation in log units.
        level: Smoothing of the level (weight of the newest residual).
        trend: Smoothing of the trend (weight of the level change).
    """

    def __init__(self, n: int, *, threshold: float = 6.0, decay: float = 0.98, warmup: int = 50,
                 floor: float = 0.2, level: float = 0.1, trend: float = 0.1) -> None:
        self.threshold, self.decay, self.warmup, self.floor = float(threshold), float(decay), int(warmup), float(floor)
        self.alpha, self.beta = float(level), float(trend)
        self.level = np.zeros(n)
        self.trend = np.zeros(n)
        self.var = np.zeros(n)
        self.count = np.zeros(n, dtype=np.int64)

    def update(self, values: np.ndarray) -> np.ndarray:
        """Score ``values`` (one per series), then add them to the statistics.

        Returns:
            z-scores; NaN for skipped values and during warm-up.
        """
        x = np.asarray(values, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logx = np.log(x)
        ok = np.isfinite(logx)
        pred = self.level + self.trend
        sd = np.sqrt(self.var + self.floor**2)
        z = (logx - pred) / sd
        warm = self.count >= self.warmup
        steady = bool(ok.all() and warm.all())
        if not steady:
            z[~(ok & warm)] = np.nan
            logx = np.where(ok, logx, pred)
        clipped = np.minimum(logx, pred + self.threshold * sd)
        if not steady:
            clipped = np.where(warm, clipped, logx)
        resid = clipped - pred
        new_level = pred + self.alpha * resid
        new_trend = self.trend + self.beta * (new_level - self.level - self.trend)
        new_var = self.decay * self.var + (1.0 - self.decay) * resid * resid
        if steady:
            self.level, self.trend, self.var = new_level, new_trend, new_var
            self.count += 1
            return z
        first = ok & (self.count == 0)
        rest = ok & (self.count > 0)
        self.trend = np.where(rest, new_trend, self.trend)
        self.level = np.where(first, logx, np.where(rest, new_level, self.level))
        self.var = np.where(rest, new_var, self.var)
        self.count = self.count + ok
        return z


class ScalarSpikeDetector:
    """:class:`SpikeDetector` for one series, in plain Python floats (the loss: one value per step, no arrays)."""

    def __init__(self, *, threshold: float = 6.0, decay: float = 0.98, warmup: int = 50, floor: float = 0.2,
                 level: float = 0.1, trend: float = 0.1) -> None:
        self.threshold, self.decay, self.warmup, self.floor2 = float(threshold), float(decay), int(warmup), floor**2
        self.alpha, self.beta = float(level), float(trend)
        self.level = self.trend = self.var = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        """Score ``value``, then add it to the statistics (same rules as :meth:`SpikeDetector.update`)."""
        if not (value > 0 and math.isfinite(value)):
            return math.nan
        logx = math.log(value)
        if self.count == 0:
            self.level, self.count = logx, 1
            return math.nan
        pred = self.level + self.trend
        sd = math.sqrt(self.var + self.floor2)
        warm = self.count >= self.warmup
        z = (logx - pred) / sd if warm else math.nan
        resid = (min(logx, pred + self.threshold * sd) if warm else logx) - pred
        new_level = pred + self.alpha * resid
        self.trend += self.beta * (new_level - self.level - self.trend)
        self.level = new_level
        self.var = self.decay * self.var + (1.0 - self.decay) * resid * resid
        self.count += 1
        return z


class FewSpikeDetector:
    """:class:`SpikeDetector` for a few series (up to a few dozen): one :class:`ScalarSpikeDetector` each, plain
    Python floats being faster than numpy on arrays this small. Same rules, same results."""

    def __init__(self, n: int, **options: float) -> None:
        self.series = [ScalarSpikeDetector(**options) for _ in range(n)]  # type: ignore[arg-type]

    def update(self, values: np.ndarray) -> np.ndarray:
        """Score ``values`` (one per series), then add them to the statistics; NaN where skipped or warming up."""
        return np.array([d.update(v) for d, v in zip(self.series, np.asarray(values, dtype=np.float64).tolist())])


def gram_cosines(grads: Sequence[Sequence[Tensor | None]], group_index: Tensor, n_groups: int
                 ) -> tuple[Tensor, Tensor]:
    """Pairwise cosines of ``K`` objectives' gradients, over all parameters and per group.

    Args:
        grads: ``K`` lists of per-parameter gradients (``None``: no gradient, i.e. zero).
        group_index: ``(P,)`` the group of each parameter (``-1``: in no group).
        n_groups: Number of groups.

    Returns:
        ``(global_cos, group_cos)``: ``(K, K)`` and ``(n_groups, K, K)`` float64 cosines (NaN where a gradient
        is zero), and the same Gram matrices' diagonals give the squared norms.
    """
    k = len(grads)
    n_params = len(grads[0])
    dev = next((g.device for gs in grads for g in gs if g is not None), torch.device("cpu"))
    dots = torch.zeros(n_params, k, k, dtype=torch.float64, device=dev)
    for p in range(n_params):
        rows = [g[p] for g in grads]
        present = [i for i, r in enumerate(rows) if r is not None]
        if not present:
            continue
        mat = torch.stack([rows[i].reshape(-1).to(torch.float64) for i in present])
        gram = mat @ mat.T
        idx = torch.tensor(present, device=dev)
        dots[p].index_put_((idx[:, None], idx[None, :]), gram)
    total = dots.sum(0)
    per = torch.zeros(n_groups, k, k, dtype=torch.float64, device=dev)
    keep = group_index >= 0
    per.index_add_(0, group_index[keep].to(dev), dots[keep.to(dev)])
    return _cos(total), _cos(per)


def _cos(gram: Tensor) -> Tensor:
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = diag.unsqueeze(-1) * diag.unsqueeze(-2)
    return torch.where(denom > 0, gram / denom, torch.full_like(gram, math.nan))
