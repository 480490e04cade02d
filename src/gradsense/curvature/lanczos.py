"""Lanczos on any symmetric linear operator given as a product with a block of row vectors.

Nothing here knows about models: the operator is a callable ``matmat(rows) -> rows`` that applies a
symmetric ``n x n`` matrix to each row of an ``(m, n)`` tensor (a Hessian-vector product per row, or
``rows @ A`` for an explicit matrix). Two solvers, both written as *reverse-communication* state
machines (they say which vector they need multiplied next, and are fed the product), so that
:func:`drive` can run many of them in lockstep and hand the operator one block of vectors per round
- the probe dimension becomes a vmap batch dimension instead of a Python loop:

- :class:`ThickRestartLanczos`: extreme eigenpairs (largest, smallest or both ends) by Lanczos with
  full reorthogonalisation (classical Gram-Schmidt, repeated when the norm drops: "twice is enough",
  Daniel, Gragg, Kaufman & Stewart 1976) and thick restarts in Krylov-Schur form (Wu & Simon 2000;
  Stewart 2001). It stops on the Ritz residual ``||A y - theta y|| <= tol * |theta|``, read at no cost
  from the Lanczos relation ``A V = V T + f e_j^T`` as ``||f|| * |s_j|``.
- :class:`LanczosQuadrature`: a fixed number of Lanczos steps from one start vector, giving the nodes
  and weights of the Gauss quadrature of the spectral measure seen from that vector (Golub & Meurant
  2010), the building block of stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ubaru, Chen & Saad
  2017; Ghorbani, Krishnan & Xiao 2019).

Example:
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> out = lanczos_eigs(lambda rows: rows @ A, 100, k=2, tol=1e-10, seed=0)
    >>> [round(v, 6) for v in out.eigenvalues.tolist()]
    [100.0, 99.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EigenPairs",
    "LanczosQuadrature",
    "ThickRestartLanczos",
    "drive",
    "lanczos_eigs",
    "lanczos_quadrature",
]

MatMat = Callable[[Tensor], Tensor]
Which = Literal["largest", "smallest", "both"]
_WHICH = ("largest", "smallest", "both")


def _breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size below which a Lanczos residual counts as zero (an invariant subspace)."""
    return float(torch.finfo(dtype).eps) ** 0.75


