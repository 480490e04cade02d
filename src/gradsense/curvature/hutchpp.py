"""Trace estimation with error bars: adaptive Hutch++ and Hutchinson on any symmetric operator.

Hutchinson (1989): ``tr(A) = E[g^T A g]`` for Rademacher ``g``; the mean of ``N`` samples has standard
error ``sd / sqrt(N)``, and ``sd^2 = 2 (||A||_F^2 - sum_i A_ii^2)`` is large when a few eigenvalues
dominate - which is the case for the loss Hessian of a network.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation") first
finds the dominant subspace: ``Q = orth(A S)`` for a random sketch ``S``, takes ``tr(Q^T A Q)`` exactly,
and runs Hutchinson only on the deflated rest ``(I - QQ^T) A (I - QQ^T)``, whose Frobenius norm is small.
Given ``Q`` the low-rank part is exact, so the standard error of the whole estimate is the residual
part's: ``sd(z_i^T A z_i) / sqrt(N)`` with ``z_i = (I - QQ^T) g_i`` - the samples are i.i.d. given ``Q``.

The sketch grows adaptively (in the spirit of Persson, Cortinovis & Kressner 2022, "Improved variants of
the Hutch++ algorithm"): after each block of residual samples, the number of samples still needed for
``stderr <= rtol * |trace|`` is projected from the sample variance; while that is well above the sketch
size, the sketch is doubled (``2x`` its size in products: ``A S`` and ``A Q``) - but only while the last
doubling lowered the projected total cost. Residual samples taken before a doubling are not wasted:
with ``z`` and ``A z`` kept, ``z' = z - Q_new Q_new^T z`` and ``A z' = A z - (A Q_new)(Q_new^T z)`` need no
new product.

Per-group traces ``tr(D_l A)`` (``D_l`` selecting the coordinates of one parameter group, HAWQ-V2's
``Tr(H_l)``) come from the same products: with ``P = QQ^T``,
``tr(D A) = tr(D P A P) + 2 tr(D P A P_perp) + tr(D P_perp A P_perp)``
``= 2 <(AQ)_l, Q_l> - <Q^T A Q, Q_l^T Q_l> + tr(D P_perp A P_perp)``: the first two terms are exact, the
last is estimated by ``(P_perp D z) . (A z)`` (unbiased, and small like the total's residual), and the
groups' parts add up to the total.

Example:
    >>> A = torch.diag(torch.logspace(0, -4, 400, dtype=torch.float64))
    >>> est = hutchpp(lambda rows: rows @ A, 400, rtol=0.01, seed=0)
    >>> abs(est.value - float(A.trace())) < 3 * est.stderr + 1e-12
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["TraceEstimate", "hutchpp", "rademacher"]

MatMat = Callable[[Tensor], Tensor]
TraceMethod = Literal["hutch++", "hutchinson"]


def rademacher(rows: int, n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``(rows, n)`` random signs from a CPU generator, moved to ``device``/``dtype``."""
    g = torch.randint(0, 2, (rows, n), generator=generator, dtype=torch.int8)
    return (2 * g - 1).to(device=device, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its diagnostics.

    Attributes:
        value: Estimated trace.
        stderr: Its standard error (0 when the sketch spans the whole space: then the value is exact).
        n_matvec: Operator-vector products used.
        converged: Whether ``stderr <= rtol * |value|`` was reached within the budget.
        rank: Size of the Hutch++ sketch (0 for Hutchinson).
        low_rank: The exact part ``tr(Q^T A Q)``.
        samples: The final residual samples ``z_i^T A z_i`` (``(N,)`` float64).
        group_values: ``(G,)`` per-group traces (empty without groups).
        group_stderr: ``(G,)`` their standard errors.
        group_samples: ``(N, G)`` per-group residual samples.
    """

    value: float
    stderr: float
    n_matvec: int
    converged: bool
    rank: int
    low_rank: float
    samples: Tensor
    group_values: Tensor
    group_stderr: Tensor
    group_samples: Tensor

    @property
    def running(self) -> Tensor:
        """Estimate after each residual sample (with the final sketch): ``low_rank + cumulative mean``."""
        if self.samples.numel() == 0:
            return torch.tensor([self.value], dtype=torch.float64)
        counts = torch.arange(1, self.samples.numel() + 1, dtype=torch.float64)
        return self.low_rank + torch.cumsum(self.samples, 0) / counts


class _Sketch:
    """The Hutch++ subspace ``Q`` (orthonormal rows), ``A Q``, and the per-group exact parts."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, groups: Sequence[Tensor]) -> None:
        self.Q = torch.zeros(0, n, dtype=dtype, device=device)
        self.AQ = torch.zeros(0, n, dtype=dtype, device=device)
        self.groups = groups
        self.cost = 0

    @property
    def rank(self) -> int:
        return int(self.Q.shape[0])

    def grow(self, matmat: MatMat, sketch: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``orth(A S)`` (deflated against the current ``Q``); return the new rows and their products."""
        y = matmat(sketch)
        self.cost += sketch.shape[0]
        scale = float(torch.linalg.vector_norm(y, dim=1).max()) if y.numel() else 0.0
        for _ in range(2):
            if self.rank:
                y = y - (y @ self.Q.T) @ self.Q
        q, r = torch.linalg.qr(y.T.to(torch.float64))
        keep = r.diagonal().abs() > float(torch.finfo(y.dtype).eps) ** 0.75 * max(scale, 1e-300)
        q_new = q.T[keep].to(self.Q.dtype)
        if q_new.shape[0]:
            if self.rank:
                q_new = q_new - (q_new @ self.Q.T) @ self.Q
            q_new = torch.linalg.qr(q_new.T.to(torch.float64))[0].T.to(self.Q.dtype).contiguous()
            aq_new = matmat(q_new)
            self.cost += q_new.shape[0]
        else:
            aq_new = q_new.clone()
        self.Q = torch.cat([self.Q, q_new])
        self.AQ = torch.cat([self.AQ, aq_new])
        return q_new, aq_new

    def exact(self) -> tuple[float, Tensor]:
        """``tr(Q^T A Q)`` and the groups' exact parts ``2 <(AQ)_l, Q_l> - <Q^T A Q, Q_l^T Q_l>``."""
        if not self.rank:
            return 0.0, torch.zeros(len(self.groups), dtype=torch.float64)
        q, aq = self.Q.to(torch.float64), self.AQ.to(torch.float64)
        m = q @ aq.T
        m = 0.5 * (m + m.T)
        parts = []
        for idx in self.groups:
            ql, aql = q[:, idx], aq[:, idx]
            parts.append(2.0 * float((aql * ql).sum()) - float((m * (ql @ ql.T)).sum()))
        return float(m.trace()), torch.tensor(parts, dtype=torch.float64)


def _group_dots(z: Tensor, az: Tensor, groups: Sequence[Tensor], q: Tensor) -> Tensor:
    """Per-group residual samples ``(P_perp D_l z) . (A z)``: unbiased for ``tr(D_l P_perp A P_perp)``."""
    if not groups:
        return torch.zeros(z.shape[0], 0, dtype=torch.float64)
    prod = (z * az).to(torch.float64)
    qaz = (az @ q.T).to(torch.float64) if q.shape[0] else None
    cols = []
    for idx in groups:
        col = prod[:, idx].sum(1)
        if qaz is not None:
            col = col - ((z[:, idx] @ q[:, idx].T).to(torch.float64) * qaz).sum(1)
        cols.append(col)
    return torch.stack(cols, dim=1)


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.inf
    return float(samples.std(correction=1)) / math.sqrt(samples.numel())


def hutchpp(
    matmat: MatMat,
    n: int,
    *,
    rtol: float = 0.01,
    max_matvec: int = 1000,
    method: TraceMethod = "hutch++",
    groups: Sequence[Tensor] = (),
    block: int = 8,
    min_samples: int = 16,
    max_rank: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    """Adaptive Hutch++ (or Hutchinson) trace of a symmetric operator, stopping on the standard error.

    Args:
        matmat: ``(m, n) -> (m, n)``, the operator applied to each row.
        n: Dimension.
        rtol: Stop once ``stderr <= rtol * |estimate|`` (and at least ``min_samples`` residual samples).
        max_matvec: Product budget; the estimate is returned with ``converged=False`` when it runs out.
        method: ``"hutch++"`` (adaptive sketch) or ``"hutchinson"`` (no sketch).
        groups: Index tensors of coordinate groups whose traces ``tr(D_l A)`` are wanted too.
        block: Probes per operator call (the initial sketch size and the residual block size).
        min_samples: Fewest residual samples before the standard error is trusted.
        max_rank: Largest sketch (default ``min(n, 256)``); memory is ``2 * max_rank * n`` numbers.
        seed: Seed of the CPU generator of the sketch and the Rademacher probes.
        dtype: Dtype of the probes (the operator's).
        device: Device of the probes.

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        ValueError: Bad ``rtol``, ``method``, ``block``, ``min_samples`` or ``max_matvec``.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}.")
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be a positive number, got {rtol!r}.")
    for name, val in (("block", block), ("min_samples", min_samples), ("max_matvec", max_matvec)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}.")
    gen = torch.Generator().manual_seed(int(seed))
    groups = list(groups)
    device = torch.device(device)
    max_rank = min(n, 256) if max_rank is None else min(int(max_rank), n)
    sk = _Sketch(n, dtype, device, groups)
    used = 0  # products spent on residual samples

    def budget() -> int:
        return max_matvec - used - sk.cost

    growing = method == "hutch++"
    if growing:
        sk.grow(matmat, rademacher(min(block, n, max(1, budget() // 2)), n, gen, dtype, device))
        if sk.rank >= n or budget() <= 0:
            growing = False
    # residual samples: scalars, and while the sketch may still grow, the vectors to update them
    samples = torch.zeros(0, dtype=torch.float64)
    gsamples = torch.zeros(0, len(groups), dtype=torch.float64)
    zs: list[Tensor] = []
    azs: list[Tensor] = []
    last_projection = math.inf
    converged = False
    while True:
        low, group_low = sk.exact()
        if sk.rank >= n:  # Q spans everything: the trace is exact
            samples = torch.zeros(0, dtype=torch.float64)
            gsamples = torch.zeros(0, len(groups), dtype=torch.float64)
            converged = True
            break
        if budget() <= 0:
            break
        g = rademacher(min(block, budget()), n, gen, dtype, device)
        z = g
        if sk.rank:
            for _ in range(2):
                z = z - (z @ sk.Q.T) @ sk.Q
        az = matmat(z)
        used += z.shape[0]
        samples = torch.cat([samples, ((z * az).sum(1)).to(torch.float64)])
        gsamples = torch.cat([gsamples, _group_dots(z, az, groups, sk.Q)])
        if growing:
            zs.append(z)
            azs.append(az)
        estimate = low + float(samples.mean())
        se = _stderr(samples)
        if samples.numel() >= min_samples and se <= rtol * abs(estimate):
            converged = True
            break
        if not growing:
            continue
        # should the sketch grow? project the residual samples needed at this rank
        var = float(samples.var(correction=1)) if samples.numel() > 1 else math.inf
        needed = var / max((rtol * abs(estimate)) ** 2, 1e-300)
        projection = sk.cost + needed  # total products if the sketch stays as it is
        step = min(sk.rank, max_rank - sk.rank, max(0, (budget() - block) // 2))
        rest = n - sk.rank
        if max_rank >= n and 2 * rest <= min(needed - samples.numel(), budget()):
            step = rest  # a full sketch (then the trace is exact) costs less than the samples still needed
        elif needed <= 4 * sk.rank or projection >= last_projection or step < 1:
            growing, zs, azs = False, [], []  # balanced, or the last doubling did not pay
            continue
        last_projection = projection
        q_new, aq_new = sk.grow(matmat, rademacher(step, n, gen, dtype, device))
        if q_new.shape[0]:  # deflate the stored residual samples against the new directions
            z_all, az_all = torch.cat(zs), torch.cat(azs)
            c = z_all @ q_new.T
            z_all = z_all - c @ q_new
            az_all = az_all - c @ aq_new
            zs, azs = [z_all], [az_all]
            samples = (z_all * az_all).sum(1).to(torch.float64)
            gsamples = _group_dots(z_all, az_all, groups, sk.Q)
        if sk.rank >= n or sk.rank >= max_rank:
            growing, zs, azs = False, [], []
    low, group_low = sk.exact()
    value = low + (float(samples.mean()) if samples.numel() else 0.0)
    se = 0.0 if sk.rank >= n else _stderr(samples)
    if groups:
        gvals = group_low + (gsamples.mean(0) if samples.numel() else 0.0)
        if sk.rank >= n:
            gse = torch.zeros(len(groups), dtype=torch.float64)
        elif samples.numel() >= 2:
            gse = gsamples.std(0, correction=1) / math.sqrt(samples.numel())
        else:
            gse = torch.full((len(groups),), math.inf, dtype=torch.float64)
    else:
        gvals = gse = torch.zeros(0, dtype=torch.float64)
    return TraceEstimate(
        value=value,
        stderr=se,
        n_matvec=used + sk.cost,
        converged=converged,
        rank=sk.rank,
        low_rank=low,
        samples=samples,
        group_values=gvals,
        group_stderr=gse,
        group_samples=gsamples,
    )
