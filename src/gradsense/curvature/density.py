"""Spectral density of the loss Hessian by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``steps`` Lanczos steps give Gauss quadrature nodes ``theta_i`` and weights
``w_i = s_{0i}^2`` with ``sum_i w_i f(theta_i) ~ v^T f(H) v``; averaged over Rademacher probes this
estimates ``tr(f(H)) / n``, i.e. integrates ``f`` against the spectral density. Broadening each node
into a Gaussian of width ``sigma`` gives a smooth density (Lin, Saad & Yang 2016, "Approximating spectral
densities of large matrices"; Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net
Optimization via Hessian Eigenvalue Density"). All probes (and, with ``per=``, all groups) run in lockstep,
so each Lanczos step is one vmap-batched block of Hessian-vector products.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.batching import available_memory, parse_memory
from gradsense.core.distributed import DataLike
from gradsense.core.functional import ParamSpec, model_fingerprint
from gradsense.curvature.engine import Kind, PerSpec, RowProducts, draw_seed, operator, parameter_groups
from gradsense.curvature.hutchpp import rademacher
from gradsense.curvature.lanczos import LanczosQuadrature, drive
from gradsense.results.curvature import DensityResult

__all__ = ["gaussian_density", "spectral_density"]


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Average over probes of ``sum_i w_i N(grid; theta_i, sigma^2)``.

    Args:
        nodes: ``(probes, steps)`` quadrature nodes.
        weights: ``(probes, steps)`` weights (each row sums to 1).
        grid: ``(g,)`` evaluation points.
        sigma: Standard deviation of each Gaussian (> 0).

    Returns:
        ``(g,)`` float64 density; it integrates to 1 when the grid covers the nodes with a margin.
    """
    th = nodes.reshape(-1).to(torch.float64)
    w = weights.reshape(-1).to(torch.float64) / nodes.shape[0]
    z = (grid.to(torch.float64)[:, None] - th[None, :]) / sigma
    return (torch.exp(-0.5 * z * z) @ w) / (sigma * math.sqrt(2 * math.pi))


