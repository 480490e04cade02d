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
    "Criterion",
    "EigenPairs",
    "LanczosQuadrature",
    "ThickRestartLanczos",
    "drive",
    "error_estimates",
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
Criterion = Literal["residual", "eigenvalue"]
_CRITERIA = ("residual", "eigenvalue")


def error_estimates(theta: np.ndarray, res: np.ndarray, others: np.ndarray,
                    others_res: np.ndarray | None = None) -> np.ndarray:
    """Estimated eigenvalue errors ``|theta_i - lambda_i|`` of Ritz pairs from their residuals and a gap.

    For a Ritz pair with residual ``r`` whose value is separated from the rest of the spectrum by
    ``delta > r``, ``|theta - lambda| <= r^2 / delta`` (Kato 1949; Temple 1928; Parlett 1998, *The
    Symmetric Eigenvalue Problem*, Thm. 11.7.1), and always ``|theta - lambda| <= r``. The gap is
    estimated from the other Ritz values (and the values already found): the distance to the nearest one
    farther away than ``r`` (nearer ones are copies of the same eigenvalue, as far as ``r`` can tell).

    Args:
        theta: Ritz values whose errors are wanted.
        res: Their residual norms ``||A y - theta y||`` (unit ``y``).
        others: The values gaps are measured to (may include ``theta`` itself).

    Returns:
        ``min(r, r^2 / delta)`` per value, float64, the shape of ``theta``.
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    res = np.asarray(res, dtype=np.float64).reshape(-1)
    others = np.asarray(others, dtype=np.float64).reshape(-1)
    spread = np.zeros_like(others) if others_res is None else np.asarray(others_res, dtype=np.float64).reshape(-1)
    out = res.copy()
    for a in range(theta.size):
        dist = np.abs(others - theta[a])
        far = dist > res[a]
        gap = float((dist[far] - spread[far]).min()) if far.any() else float("inf")
        if gap > res[a]:
            out[a] = min(res[a], res[a] ** 2 / gap)
    return out


@dataclasses.dataclass(frozen=True)
class EigenPairs:
    """Extreme eigenpairs found by :class:`ThickRestartLanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 Ritz values: for ``"largest"`` in descending order, for
            ``"smallest"`` ascending, for ``"both"`` the ``k`` largest (descending) then the ``k``
            smallest (ascending). Repeated eigenvalues appear as often as their multiplicity.
        eigenvectors: ``(k, n)`` orthonormal Ritz vectors as rows (the operator's dtype and device).
        residuals: ``(k,)`` float64 residual norms ``||A y - theta y||`` (unit ``y``).
        errors: ``(k,)`` float64 estimated eigenvalue errors ``|theta - lambda|``: ``r^2 / d`` with the
            effective gap ``d`` measured from the last two steps where defined, else ``min(r, r^2 / gap)``
            (:func:`error_estimates`), never below ``eps * max|theta|`` of the operator's dtype.
        converged: ``(k,)`` bool: the pair met the tolerance *and* it is confirmed to be among the ``k``
            extreme ones (no copy of a repeated eigenvalue, no eigenvalue beyond it left unseen).
        n_matvec: Operator-vector products used.
        restarts: Number of thick restarts.
        runs: Number of Lanczos runs (a fresh start vector, orthogonal to the pairs found, begins each one
            after the first).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    errors: Tensor
    converged: Tensor
    n_matvec: int
    restarts: int
    runs: int = 1


class ThickRestartLanczos:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos with locking (reverse communication).

    Within one *run*, keeps an orthonormal basis ``V`` (rows) and the projected matrix ``T = V A V^T``.
    Each product ``A v`` is orthogonalised against the whole basis (full reorthogonalisation), its
    coefficients fill a column of ``T``, and the Ritz pairs of ``T`` are checked after every product. When
    the basis is full, the wanted Ritz vectors and some neighbours are kept and the rest discarded (a thick
    restart in Krylov-Schur form, Wu & Simon 2000; Stewart 2001), which keeps memory at ``basis_size``
    vectors.

    A single Krylov space sees one direction of each eigenspace: it can never show the second copy of a
    repeated eigenvalue, and when it becomes invariant (breakdown) every Ritz residual is zero whatever is
    left outside it. So a run ends when its converged pairs settle the wanted end(s); those pairs are
    *locked* (kept, and every later product is orthogonalised against them) and, unless the answer is
    already certain, a new run starts from a fresh seeded random vector orthogonal to them. The answer is
    *confirmed* when a run finds nothing that displaces the ``k`` extreme pairs found so far, when those
    ``k`` values are all equal (a further copy would not change them), or when the runs have spanned the
    whole space. With ``k = 1`` one run suffices (a copy of the extreme value is the same value); with
    ``k > 1`` confirming costs a second run, which is what makes repeated eigenvalues right
    (an ``I (x) M`` Kronecker block, a null space). Residuals include the coupling to the locked vectors,
    so they are the true ``||A y - theta y||``.

    A Ritz pair meets the tolerance when, with ``s`` the largest ``|theta|`` seen and ``floor`` (default
    ``sqrt(eps)`` of the dtype) keeping eigenvalues tiny next to the spectral norm from being asked for an
    accuracy the arithmetic cannot give,

    - ``criterion="residual"``: ``||A y - theta y|| <= tol * max(|theta|, floor * s)`` (read at no cost
      from the Lanczos relation ``A V = V T + f e_j^T`` as ``||f|| * |s_j|``); the eigenvalue is then
      accurate to about ``residual^2 / gap``, far better than ``tol``;
    - ``criterion="eigenvalue"``: the estimated eigenvalue error ``<= tol * max(|theta|, floor * s)`` and
      the Ritz value moved by at most a tenth of that in the last step (a value still creeping towards a
      crowded end of the spectrum is not done, whatever the estimate says). The estimate is ``r^2 / d``
      with the effective gap ``d = (r_prev^2 - r^2) / (theta - theta_prev)`` measured over the last step
      (near convergence ``e = r^2 / d`` with ``d`` changing slowly), else Kato-Temple's ``min(r, r^2 /
      gap)`` with the gap from the Ritz values (:func:`error_estimates`). ``tol`` is then the relative
      eigenvalue accuracy wanted, and fewer products are spent; the vectors are less accurate (residual
      about ``sqrt(tol * |theta| * gap)``). Where the end of the spectrum is a continuum on the scale of
      ``tol`` (no gap), no criterion can certify the extreme value and the error can exceed ``tol``.

    Args:
        start: ``(n,)`` start vector (any nonzero vector; normalised here). Its dtype and device are used.
        k: Number of eigenpairs wanted (at each end for ``which="both"``).
        which: ``"largest"``/``"smallest"`` (algebraic) or ``"both"``.
        tol: Relative tolerance (see ``criterion``).
        criterion: ``"residual"`` or ``"eigenvalue"`` (see above).
        basis_size: Maximum number of basis vectors of a run (memory: ``basis_size * n`` numbers, plus the
            locked vectors).
        max_matvec: Give up after this many products (the pairs found are returned, those not confirmed
            with ``converged=False``).
        generator: CPU generator of the fresh start vectors of later runs (default: seeded with 0).
        floor: See above; ``None`` means ``sqrt(eps)`` of ``start``'s dtype.

    Raises:
        ValueError: Bad ``k``, ``which``, ``tol``, ``criterion``, ``basis_size`` or a zero start vector.
    """

    def __init__(
        self,
        start: Tensor,
        *,
        k: int = 1,
        which: Which = "largest",
        tol: float = 1e-3,
        criterion: Criterion = "residual",
        basis_size: int = 20,
        max_matvec: int = 500,
        generator: torch.Generator | None = None,
        floor: float | None = None,
    ) -> None:
        if which not in _WHICH:
            raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}.")
        if criterion not in _CRITERIA:
            raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got {criterion!r}.")
        n = start.numel()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n:
            raise ValueError(f"k must be an int in [1, {n}] (the dimension), got {k!r}.")
        if not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}.")
        self.n, self.k, self.which, self.tol, self.criterion = n, k, which, float(tol), criterion
        self.k_total = 2 * k if which == "both" else k
        if self.k_total > n:
            raise ValueError(f"k={k} with which='both' asks for {self.k_total} eigenpairs of a {n}-dimensional operator.")
        self.basis_size = int(basis_size)
        self.max_matvec = int(max_matvec)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.floor = float(torch.finfo(start.dtype).eps) ** 0.5 if floor is None else float(floor)
        self._breakdown = _breakdown_tol(start.dtype)
        self._eps = float(torch.finfo(start.dtype).eps)
        norm = torch.linalg.vector_norm(start)
        if not bool(norm > 0) or not bool(torch.isfinite(norm)):
            raise ValueError("the Lanczos start vector must be finite and nonzero.")
        # locked pairs (from finished runs)
        self.Y = start.new_zeros((0, n))
        self.lval = np.zeros(0)
        self.lres = np.zeros(0)
        self.lerr = np.zeros(0)
        self.lok = np.zeros(0, dtype=bool)
        self.n_matvec = 0
        self.restarts = 0
        self.runs = 0
        self._first_run: int | None = None  # products the first run took to converge its k-1 most extreme pairs
        self.scale = 0.0
        self.done = False
        self.result: EigenPairs | None = None
        self._begin(start.reshape(-1) / norm)

    # ------------------------------------------------------------------ runs
    def _begin(self, v: Tensor) -> None:
        """Start a run from the unit vector ``v`` (orthogonal to the locked vectors)."""
        free = self.n - self.Y.shape[0]
        self.m = int(min(free, max(self.basis_size, min(self.k_total, free) + 2)))
        self.V = v.new_empty((self.m, self.n))  # rows beyond j are never read before they are written
        self.V[0] = v
        self.T = np.zeros((self.m, self.m))
        self.C = np.zeros((self.Y.shape[0], self.m))  # C[:, i] = Y (A v_i): coupling to the locked vectors
        self.j = 1
        self.runs += 1
        self._run_start = self.n_matvec
        self._prev_theta: np.ndarray | None = None
        self._prev_res: np.ndarray | None = None

    def _fresh(self) -> Tensor | None:
        """A seeded random unit vector orthogonal to the locked vectors (``None`` if they span the space)."""
        fresh = torch.randn(self.n, generator=self.generator, dtype=torch.float64).to(self.V.device, self.V.dtype)
        norm0 = torch.linalg.vector_norm(fresh)
        for _ in range(2):
            fresh, _ = _orthogonalize(fresh, self.Y)
        norm = torch.linalg.vector_norm(fresh)
        if not bool(norm > self._breakdown * norm0):
            return None
        return fresh / norm

    def _order(self, theta: np.ndarray, count: int) -> np.ndarray:
        """Indices of the wanted end(s) of ``theta`` (ascending array), ``count`` per end, best first."""
        desc, asc = np.arange(len(theta))[::-1], np.arange(len(theta))
        if self.which == "largest":
            return desc[:count]
        if self.which == "smallest":
            return asc[:count]
        return np.concatenate([desc[:count], asc[:count]])

    @staticmethod
    def _order_end(count: int, end: str) -> np.ndarray:
        """Indices of ``count`` ascending Ritz values from the extreme one at ``end`` inwards."""
        return np.arange(count)[::-1] if end == "largest" else np.arange(count)

    def _ends(self) -> list[str]:
        return ["largest", "smallest"] if self.which == "both" else [self.which]

    def _thresh(self, theta: np.ndarray) -> np.ndarray:
        return self.tol * np.maximum(np.abs(theta), self.floor * self.scale)

    def _as_good(self, value: float, eq: float, end: str) -> int:
        """How many locked values are at least as extreme as ``value`` (within ``eq``) at ``end``."""
        if end == "largest":
            return int((self.lval >= value - eq).sum())
        return int((self.lval <= value + eq).sum())

    def _settle(self, theta: np.ndarray, res: np.ndarray, ok: np.ndarray, eq: np.ndarray,
                end: str) -> tuple[bool, list[int], int]:
        """Whether the run's converged pairs settle ``end``: ``(settled, indices to lock, Ritz values examined)``.

        Going from the extreme Ritz value inwards, each must be converged; the end is settled at the first
        one that would not be strictly among the ``k`` extreme values together with the locked ones and
        those before it (it is locked too), or after ``k`` converged ones. In a later run that has made at
        least as many products as the first one needed to converge its ``k - 1`` most extreme pairs
        (copies of those converge about as fast as the originals did), a Ritz value whose whole residual interval ``theta -+ r`` lies outside the ``k``
        extreme values settles the end without converging (it is not locked).
        """
        order = self._order_end(len(theta), end)
        sign = 1.0 if end == "largest" else -1.0
        late = (self.runs > 1 and len(self.lval) >= self.k_total
                and self.n_matvec - self._run_start >= (self._first_run or 0))
        for p, a in enumerate(order[: self.k]):
            if not ok[a]:
                if late and self._as_good(theta[a] + sign * res[a], 0.0, end) + p >= self.k:
                    return True, [int(b) for b in order[:p]], p + 1
                return False, [], p + 1
            if self._as_good(theta[a], eq[a], end) + p >= self.k:
                return True, [int(b) for b in order[: p + 1]], p + 1
        if len(order) >= self.k:
            return True, [int(b) for b in order[: self.k]], self.k
        return False, [], len(order)

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
        if not math.isfinite(float(torch.linalg.vector_norm(w))):  # one pass; NaN/inf anywhere shows here
            raise FloatingPointError("the operator returned a non-finite product (NaN/inf in the curvature).")
        n_locked = self.Y.shape[0]
        basis = torch.cat([self.Y, self.V[: self.j]]) if n_locked else self.V[: self.j]
        w, hq = _orthogonalize(w, basis)
        hc = hq.to("cpu", torch.float64).numpy()
        self.C[:, i] = hc[:n_locked]
        h = hc[n_locked:]
        self.T[: self.j, i] = h
        self.T[i, : self.j] = h
        beta = float(torch.linalg.vector_norm(w))
        theta, s = np.linalg.eigh(self.T[: self.j, : self.j])
        self.scale = max(self.scale, float(np.abs(theta).max()), beta,
                         float(np.abs(self.lval).max()) if self.lval.size else 0.0)
        coupling = np.linalg.norm(self.C[:, : self.j] @ s, axis=0) if n_locked else 0.0
        res = np.sqrt((beta * np.abs(s[-1, :])) ** 2 + coupling**2)
        # no estimate below the rounding of the products themselves (eps of the dtype times the scale)
        err = np.maximum(self._secant(theta, res, error_estimates(theta, res, theta, res)), self._eps * self.scale)
        thresh = self._thresh(theta)
        if self.criterion == "residual":
            ok = res <= thresh
        else:
            # the estimate trusts the Ritz gap; also ask that the value moved by less than the tolerance in
            # the last step (a Ritz value that has not yet seen the eigenvalue beyond it is still moving)
            ok = (err <= thresh) & (self._moved(theta) <= 0.1 * thresh)
        self._prev_theta, self._prev_res = theta, res
        if self._first_run is None and all(
            bool(ok[self._order_end(len(theta), end)[: self.k - 1]].all()) and len(theta) >= self.k - 1
            for end in self._ends()
        ):
            self._first_run = self.n_matvec
        invariant = beta <= self._breakdown * max(self.scale, 1e-300)
        spans_all = n_locked + self.j >= self.n
        if invariant or spans_all:
            # the run's space is invariant: every Ritz pair is an eigenpair; lock them all
            self._lock(theta, s, res, err, ok | invariant | spans_all, np.arange(len(theta)), spans_all)
            return
        settled, lock, examined = True, [], 0
        eq = 2.0 * np.maximum(thresh, err)
        for end in self._ends():
            st, idx, ex = self._settle(theta, res, ok, eq, end)
            settled, lock, examined = settled and st, lock + idx, examined + ex
        if settled and examined <= self.j:
            self._lock(theta, s, res, err, ok, np.array(sorted(set(lock)), dtype=np.int64), False)
            return
        if self.n_matvec >= self.max_matvec:
            self._finish(extra=(theta, s, res, err, ok))
            return
        if self.j == self.m:
            self._restart(theta, s, w / beta, beta)
        else:
            self.V[self.j] = w / beta
            self.T[self.j, i] = self.T[i, self.j] = beta
            self.j += 1

    def _aligned(self, prev: np.ndarray, count: int) -> np.ndarray:
        """``prev`` (previous step's Ritz quantities, ascending) aligned rank by rank from the nearer end with
        ``count`` current ones (``nan`` where there is none)."""
        out = np.full(count, np.nan)
        c = min(len(prev), count)
        half = (count + 1) // 2
        out[::-1][:c] = prev[::-1][:c]
        out[: min(c, half)] = prev[: min(c, half)]
        return out

    def _secant(self, theta: np.ndarray, res: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        """Eigenvalue error estimates ``r^2 / d`` with the effective gap ``d`` measured from the last step.

        Near convergence the error of a Ritz value is ``e = r^2 / d``, ``d`` a weighted mean distance to the
        eigenvalues its vector is still contaminated by, which changes slowly from one step to the next; so
        ``e_prev - e = theta - theta_prev`` gives ``d = (r_prev^2 - r^2) / (theta - theta_prev)`` (moving
        towards its end of the spectrum). Where that is not defined (first step, residual not decreasing,
        value moving the wrong way) the Kato-Temple estimate ``fallback`` stays. ``d`` is capped at 1.5
        times the spread of the Ritz values (``d`` cannot exceed the spectrum's width).
        """
        if self._prev_theta is None or self._prev_res is None or len(theta) < 2:
            return fallback
        pt = self._aligned(self._prev_theta, len(theta))
        pr = self._aligned(self._prev_res, len(theta))
        sign = np.where(np.arange(len(theta)) >= len(theta) // 2, 1.0, -1.0)
        moved = (theta - pt) * sign
        ok = np.isfinite(pt) & (moved > 0) & (pr > res)
        cap = 1.5 * float(theta.max() - theta.min())
        out = fallback.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.minimum((pr**2 - res**2) / np.where(ok, moved, 1.0), cap)
            est = np.minimum(res, res**2 / d)
        out[ok & (d > 0)] = est[ok & (d > 0)]
        return out

    def _moved(self, theta: np.ndarray) -> np.ndarray:
        """How far each Ritz value moved since the previous step (rank by rank from each end; ``inf`` if new)."""
        prev = self._prev_theta
        moved = np.full(len(theta), np.inf)
        if prev is None or len(prev) == 0:
            return moved
        c = min(len(prev), len(theta))
        top = np.abs(theta[::-1][:c] - prev[::-1][:c])
        bottom = np.abs(theta[:c] - prev[:c])
        moved[::-1][: c] = top
        half = (len(theta) + 1) // 2
        moved[: min(c, half)] = bottom[: min(c, half)]
        return moved

    def _vectors(self, s: np.ndarray, idx: np.ndarray) -> Tensor:
        coeff = torch.from_numpy(np.ascontiguousarray(s[:, idx].T)).to(self.V.device, self.V.dtype)
        return coeff @ self.V[: self.j]

    def _lock(self, theta: np.ndarray, s: np.ndarray, res: np.ndarray, err: np.ndarray, ok: np.ndarray,
              idx: np.ndarray, spans_all: bool) -> None:
        """Lock the run's pairs ``idx``; then finish, or begin a new run from a fresh vector."""
        eq = 2.0 * np.maximum(self._thresh(theta), err)
        # does any new pair enter the k extreme ones (strictly, not as a copy of the k-th)?
        new = any(self._as_good(theta[a], eq[a], end) < self.k for a in idx for end in self._ends())
        if self._first_run is None:
            self._first_run = self.n_matvec
        self.Y = torch.cat([self.Y, self._vectors(s, idx)])
        self.lval = np.concatenate([self.lval, theta[idx]])
        self.lres = np.concatenate([self.lres, res[idx]])
        self.lerr = np.concatenate([self.lerr, err[idx]])
        self.lok = np.concatenate([self.lok, ok[idx]])
        count = len(self.lval)
        if spans_all or count >= self.n:
            self._finish(confirmed=True)
            return
        if count >= self.k_total and (not new or self._flat()):
            self._finish(confirmed=True)
            return
        fresh = self._fresh() if self.n_matvec < self.max_matvec else None
        if fresh is None:
            self._finish(confirmed=count >= self.n)
            return
        self._begin(fresh)

    def _flat(self) -> bool:
        """Whether at every wanted end the ``k`` extreme locked values are all equal (within tolerance)."""
        srt = np.sort(self.lval)
        thr = 2.0 * np.maximum(self._thresh(srt), self.lerr[np.argsort(self.lval)])
        for end in self._ends():
            top = srt[::-1][: self.k] if end == "largest" else srt[: self.k]
            t = thr[::-1][: self.k] if end == "largest" else thr[: self.k]
            if len(top) < self.k or float(top.max() - top.min()) > float(t.max()):
                return False
        return True

    def _restart(self, theta: np.ndarray, s: np.ndarray, new: Tensor, beta: float) -> None:
        ends = 2 if self.which == "both" else 1
        keep_total = self.k_total + max(1, (self.m - self.k_total) // 2)
        keep_total = min(keep_total, self.m - 1)
        keep = self._order(theta, max(1, keep_total // ends))
        keep = np.array(sorted(set(keep.tolist()), key=lambda x: -theta[x]))
        p = len(keep)
        kept = self._vectors(s, keep)
        c_kept = self.C[:, : self.j] @ s[:, keep]
        self.V[:p] = kept
        self.V[p] = new
        self.V[p + 1 :] = 0
        self.C[:] = 0.0
        self.C[:, :p] = c_kept
        self.T[:] = 0.0
        self.T[np.arange(p), np.arange(p)] = theta[keep]
        self.T[p, :p] = self.T[:p, p] = beta * s[-1, keep]
        self.j = p + 1
        self.restarts += 1

    def _finish(self, *, confirmed: bool = False,
                extra: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Report the ``k`` extreme pairs among the locked ones (and the current run's, when out of budget).

        Unconfirmed (out of budget): only the extreme pair at each end can be converged (a copy of it
        would have the same value); the others are not known to be the ``k`` extreme ones.
        """
        vals, res, err, ok, vecs = self.lval, self.lres, self.lerr, self.lok, self.Y
        if extra is not None:
            theta, s, r, e, o = extra
            idx = np.arange(len(theta))
            vals = np.concatenate([vals, theta])
            res, err, ok = np.concatenate([res, r]), np.concatenate([err, e]), np.concatenate([ok, o])
            vecs = torch.cat([vecs, self._vectors(s, idx)])
        asc = np.argsort(vals, kind="stable")
        count = min(self.k, len(vals) // (2 if self.which == "both" else 1))
        picks, flags = [], []
        for end in self._ends():
            sel = asc[::-1][:count] if end == "largest" else asc[:count]
            picks.append(sel)
            conf = np.full(len(sel), confirmed)
            conf[:1] = True
            flags.append(ok[sel] & conf)
        idx = np.concatenate(picks).astype(np.int64)
        self.result = EigenPairs(
            eigenvalues=torch.from_numpy(vals[idx].copy()),
            eigenvectors=vecs[torch.from_numpy(idx).to(vecs.device)],
            residuals=torch.from_numpy(res[idx].copy()),
            errors=torch.from_numpy(err[idx].copy()),
            converged=torch.from_numpy(np.concatenate(flags).astype(bool)),
            n_matvec=self.n_matvec,
            restarts=self.restarts,
            runs=self.runs,
        )
        self.done = True
        self.V = self.V[:0]  # release the basis
        self.Y = self.Y[:0]


def lanczos_eigs(
    matmat: MatMat,
    n: int,
    *,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    criterion: Criterion = "residual",
    basis_size: int = 20,
    max_matvec: int = 500,
    seed: int = 0,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> EigenPairs:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos with locking.

    Args:
        matmat: ``(m, n) -> (m, n)``, the operator applied to each row.
        n: Dimension.
        k: Eigenpairs wanted (per end for ``which="both"``).
        which: ``"largest"``, ``"smallest"`` or ``"both"``.
        tol: Relative tolerance on the Ritz residual (``criterion="residual"``) or on the estimated
            eigenvalue error (``criterion="eigenvalue"``); see :class:`ThickRestartLanczos`.
        criterion: ``"residual"`` or ``"eigenvalue"``.
        basis_size: Maximum basis vectors kept per run.
        max_matvec: Product budget.
        seed: Seed of the Gaussian start vector and of the fresh start vectors of later runs (CPU generator).
        start: Explicit start vector (then ``seed`` only feeds later runs).
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
    solver = ThickRestartLanczos(start, k=k, which=which, tol=tol, criterion=criterion, basis_size=basis_size,
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