def _orthogonalize(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Remove from ``w`` its components along the orthonormal rows of ``basis``.

    Classical Gram-Schmidt, repeated once when the norm drops by more than ``1/sqrt(2)`` (DGKS 1976).

    Returns:
        ``(w_orthogonal, coefficients)`` where ``coefficients = basis @ w`` (accumulated over both passes).
    """
    if basis.shape[0] == 0:
        return w, w.new_zeros(0)
    norm0 = torch.linalg.vector_norm(w)
    h = basis @ w
    w = w - h @ basis
    if torch.linalg.vector_norm(w) < 0.7071 * norm0:
        h2 = basis @ w
        w = w - h2 @ basis
        h = h + h2
    return w, h


class _Solver(Protocol):
    done: bool

    def request(self) -> Tensor: ...

    def receive(self, product: Tensor) -> None: ...


def drive(solvers: Sequence[_Solver], matmat: MatMat, embed: Callable[[int, Tensor], Tensor] | None = None,
          extract: Callable[[int, Tensor], Tensor] | None = None) -> None:
    """Run reverse-communication solvers in lockstep, one ``matmat`` call per round.

    Each round collects the vector every unfinished solver asks for, stacks them into one block, applies
    the operator once to the block and hands each solver its product.

    Args:
        solvers: Objects with ``done``, ``request()`` and ``receive(product)``.
        matmat: The operator on a block of rows ``(m, n) -> (m, n)``.
        embed: ``(solver index, vector) -> row of the operator's space`` (default: the vector itself),
            e.g. to place a vector of one parameter block into the full parameter space.
        extract: ``(solver index, product row) -> what that solver receives`` (default: the row).
    """
    while True:
        active = [i for i, s in enumerate(solvers) if not s.done]
        if not active:
            return
        rows = [solvers[i].request() for i in active]
        if embed is not None:
            rows = [embed(i, r) for i, r in zip(active, rows)]
        products = matmat(torch.stack(rows))
        for i, p in zip(active, products):
            solvers[i].receive(extract(i, p) if extract is not None else p)


# ------------------------------------------------------------------------------------------ eigenpairs
@dataclasses.dataclass(frozen=True)
class EigenPairs:
    """Extreme eigenpairs found by :class:`ThickRestartLanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 Ritz values: for ``"largest"`` in descending order, for
            ``"smallest"`` ascending, for ``"both"`` the ``k`` largest (descending) then the ``k``
            smallest (ascending).
        eigenvectors: ``(k, n)`` orthonormal Ritz vectors as rows (the operator's dtype and device).
        residuals: ``(k,)`` float64 residual norms ``||A y - theta y||`` (unit ``y``).
        converged: ``(k,)`` bool, whether each pair met the tolerance.
        n_matvec: Operator-vector products used.
        restarts: Number of thick restarts.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    n_matvec: int
    restarts: int


class ThickRestartLanczos:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos (reverse communication).

    Keeps an orthonormal basis ``V`` (rows) and the projected matrix ``T = V A V^T``. Each product
    ``A v`` is orthogonalised against the whole basis (full reorthogonalisation), its coefficients fill
    a column of ``T``, and the Ritz pairs of ``T`` are checked after every product. When the basis is
    full, the wanted Ritz vectors and some neighbours are kept and the rest discarded (a thick restart,
    Wu & Simon 2000), which keeps memory at ``basis_size`` vectors.

    A Ritz pair ``(theta, y)`` is converged when ``||A y - theta y|| <= tol * max(|theta|, floor * s)``,
    where ``s`` is the largest ``|theta|`` seen: the ``floor`` (default ``sqrt(eps)`` of the dtype) keeps
    eigenvalues that are tiny next to the spectral norm from being asked for a relative accuracy the
    arithmetic cannot give.

    Args:
        start: ``(n,)`` start vector (any nonzero vector; normalised here). Its dtype and device are used.
        k: Number of eigenpairs wanted (at each end for ``which="both"``).
        which: ``"largest"``/``"smallest"`` (algebraic) or ``"both"``.
        tol: Relative residual tolerance.
        basis_size: Maximum number of basis vectors (memory: ``basis_size * n`` numbers).
        max_matvec: Give up (not converged) after this many products.
        generator: CPU generator for a fresh direction after an (unlikely) invariant subspace.
        floor: See above; ``None`` means ``sqrt(eps)`` of ``start``'s dtype.

    Raises:
        ValueError: Bad ``k``, ``which``, ``tol``, ``basis_size`` or a zero start vector.
    """

    def __init__(
        self,
        start: Tensor,
        *,
        k: int = 1,
        which: Which = "largest",
        tol: float = 1e-3,
        basis_size: int = 20,
        max_matvec: int = 500,
        generator: torch.Generator | None = None,
        floor: float | None = None,
    ) -> None:
        if which not in _WHICH:
            raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}.")
        n = start.numel()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n:
            raise ValueError(f"k must be an int in [1, {n}] (the dimension), got {k!r}.")
        if not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}.")
        self.n, self.k, self.which, self.tol = n, k, which, float(tol)
        self.k_total = 2 * k if which == "both" else k
        self.m = int(min(n, max(basis_size, min(self.k_total, n) + 2)))
        self.max_matvec = int(max_matvec)
        self.generator = generator
        self.floor = float(torch.finfo(start.dtype).eps) ** 0.5 if floor is None else float(floor)
        self._breakdown = _breakdown_tol(start.dtype)
        norm = torch.linalg.vector_norm(start)
        if not bool(norm > 0) or not bool(torch.isfinite(norm)):
            raise ValueError("the Lanczos start vector must be finite and nonzero.")
        self.V = start.new_zeros((self.m, n))
        self.V[0] = start.reshape(-1) / norm
        self.T = np.zeros((self.m, self.m))
        self.j = 1
        self.n_matvec = 0
        self.restarts = 0
        self.scale = 0.0
        self.done = False
        self.result: EigenPairs | None = None

    # ------------------------------------------------------------------ selection of Ritz values
    def _order(self, theta: np.ndarray, count: int) -> np.ndarray:
        """Indices of the wanted end(s) of ``theta`` (ascending array), ``count`` per end, best first."""
        desc, asc = np.arange(len(theta))[::-1], np.arange(len(theta))
        if self.which == "largest":
            return desc[:count]
        if self.which == "smallest":
            return asc[:count]
        return np.concatenate([desc[:count], asc[:count]])

    def request(self) -> Tensor:
        """The basis vector whose product with the operator is needed next."""
        if self.done:
            raise RuntimeError("the solver has finished; read .result.")
        return self.V[self.j - 1]

    def receive(self, product: Tensor) -> None:
        """Take ``A v`` for the vector returned by :meth:`request` and advance."""
        i = self.j - 1
        self.n_matvec += 1
        w = product.reshape(-1).to(self.V.dtype)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("the operator returned a non-finite product (NaN/inf in the curvature).")
        w, h = _orthogonalize(w, self.V[: self.j])
        hc = h.to("cpu", torch.float64).numpy()
        self.T[: self.j, i] = hc
        self.T[i, : self.j] = hc
        beta = float(torch.linalg.vector_norm(w))
        theta, s = np.linalg.eigh(self.T[: self.j, : self.j])
        self.scale = max(self.scale, float(np.abs(theta).max()), beta)
        res = beta * np.abs(s[-1, :])
        per_end = min(self.k, self.j)
        wanted = self._order(theta, per_end)
        thresh = self.tol * np.maximum(np.abs(theta[wanted]), self.floor * self.scale)
        ok = res[wanted] <= thresh
        spans_all = self.j >= self.n
        enough = self.j >= self.k_total
        if (enough and bool(ok.all())) or spans_all:
            self._finish(theta, s, res, wanted, ok | spans_all)
            return
        if self.n_matvec >= self.max_matvec:
            self._finish(theta, s, res, self._order(theta, per_end), ok)
            return
        if beta <= self._breakdown * max(self.scale, 1e-300):
            # invariant subspace: continue from a fresh random direction, coupled by 0
            fresh = torch.randn(self.n, generator=self.generator, dtype=torch.float64)
            w, _ = _orthogonalize(fresh.to(self.V.device, self.V.dtype), self.V[: self.j])
            w, _ = _orthogonalize(w, self.V[: self.j])
            beta_next, coupling = float(torch.linalg.vector_norm(w)), 0.0
            if beta_next == 0.0:
                self._finish(theta, s, res, wanted, np.ones_like(ok))
                return
        else:
            beta_next, coupling = beta, beta
        if self.j == self.m:
            self._restart(theta, s, w / beta_next, coupling)
        else:
            self.V[self.j] = w / beta_next
            self.T[self.j, i] = self.T[i, self.j] = coupling
            self.j += 1

    def _restart(self, theta: np.ndarray, s: np.ndarray, new: Tensor, beta: float) -> None:
        ends = 2 if self.which == "both" else 1
        keep_total = self.k_total + max(1, (self.m - self.k_total) // 2)
        keep_total = min(keep_total, self.m - 1)
        keep = self._order(theta, max(1, keep_total // ends))
        keep = np.array(sorted(set(keep.tolist()), key=lambda x: -theta[x]))
        p = len(keep)
        coeff = torch.from_numpy(np.ascontiguousarray(s[:, keep].T)).to(self.V.device, self.V.dtype)
        kept = coeff @ self.V[: self.j]
        self.V[:p] = kept
        self.V[p] = new
        self.V[p + 1 :] = 0
        self.T[:] = 0.0
        self.T[np.arange(p), np.arange(p)] = theta[keep]
        self.T[p, :p] = self.T[:p, p] = beta * s[-1, keep]
        self.j = p + 1
        self.restarts += 1

    def _finish(self, theta: np.ndarray, s: np.ndarray, res: np.ndarray, idx: np.ndarray, ok: np.ndarray) -> None:
        coeff = torch.from_numpy(np.ascontiguousarray(s[:, idx].T)).to(self.V.device, self.V.dtype)
        vectors = coeff @ self.V[: self.j]
        self.result = EigenPairs(
            eigenvalues=torch.from_numpy(theta[idx].copy()),
            eigenvectors=vectors,
            residuals=torch.from_numpy(res[idx].copy()),
            converged=torch.from_numpy(np.asarray(ok, dtype=bool).copy()),
            n_matvec=self.n_matvec,
            restarts=self.restarts,
        )
        self.done = True
        self.V = self.V[:0]  # release the basis


def lanczos_eigs(
    matmat: MatMat,
    n: int,
    *,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    basis_size: int = 20,
    max_matvec: int = 500,
    seed: int = 0,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> EigenPairs:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Args:
        matmat: ``(m, n) -> (m, n)``, the operator applied to each row.
        n: Dimension.
        k: Eigenpairs wanted (per end for ``which="both"``).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        tol: Relative Ritz-residual tolerance.
        basis_size: Maximum basis vectors kept.
        max_matvec: Product budget.
        seed: Seed of the Gaussian start vector (CPU generator).
        start: Explicit start vector (then ``seed`` only feeds restarts after breakdown).
        dtype: Dtype of the start vector and basis when ``start`` is not given.
        device: Device of the start vector and basis when ``start`` is not given.

    Returns:
        :class:`EigenPairs`.

    Raises:
        ValueError: See :class:`ThickRestartLanczos`.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if start is None:
        start = torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype)
    solver = ThickRestartLanczos(start, k=k, which=which, tol=tol, basis_size=basis_size,
                                 max_matvec=max_matvec, generator=gen)
    drive([solver], matmat)
    assert solver.result is not None
    return solver.result


# ------------------------------------------------------------------------------------------ quadrature
class LanczosQuadrature:
    """``steps`` Lanczos steps from one start vector: Gauss quadrature nodes and weights.

    With ``T`` the ``m x m`` tridiagonal Lanczos matrix and ``T = S diag(theta) S^T``, the nodes are
    ``theta`` and the weights ``S[0, :]**2`` (they sum to 1): for a unit start vector ``v``,
    ``sum_i w_i f(theta_i)`` approximates ``v^T f(A) v`` and is exact for polynomials of degree up to
    ``2m - 1``. The iteration stops early when the Krylov space becomes invariant (then the quadrature is
    exact).

    Args:
        start: ``(n,)`` nonzero start vector (normalised here).
        steps: Number of Lanczos steps (operator products).
        reorthogonalize: Keep every Lanczos vector and orthogonalise against all of them (memory
            ``steps * n``); otherwise the three-term recurrence only (Ubaru et al. 2017 show the
            quadrature stays accurate without it, but spurious copies of converged nodes may appear).

    Raises:
        ValueError: ``steps < 1`` or a zero start vector.
    """

    def __init__(self, start: Tensor, *, steps: int, reorthogonalize: bool = True) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}.")
        norm = torch.linalg.vector_norm(start)
        if not bool(norm > 0) or not bool(torch.isfinite(norm)):
            raise ValueError("the Lanczos start vector must be finite and nonzero.")
        self.steps = min(int(steps), start.numel())
        self.reorth = bool(reorthogonalize)
        v = start.reshape(-1) / norm
        self.V = v.new_zeros((self.steps, v.numel())) if self.reorth else None
        self.v, self.v_prev = v, None
        if self.V is not None:
            self.V[0] = v
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self._breakdown = _breakdown_tol(start.dtype)
        self.n_matvec = 0
        self.done = False

    def request(self) -> Tensor:
        """The Lanczos vector whose product is needed next."""
        if self.done:
            raise RuntimeError("the quadrature has finished; read nodes_weights().")
        return self.v

    def receive(self, product: Tensor) -> None:
        """Take ``A v`` and advance one step."""
        self.n_matvec += 1
        w = product.reshape(-1).to(self.v.dtype)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("the operator returned a non-finite product (NaN/inf in the curvature).")
        alpha = float(torch.dot(self.v, w))
        w = w - alpha * self.v
        if self.v_prev is not None:
            w = w - self.betas[-1] * self.v_prev
        step = len(self.alphas)
        if self.V is not None:
            w, h = _orthogonalize(w, self.V[: step + 1])
            alpha += float(h[step])
        self.alphas.append(alpha)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(max(abs(a) for a in self.alphas), max(self.betas, default=0.0), beta)
        if len(self.alphas) >= self.steps or beta <= self._breakdown * max(scale, 1e-300):
            self.done = True
            self.V = None
            return
        self.betas.append(beta)
        self.v_prev, self.v = self.v, w / beta
        if self.V is not None:
            self.V[step + 1] = self.v

    def nodes_weights(self) -> tuple[Tensor, Tensor]:
        """``(nodes, weights)``, float64 tensors of length ``len(alphas)`` (ascending nodes)."""
        m = len(self.alphas)
        t = np.diag(np.asarray(self.alphas, dtype=np.float64))
        if m > 1:
            b = np.asarray(self.betas[: m - 1], dtype=np.float64)
            t[np.arange(m - 1), np.arange(1, m)] = b
            t[np.arange(1, m), np.arange(m - 1)] = b
        theta, s = np.linalg.eigh(t)
        return torch.from_numpy(theta), torch.from_numpy(s[0, :] ** 2)


def lanczos_quadrature(
    matmat: MatMat,
    starts: Tensor,
    *,
    steps: int,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor, int]:
    """Stochastic Lanczos quadrature nodes and weights for several start vectors, in lockstep.

    Args:
        matmat: ``(m, n) -> (m, n)``, the operator applied to each row.
        starts: ``(p, n)`` start vectors (e.g. Rademacher probes).
        steps: Lanczos steps per start vector.
        reorthogonalize: Full reorthogonalisation (see :class:`LanczosQuadrature`).

    Returns:
        ``(nodes, weights, n_matvec)``: ``(p, steps)`` float64 tensors; a run that stopped early (an
        invariant Krylov space) is padded with weight 0 at its largest node.
    """
    runs = [LanczosQuadrature(s, steps=steps, reorthogonalize=reorthogonalize) for s in starts]
    drive(runs, matmat)
    width = max(r.steps for r in runs)
    nodes = torch.zeros(len(runs), width, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    for i, r in enumerate(runs):
        th, w = r.nodes_weights()
        nodes[i, : len(th)], weights[i, : len(th)] = th, w
        nodes[i, len(th) :] = th[-1]
    return nodes, weights, sum(r.n_matvec for r in runs)
