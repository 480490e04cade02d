"""Seeded random projections that are never stored whole: Johnson-Lindenstrauss sketches of gradients.

A per-example gradient of a large model has millions of coordinates, and a dense ``k x D`` projection
matrix to ``k`` dimensions would need ``4 k D`` bytes (terabytes at ``k = 8192`` for a 124M-parameter
model). Both projections here regenerate their random matrices from a seed, a piece at a time:

- :class:`RandomProjection` (``kind="dense"``): ``P = R / sqrt(k)`` with ``R`` a ``k x D`` matrix of
  independent Rademacher (+-1) or Gaussian entries (Johnson & Lindenstrauss 1984; Achlioptas 2003 for the
  +-1 entries). ``R`` is cut into *tiles*: the columns of each parameter tensor, in fixed runs of
  :func:`tile_columns` columns; tile ``t`` of parameter ``name`` is drawn from a ``torch.Generator`` seeded
  with a hash of ``(seed, name, t)``. The tiling depends only on ``k``, so the projection is the same
  whatever the memory budget, chunking or device, and the block of one parameter does not depend on which
  other parameters are selected. Tiles are generated in float32 on the CPU and cast, so a float64 model
  sees the same matrix as a float32 one.
- :class:`KroneckerProjection` (``kind="kronecker"``, LoGra; Choe et al. 2024): for a layer whose gradient
  is a matrix ``G`` (``out x in``), ``vec(P_out G P_in^T)`` with small seeded ``P_out`` (``k_o x out``) and
  ``P_in`` (``k_i x in``), each scaled by ``1/sqrt(k)``. For a Linear layer ``G = sum_t delta_t a_t^T``, so
  the projected gradient is ``sum_t (P_out delta_t)(P_in a_t)^T`` and the per-example gradient is never
  formed.

Both are unbiased for inner products: ``E[<P a, P b>] = <a, b>``. For the dense projection with
Rademacher entries, ``Var[<P a, P b>] = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / k`` (Gaussian:
without the last term), and norms are preserved within ``1 +- eps`` with probability ``>= 1 - 2 exp(-k
(eps^2/2 - eps^3/3) / 2)`` (Dasgupta & Gupta 2003).

Example:
    >>> proj = RandomProjection({"w": 1000}, dim=256, seed=0)
    >>> g = {"w": torch.randn(3, 1000)}
    >>> proj.project(g).shape
    torch.Size([3, 256])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor

from gradsense.core.batching import parse_memory
from gradsense.core.checks import check_positive_int

__all__ = [
    "KroneckerProjection",
    "RandomProjection",
    "jl_failure_probability",
    "split_dim",
    "tile_columns",
    "tile_seed",
]

Distribution = Literal["rademacher", "gaussian"]

#: Entries of one generated tile (16 MiB of float32); the tiling depends on ``k`` only.
TILE_ENTRIES = 1 << 22


def tile_columns(dim: int) -> int:
    """Columns of ``R`` per tile for projection dimension ``dim`` (a function of ``dim`` alone)."""
    return max(1, TILE_ENTRIES // max(int(dim), 1))


def tile_seed(seed: int, name: str, index: int | str) -> int:
    """A 63-bit generator seed from ``(seed, name, index)`` (SHA-256, stable across runs and platforms)."""
    digest = hashlib.sha256(f"gradsense-projection:{int(seed)}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(shape: tuple[int, int], seed: int, distribution: Distribution) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    out = torch.empty(shape, dtype=torch.float32).random_(0, 2, generator=gen)  # 6x faster than bernoulli_
    return out.mul_(2.0).sub_(1.0)


def _check_distribution(distribution: str) -> Distribution:
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}.")
    return distribution  # type: ignore[return-value]


def jl_failure_probability(dim: int, eps: float) -> float:
    """Upper bound on ``P(| |P x|^2 / |x|^2 - 1 | > eps)`` for one vector (Dasgupta & Gupta 2003)."""
    return min(1.0, 2.0 * math.exp(-dim * (eps**2 / 2 - eps**3 / 3) / 2))


class RandomProjection:
    """A seeded ``k x D`` Johnson-Lindenstrauss projection of named blocks, generated tile by tile.

    Args:
        sizes: ``{block name: number of coordinates}`` in flat order (e.g. parameter names and numels).
        dim: Projection dimension ``k``.
        seed: Seed; the same seed, dimension and block names give the same projection.
        distribution: ``"rademacher"`` (+-1 entries, the default) or ``"gaussian"``.
        cache: Memory budget for keeping generated tiles between calls (bytes or a size string; ``0``
            regenerates every tile on every call). Tiles that do not fit are regenerated.

    Raises:
        ValueError: Empty ``sizes``, a non-positive size or dimension, an unknown distribution.
    """

    def __init__(self, sizes: Mapping[str, int], dim: int, *, seed: int = 0,
                 distribution: Distribution = "rademacher", cache: int | str = 0) -> None:
        if not sizes:
            raise ValueError("RandomProjection needs at least one block.")
        self.sizes = {str(k): int(v) for k, v in sizes.items()}
        if any(v < 1 for v in self.sizes.values()):
            raise ValueError(f"block sizes must be positive, got {self.sizes}.")
        self.dim = check_positive_int(dim, "proj_dim")
        self.seed = int(seed)
        self.distribution = _check_distribution(distribution)
        self.columns = tile_columns(self.dim)
        self._cache_budget = 0 if cache in (0, "0") else parse_memory(cache)
        self._cache: dict[tuple[str, int], Tensor] = {}
        self._cached_bytes = 0
        self.tiles_generated = 0

    @property
    def input_dim(self) -> int:
        """``D``, the number of coordinates projected."""
        return sum(self.sizes.values())

    @property
    def scale(self) -> float:
        """``1/sqrt(k)``, so that ``E[P^T P] = I``."""
        return 1.0 / math.sqrt(self.dim)

    def describe(self) -> dict[str, object]:
        """What defines the projection (stored in results so a run can be repeated)."""
        return {"kind": "dense", "dim": self.dim, "seed": self.seed, "distribution": self.distribution,
                "tile_columns": self.columns, "input_dim": self.input_dim}

    def tiles(self, name: str) -> Iterator[tuple[slice, int]]:
        """``(column slice within the block, tile index)`` for every tile of block ``name``."""
        n = self.sizes[name]
        for t, start in enumerate(range(0, n, self.columns)):
            yield slice(start, min(start + self.columns, n)), t

    def tile(self, name: str, index: int, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> Tensor:
        """Tile ``index`` of block ``name``: the ``k x cols`` piece of ``R`` (entries +-1 or N(0,1), unscaled)."""
        key = (name, index)
        cached = self._cache.get(key)
        if cached is not None:
            return cached.to(device=device, dtype=dtype)
        n = self.sizes[name]
        cols = min(self.columns, n - index * self.columns)
        if cols <= 0:
            raise IndexError(f"block {name!r} has no tile {index}.")
        r = _draw((self.dim, cols), tile_seed(self.seed, name, index), self.distribution)
        self.tiles_generated += 1
        nbytes = r.numel() * r.element_size()
        if self._cached_bytes + nbytes <= self._cache_budget:
            self._cache[key] = r
            self._cached_bytes += nbytes
        return r.to(device=device, dtype=dtype)

    def project(self, blocks: Mapping[str, Tensor], *, accumulate: Tensor | None = None) -> Tensor:
        """Project rows given block by block: ``sum_b (x_b R_b^T) / sqrt(k)``.

        Args:
            blocks: ``{block name: (n, *shape)}`` for some or all blocks (missing blocks count as zero);
                each row is flattened.
            accumulate: Optional ``(n, k)`` tensor to add into (returned).

        Returns:
            ``(n, k)`` projected rows, in the dtype and on the device of the inputs.

        Raises:
            ValueError: An unknown block name, or a block whose size does not match.
        """
        out = accumulate
        for name, x in blocks.items():
            if name not in self.sizes:
                raise ValueError(f"project: unknown block {name!r}; known: {list(self.sizes)[:8]}.")
            flat = x.reshape(x.shape[0], -1)
            if flat.shape[1] != self.sizes[name]:
                raise ValueError(f"project: block {name!r} has {flat.shape[1]} coordinates per row, "
                                 f"expected {self.sizes[name]}.")
            if out is None:
                out = torch.zeros(flat.shape[0], self.dim, dtype=flat.dtype, device=flat.device)
            for cols, t in self.tiles(name):
                r = self.tile(name, t, dtype=flat.dtype, device=flat.device)
                out.addmm_(flat[:, cols], r.T, alpha=self.scale)
        if out is None:
            raise ValueError("project: no blocks given.")
        return out

    def project_flat(self, rows: Tensor) -> Tensor:
        """Project ``(n, D)`` rows laid out block after block in the order of ``sizes``."""
        if rows.ndim != 2 or rows.shape[1] != self.input_dim:
            raise ValueError(f"project_flat: expected (n, {self.input_dim}) rows, got {tuple(rows.shape)}.")
        parts = torch.split(rows, list(self.sizes.values()), dim=1)
        return self.project(dict(zip(self.sizes, parts)))

    def dense(self) -> Tensor:
        """The whole ``k x D`` matrix ``P`` (scaled, float64), for tests on small sizes only.

        Raises:
            ValueError: If ``k * D`` exceeds 5e7 entries.
        """
        if self.dim * self.input_dim > 5e7:
            raise ValueError(f"dense() refuses a {self.dim} x {self.input_dim} matrix; use project().")
        cols = [self.tile(n, t, dtype=torch.float64) for n in self.sizes for _, t in self.tiles(n)]
        return torch.cat(cols, dim=1) * self.scale


def split_dim(total: int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Share a total projection dimension between layers as near-square ``k_out x k_in`` per layer.

    Each of the ``L`` layers gets about ``total / L`` dimensions, factored as ``k_o x k_i`` with ``k_o <= out``
    and ``k_i <= in`` (a layer smaller than its share keeps its full size).

    Args:
        total: Total dimension (``>= L``).
        shapes: ``{layer: (out, in)}`` gradient-matrix shapes.

    Returns:
        ``{layer: (k_out, k_in)}``; ``sum k_out k_in <= total``.

    Raises:
        ValueError: Fewer dimensions than layers.
    """
    n = len(shapes)
    if total < n:
        raise ValueError(f"proj_dim={total} is smaller than the number of layers ({n}); use at least {n}.")
    out: dict[str, tuple[int, int]] = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        share = total // n + (1 if i < total % n else 0)
        k_o = max(1, min(rows, math.isqrt(share)))
        k_i = max(1, min(cols, share // k_o))
        k_o = max(1, min(rows, share // k_i))
        out[name] = (k_o, k_i)
    return out


class KroneckerProjection:
    """Per-layer Kronecker-factored projections ``G -> vec(P_out G P_in^T)`` (LoGra, Choe et al. 2024).

    Args:
        shapes: ``{layer: (out, in)}``: each layer's gradient matrix shape (``in`` includes a bias column).
        dims: ``{layer: (k_out, k_in)}`` (see :func:`split_dim`).
        seed: Seed; ``P_out``/``P_in`` of layer ``name`` come from ``(seed, name, "out"/"in")``.
        distribution: ``"rademacher"`` or ``"gaussian"``.

    Raises:
        ValueError: Mismatched layers, dimensions larger than the matrix, an unknown distribution.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], dims: Mapping[str, tuple[int, int]], *,
                 seed: int = 0, distribution: Distribution = "rademacher") -> None:
        if set(shapes) != set(dims):
            raise ValueError("KroneckerProjection: shapes and dims must name the same layers.")
        self.shapes = {k: (int(v[0]), int(v[1])) for k, v in shapes.items()}
        self.dims = {k: (int(dims[k][0]), int(dims[k][1])) for k in shapes}
        for k, (ko, ki) in self.dims.items():
            o, i = self.shapes[k]
            if not (1 <= ko <= o and 1 <= ki <= i):
                raise ValueError(f"layer {k!r}: projection {ko}x{ki} does not fit its {o}x{i} gradient.")
        self.seed = int(seed)
        self.distribution = _check_distribution(distribution)
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        """Total projected dimension ``sum_l k_out k_in``."""
        return sum(a * b for a, b in self.dims.values())

    def describe(self) -> dict[str, object]:
        """What defines the projection (stored in results)."""
        return {"kind": "kronecker", "dim": self.dim, "seed": self.seed, "distribution": self.distribution,
                "layers": {k: list(v) for k, v in self.dims.items()}}

    def offsets(self) -> dict[str, slice]:
        """Columns of each layer in the projected vector."""
        out, pos = {}, 0
        for k, (a, b) in self.dims.items():
            out[k] = slice(pos, pos + a * b)
            pos += a * b
        return out

    def factors(self, name: str, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(P_out, P_in)`` of layer ``name``, each scaled by ``1/sqrt`` of its rows."""
        if name not in self._factors:
            (o, i), (ko, ki) = self.shapes[name], self.dims[name]
            p_out = _draw((ko, o), tile_seed(self.seed, name, "out"), self.distribution) / math.sqrt(ko)
            p_in = _draw((ki, i), tile_seed(self.seed, name, "in"), self.distribution) / math.sqrt(ki)
            self._factors[name] = (p_out, p_in)
        p_out, p_in = self._factors[name]
        return p_out.to(device=device, dtype=dtype), p_in.to(device=device, dtype=dtype)

    def project_matrix(self, name: str, g: Tensor) -> Tensor:
        """``(n, out, in)`` gradient matrices of layer ``name`` -> ``(n, k_out * k_in)``."""
        p_out, p_in = self.factors(name, dtype=g.dtype, device=g.device)
        return torch.einsum("ao,noi,bi->nab", p_out, g, p_in).reshape(g.shape[0], -1)

    def project_outer(self, name: str, delta: Tensor, a: Tensor) -> Tensor:
        """``sum_t (P_out delta_t)(P_in a_t)^T`` for ``delta`` ``(n, T, out)`` and ``a`` ``(n, T, in)``."""
        p_out, p_in = self.factors(name, dtype=delta.dtype, device=delta.device)
        return torch.einsum("nta,ntb->nab", delta @ p_out.T, a @ p_in.T).reshape(delta.shape[0], -1)

    def dense(self, name: str) -> Tensor:
        """The ``(k_out k_in) x (out in)`` matrix ``P_out kron P_in`` of one layer, float64 (tests only)."""
        p_out, p_in = self.factors(name, dtype=torch.float64)
        return torch.kron(p_out, p_in)
