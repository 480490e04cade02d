"""Zeroth-order gradient estimates: gradients of a black box from forward passes only.

Two-point (central-difference) random-direction estimator (Nesterov & Spokoiny 2017; the SPSA family of
Spall 1992). With directions ``u_j``:

    d_j = (f(theta + mu u_j) - f(theta - mu u_j)) / (2 mu)         (a directional derivative)
    g_hat = (1/q) sum_j d_j u_j

For Gaussian ``u ~ N(0, I)`` (or Rademacher signs), ``E[u u^T] = I`` so ``E[g_hat] = grad f + O(mu^2)``; on a
quadratic ``d_j = grad f . u_j`` exactly. The variance per coordinate is about ``||grad f||^2 / q``: these
estimates are only useful aggregated (ECoFLaP sums them over a layer). The ``2q`` evaluations are a batch
dimension: ``torch.func.vmap`` runs the perturbed parameter sets through the model together, in chunks under a
memory budget.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor
from torch.func import vmap

from gradsense.core.batching import chunk_size_for, chunks

__all__ = ["ZerothOrderEstimate", "vmap_failure", "zeroth_order_grad"]

Params = dict[str, Tensor]

_VMAP_MARKERS = ("vmap", "batching rule", "batched tensor", "functorch", "data-dependent")


def vmap_failure(err: BaseException) -> bool:
    """Whether ``err`` is ``torch.func.vmap`` refusing an op (then a one-at-a-time loop is the fallback), as
    opposed to an error of the model itself (which is re-raised, not retried)."""
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(m in text for m in _VMAP_MARKERS)


@dataclasses.dataclass(frozen=True)
class ZerothOrderEstimate:
    """A zeroth-order gradient estimate with what it was made of.

    Attributes:
        grad: The estimate ``g_hat`` as ``{name: tensor}``.
        directional: ``(q,)`` central-difference directional derivatives ``d_j``.
        n_forward: Evaluations of ``f`` used (``2 q``).
        mu: The smoothing radius.
    """

    grad: dict[str, Tensor]
    directional: Tensor
    n_forward: int
    mu: float


def _directions(params: Mapping[str, Tensor], q: int, gen: torch.Generator, kind: str) -> dict[str, Tensor]:
    out = {}
    for name, p in params.items():
        if kind == "gaussian":
            u = torch.randn((q, *p.shape), generator=gen, dtype=torch.float64)
        else:
            u = 2.0 * torch.randint(0, 2, (q, *p.shape), generator=gen, dtype=torch.int8).to(torch.float64) - 1.0
        out[name] = u.to(device=p.device, dtype=p.dtype)
    return out


def zeroth_order_grad(
    f: Callable[[Params], Tensor],
    params: Mapping[str, Tensor],
    *,
    probes: int = 16,
    mu: float = 1e-3,
    seed: int = 0,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> ZerothOrderEstimate:
    """Estimate ``grad f(params)`` from ``2 * probes`` evaluations of ``f`` (no backward pass).

    Args:
        f: ``params -> scalar``, a pure function (e.g. the mean loss of a functional model over a dataset).
            It is evaluated under ``torch.func.vmap`` over the probes; if that fails (an op without a batching
            rule) the probes are evaluated one at a time, with a warning.
        params: The point, ``{name: tensor}``.
        probes: Number of random directions ``q``.
        mu: Smoothing radius (the step of the central difference).
        seed: Seed of the CPU generator of the directions.
        distribution: ``"gaussian"`` (``N(0, I)``) or ``"rademacher"`` (random signs).
        chunk_size: Perturbed parameter sets per vmap call (default: from the memory budget).
        max_memory: Memory budget of one call (bytes or e.g. ``"1GB"``).

    Returns:
        A :class:`ZerothOrderEstimate`.

    Raises:
        ValueError: ``probes`` < 1, ``mu`` not positive, unknown ``distribution``, or empty ``params``.

    Example:
        >>> a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
        >>> est = zeroth_order_grad(lambda p: (a * p["x"]).sum(), {"x": torch.zeros(3, dtype=torch.float64)},
        ...                         probes=4000, seed=0)
        >>> bool((est.grad["x"] - a).abs().max() < 0.3), est.n_forward
        (True, 8000)
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}.")
    if not (isinstance(mu, (int, float)) and mu > 0):
        raise ValueError(f"mu must be a positive number, got {mu!r}.")
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}.")
    if not params:
        raise ValueError("params is empty: nothing to differentiate.")
    base = {k: v.detach() for k, v in params.items()}
    gen = torch.Generator().manual_seed(int(seed))
    u = _directions(base, probes, gen, distribution)
    numel = sum(p.numel() for p in base.values())
    item = next(iter(base.values())).element_size()
    if chunk_size is None:
        size = chunk_size_for(8 * numel * item, max_memory=max_memory, total=probes)
    else:
        size = chunk_size_for(1, chunk_size=chunk_size, total=probes)
    batched = vmap(f)
    d = torch.empty(probes, dtype=torch.float64)
    use_vmap = True
    with torch.no_grad():
        for sl in chunks(probes, size):
            plus = {k: base[k].unsqueeze(0) + mu * u[k][sl] for k in base}
            minus = {k: base[k].unsqueeze(0) - mu * u[k][sl] for k in base}
            if use_vmap:
                try:
                    fp, fmi = batched(plus), batched(minus)
                except (RuntimeError, NotImplementedError) as err:
                    if not vmap_failure(err):
                        raise
                    warnings.warn(
                        f"zeroth_order_grad: evaluating the probes under vmap failed ({type(err).__name__}: "
                        f"{str(err)[:100]}); evaluating one probe at a time.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    use_vmap = False
            if not use_vmap:
                m = sl.stop - sl.start
                fp = torch.stack([f({k: v[i] for k, v in plus.items()}).reshape(()) for i in range(m)])
                fmi = torch.stack([f({k: v[i] for k, v in minus.items()}).reshape(()) for i in range(m)])
            d[sl] = ((fp.reshape(-1) - fmi.reshape(-1)) / (2 * mu)).to(torch.float64)
    coeff = d.to(next(iter(base.values())).dtype)
    g = {k: torch.einsum("q,q...->...", coeff.to(u[k].device), u[k]) / probes for k in base}
    return ZerothOrderEstimate(grad=g, directional=d, n_forward=2 * probes, mu=float(mu))