def _waves(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Pack solver indices into consecutive waves whose memory sums stay within ``budget``."""
    waves: list[list[int]] = [[]]
    used = 0
    for i, s in enumerate(sizes):
        if waves[-1] and used + s > budget:
            waves.append([])
            used = 0
        waves[-1].append(i)
        used += s
    return waves


def spectral_density(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: DataLike,
    *,
    steps: int = 80,
    probes: int = 4,
    seed: int | None = None,
    params: ParamSpec = None,
    per: PerSpec = None,
    kind: Kind = "hessian",
    sigma: float | None = None,
    grid_points: int = 2001,
    reorthogonalize: bool | None = None,
    max_memory: int | str | None = None,
    batch_size: int = 256,
    probe_batch: int | None = None,
    cache_graph: bool | None = None,
    name: str | None = None,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature, Gaussian-broadened.

    Args:
        model: The module (never modified). BatchNorm/Dropout must be in eval mode.
        loss_fn: ``(output, labels) -> scalar``, the mean loss of a batch.
        data: ``(inputs, labels)``, a Dataset or a DataLoader (the Hessian of the average loss over all of it).
        steps: Lanczos steps per probe (= products per probe); moments up to degree ``2 * steps - 1`` of
            each probe's spectral measure are exact.
        probes: Number of Rademacher probes (their results are averaged).
        seed: Seed of the probes (CPU generator); ``None`` draws one (recorded in the result).
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`).
        per: Also the density of each diagonal block ``H_ll``: ``"layer"``, ``"block"``, ``"parameter"`` or
            ``{name: ParamSpec}``; each group's probes are the global probes restricted to the group.
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        sigma: Gaussian broadening (default ``0.002 * (max - min)`` of the nodes; Ghorbani et al. use
            ``sigma^2 = 1e-5`` on a spectrum scaled to ``[-1, 1]``, about the same).
        grid_points: Points of the evaluation grid, which spans the nodes plus ``6 sigma`` on each side.
        reorthogonalize: Full reorthogonalisation of the Lanczos vectors. ``None``: on when the bases fit in
            ``max_memory`` (probes are then run in waves that fit), else off with a warning.
        max_memory: Memory for the Lanczos bases (default: a quarter of free memory, at most 2 GiB).
        batch_size: Batch size for tensors and Datasets.
        probe_batch: Vectors per vmap call (default from the memory budget, at most 8).
        cache_graph: Keep each batch's gradient graph and make every product one reverse pass through
            it (about 2 U instead of 3.5-4 U; see :class:`~gradsense.curvature.engine.RowProducts`).
            ``None``: when it fits in a quarter of free memory; ``False``: forward-over-reverse every time.
        name: Model name for the result's metadata.

    Returns:
        A :class:`~gradsense.results.curvature.DensityResult` with ``.grid``, ``.density``,
        ``.ritz_values``, ``.weights``, ``.n_hvp`` (``steps * probes``, times ``1 + groups`` with ``per``).

    Raises:
        TypeError: ``model`` is not an nn.Module, ``loss_fn`` is not callable, or a bad ``seed``.
        ValueError: Bad ``steps``/``probes``/``sigma``/``grid_points``, ``params`` that select nothing, a
            train-mode model with BatchNorm/Dropout, data with no batches, a ``loss_fn`` that does not
            return a scalar, or inputs that do not fit the model or hold NaN/Inf.

    References:
        Lin, Saad & Yang 2016, *Approximating spectral densities of large matrices*; Ghorbani, Krishnan &
        Xiao 2019, *An Investigation into Neural Net Optimization via Hessian Eigenvalue Density*.

    Example:
        >>> import gradsense as gs
        >>> model, digits = gs.zoo.load("digits-cnn"), gs.zoo.dataset("digits", split="test")
        >>> d = gs.spectral_density(model, gs.losses.cross_entropy, digits[:64], steps=20, probes=1, seed=0)
        >>> d.ritz_values.shape
        torch.Size([1, 20])
    """
    t0 = time.perf_counter()
    for what, val in (("steps", steps), ("probes", probes), ("grid_points", grid_points)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{what} must be a positive int, got {val!r}.")
    if grid_points < 3:
        raise ValueError(f"grid_points must be >= 3, got {grid_points}.")
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}.")
    seed = draw_seed(seed, shared=True)
    op = operator(model, loss_fn, data, params=params, kind=kind, batch_size=batch_size)
    n = op.numel
    groups = parameter_groups(model, op.params, per)
    products = RowProducts(op, probe_batch=probe_batch, cache_graph=cache_graph)
    gen = torch.Generator().manual_seed(seed)
    starts = rademacher(probes, n, gen, op.dtype, op.device)
    index: list[Tensor | None] = [None] * probes
    vectors = list(starts)
    for idx in groups.index:
        idx = idx.to(op.device)
        for p in range(probes):
            index.append(idx)
            vectors.append(starts[p, idx])
    # memory of the bases: waves of solvers that fit, or no reorthogonalisation
    budget = (parse_memory(max_memory) if max_memory is not None
              else min(2 * 1024**3, available_memory(op.device) // 4))
    item = starts.element_size()
    sizes = [min(steps, v.numel()) * v.numel() * item for v in vectors]
    reorth = reorthogonalize
    if reorth is None:
        reorth = max(sizes) <= budget
        if not reorth:
            warnings.warn(
                f"spectral_density: one Lanczos basis needs {max(sizes) / 2**20:.0f} MiB, more than max_memory; "
                "running without reorthogonalisation (the quadrature stays accurate; spurious copies of outlier "
                "eigenvalues may appear). Pass max_memory to change this.",
                RuntimeWarning,
                stacklevel=2,
            )
    waves = _waves(sizes, budget) if reorth else [list(range(len(vectors)))]
    runs = [LanczosQuadrature(v, steps=steps, reorthogonalize=bool(reorth)) for v in vectors]

    try:
        for wave in waves:
            def embed(i: int, v: Tensor, wave: list[int] = wave) -> Tensor:
                idx = index[wave[i]]
                if idx is None:
                    return v
                row = v.new_zeros(n)
                row[idx] = v
                return row

            def extract(i: int, row: Tensor, wave: list[int] = wave) -> Tensor:
                idx = index[wave[i]]
                return row if idx is None else row[idx]

            drive([runs[i] for i in wave], products, embed, extract)
    finally:
        products.release()

    def stack(sel: list[LanczosQuadrature]) -> tuple[Tensor, Tensor]:
        width = max(r.steps for r in sel)
        nodes = torch.zeros(len(sel), width, dtype=torch.float64)
        weights = torch.zeros_like(nodes)
        for i, r in enumerate(sel):
            th, w = r.nodes_weights()
            nodes[i, : th.numel()], weights[i, : th.numel()] = th, w
            nodes[i, th.numel() :] = th[-1]
        return nodes, weights

    nodes, weights = stack(runs[:probes])
    group_nw = [stack(runs[probes + g * probes : probes + (g + 1) * probes]) for g in range(len(groups))]
    alive = [nodes[weights > 0]] + [nd[w > 0] for nd, w in group_nw]
    lo = min(float(a.min()) for a in alive)
    hi = max(float(a.max()) for a in alive)
    if sigma is None:
        sigma = 0.002 * (hi - lo) if hi > lo else 1e-3 * max(abs(hi), 1e-12)
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_points, dtype=torch.float64)
    tensors: dict[str, Tensor] = {
        "grid": grid,
        "density": gaussian_density(nodes, weights, grid, sigma),
        "ritz_values": nodes,
        "weights": weights,
        "sigma": torch.tensor(float(sigma), dtype=torch.float64),
    }
    if len(groups):
        width = max(nd.shape[1] for nd, _ in group_nw)

        def pad(t: Tensor, fill_last: bool) -> Tensor:
            if t.shape[1] == width:
                return t
            extra = t[:, -1:].expand(-1, width - t.shape[1]) if fill_last else t.new_zeros(t.shape[0], width - t.shape[1])
            return torch.cat([t, extra], dim=1)

        tensors.update(
            group_density=torch.stack([gaussian_density(nd, w, grid, sigma) for nd, w in group_nw]),
            group_ritz_values=torch.stack([pad(nd, True) for nd, _ in group_nw]),
            group_weights=torch.stack([pad(w, False) for _, w in group_nw]),
            group_numel=torch.tensor(groups.numel, dtype=torch.long),
        )
    return DensityResult.build(
        tensors,
        method="slq",
        settings={"steps": steps, "probes": probes, "kind": kind, "sigma": float(sigma),
                  "per": per if isinstance(per, (str, type(None))) else "custom", "batch_size": batch_size},
        model=model_fingerprint(model, name),
        seed=seed,
        wall_time_s=time.perf_counter() - t0,
        n_hvp=products.n_hvp,
        reorthogonalized=bool(reorth),
        hvp="cached-graph" if products.cached else "forward-over-reverse",
        n_examples=op.total,
        numel=n,
        param_names=list(op.params),
        groups=groups.names,
        group_members=groups.members,
    )
