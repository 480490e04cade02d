"""Damped inverse curvature-vector products ``(C + lambda I)^-1 b`` for influence functions.

``C`` is the Hessian, generalised Gauss-Newton or empirical Fisher of the *mean* training loss, from
:func:`gradsense.curvature.operator`; products with a block of vectors go through ``torch.func.vmap``
(:class:`gradsense.curvature.RowProducts` for the Hessian, a vmapped ``J^T H_out J`` for the GGN). Solvers:

- ``"cg"``: conjugate gradients on every right-hand side at once (Hestenes & Stiefel 1952; Martens 2010 and
  Koh & Liang 2017 for influence), stopping each column at ``||A x - b|| <= tol ||b||``. ``A`` must be positive
  definite: a direction of non-positive curvature (``p^T A p <= 0``, possible with an indefinite Hessian) stops
  that column and is reported; use ``curvature="ggn"`` or more damping.
- ``"lissa"``: the Neumann series ``x_{j+1} = b + x_j - A x_j / s`` (Agarwal, Bullins & Hazan 2017), ``A^-1 b
  = x_J / s``, with ``s`` above the largest eigenvalue of ``A`` (estimated by power iteration unless given).
- ``"exact"``: the dense ``A`` (at most 5000 parameters; one product per parameter) and ``torch.linalg.solve``.
- ``"auto"``: ``"exact"`` up to :data:`EXACT_MAX` parameters, else ``"cg"``.

Every solve returns a :class:`SolveReport` (iterations, final relative residuals, convergence, products).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from gradsense.core.batching import chunks
from gradsense.core.distributed import all_reduce_sum
from gradsense.core.functional import ParamSpec

__all__ = ["DampedCurvature", "SolveReport", "conjugate_gradient", "lissa", "solve"]

Solver = Literal["auto", "cg", "lissa", "exact"]

#: ``solver="auto"`` forms the dense curvature (one product per parameter) up to this many parameters.
EXACT_MAX = 2000


@dataclasses.dataclass(frozen=True)
class SolveReport:
    """How a damped inverse was computed.

    Attributes:
        solver: ``"cg"``, ``"lissa"`` or ``"exact"``.
        iterations: Iterations of each right-hand side.
        residuals: Final ``||A x - b|| / ||b||`` of each right-hand side.
        converged: Whether every right-hand side reached the tolerance.
        products: Curvature-vector products spent.
        negative_curvature: Right-hand sides stopped by a direction with ``p^T A p <= 0``.
        damping: The ``lambda`` used.
        tol: The tolerance.
    """

    solver: str
    iterations: list[int]
    residuals: list[float]
    converged: bool
    products: int
    negative_curvature: list[int]
    damping: float
    tol: float

    def describe(self) -> str:
        """One line for reports."""
        it = f"{min(self.iterations)}-{max(self.iterations)}" if self.iterations else "0"
        res = max(self.residuals) if self.residuals else 0.0
        text = (f"{self.solver}: {it} iterations, max relative residual {res:.2e} "
                f"({'converged' if self.converged else 'NOT converged'} at tol {self.tol:g}), {self.products} products")
        if self.negative_curvature:
            text += f"; {len(self.negative_curvature)} stopped on non-positive curvature"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DampedCurvature:
    """``A = C + lambda I`` on blocks of flat vectors, ``C`` the curvature of the mean training loss.

    Args:
        model: The model (never modified).
        loss_fn: ``(output, labels) -> scalar`` mean loss.
        data: The training data defining ``C``.
        params: Which parameters span the space.
        kind: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (empirical).
        damping: ``lambda >= 0``.
        batch_size: Batch size of the data passes.
        max_memory: Budget of one batched product.

    Attributes:
        n_products: Products computed (one per vector).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, *, params: ParamSpec,
                 kind: str, damping: float, batch_size: int = 256, max_memory: int | str | None = None) -> None:
        from gradsense import curvature

        self.op = curvature.operator(model, loss_fn, data, params=params, kind=kind, batch_size=batch_size)  # type: ignore[arg-type]
        self.kind, self.damping = kind, float(damping)
        self.rows = curvature.RowProducts(self.op, max_memory=max_memory) if kind == "hessian" else None
        self.numel = self.op.numel
        self.n_products = 0
        self._vmap_ok = True
        self._lu: tuple[Tensor, Tensor, Tensor] | None = None

    def __call__(self, v: Tensor) -> Tensor:
        """``(m, D)`` -> ``(m, D)`` rows of ``(C + lambda I) v``."""
        if self.rows is not None:
            out = self.rows(v)
        elif self.kind == "fisher":
            out = self._fisher_rows(v)
        else:
            out = self._ggn_rows(v)
        self.n_products += v.shape[0]
        return out + self.damping * v

    def _split(self, rows: Tensor) -> dict[str, Tensor]:
        params = self.op.params
        parts = torch.split(rows, [p.numel() for p in params.values()], dim=1)
        return {k: t.reshape(rows.shape[0], *p.shape) for (k, p), t in zip(params.items(), parts)}

    def _join(self, d: dict[str, Tensor], m: int) -> Tensor:
        return torch.cat([d[k].reshape(m, -1) for k in self.op.params], dim=1)

    def _ggn_rows(self, rows: Tensor) -> Tensor:
        if not self._vmap_ok:
            return torch.stack([self.op.matvec(r) for r in rows])
        op = self.op
        fm, loss_fn, params = op.fm, op.loss_fn, op.params
        acc = torch.zeros_like(rows)
        seen = torch.zeros((), dtype=torch.float64)
        try:
            for x, y in op.batches():
                def f(p: dict[str, Tensor], x: Tensor = x) -> Tensor:
                    return fm(p, x)

                out, pull = vjp(f, params)
                out = out.detach()

                def loss_of(z: Tensor, y: Any = y) -> Tensor:
                    return loss_fn(z, y)

                def one(v: dict[str, Tensor], f: Callable[..., Tensor] = f, out: Tensor = out,
                        pull: Callable[..., Any] = pull, loss_of: Callable[..., Tensor] = loss_of) -> dict[str, Tensor]:
                    jv = jvp(f, (params,), (v,))[1]
                    hjv = jvp(grad(loss_of), (out,), (jv,))[1]
                    return pull(hjv)[0]

                batched = vmap(one)
                for sl in chunks(rows.shape[0], 16):
                    m = sl.stop - sl.start
                    acc[sl] += self._join(batched(self._split(rows[sl])), m).detach() * x.shape[0]
                seen += x.shape[0]
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(f"batched Gauss-Newton products failed under vmap ({type(err).__name__}: "
                          f"{str(err)[:100]}); computing one at a time.", RuntimeWarning, stacklevel=3)
            self._vmap_ok = False
            return self._ggn_rows(rows)
        return all_reduce_sum(acc) / float(all_reduce_sum(seen))

    def _fisher_rows(self, rows: Tensor) -> Tensor:
        op = self.op
        fm, loss_fn = op.fm, op.loss_fn

        def example(p: dict[str, Tensor], xi: Tensor, yi: Any) -> Tensor:
            return loss_fn(fm(p, xi.unsqueeze(0)), yi.unsqueeze(0)).reshape(())

        acc = torch.zeros_like(rows)
        seen = torch.zeros((), dtype=torch.float64)
        for x, y in op.batches():
            g = vmap(grad(example), in_dims=(None, 0, 0))(op.params, x, y)
            flat = self._join(g, x.shape[0])
            acc += (rows @ flat.T) @ flat
            seen += x.shape[0]
        return all_reduce_sum(acc) / float(all_reduce_sum(seen))

    def dense(self) -> Tensor:
        """The whole ``(D, D)`` matrix ``C + lambda I`` (at most 5000 parameters)."""
        if self.numel > 5000:
            raise ValueError(f"solver='exact' needs the dense curvature: {self.numel} parameters is too many "
                             "(> 5000); use solver='cg'.")
        eye = torch.eye(self.numel, dtype=self.op.dtype, device=self.op.device)
        cols = [self(eye[sl]) for sl in chunks(self.numel, 64)]
        m = torch.cat(cols)
        return (m + m.T) / 2


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, *, tol: float, maxiter: int,
                       damping: float = 0.0) -> tuple[Tensor, SolveReport]:
    """Solve ``A x = b`` for every row of ``b`` (``(m, D)``) by conjugate gradients, columns independently.

    Only the columns still running are multiplied, so a converged column costs nothing further.
    """
    m = b.shape[0]
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    iters = [0] * m
    negative: list[int] = []
    active = torch.nonzero(rs.sqrt() > tol * bnorm).flatten()
    products = 0
    for _ in range(maxiter):
        if active.numel() == 0:
            break
        ap = apply(p[active])
        products += int(active.numel())
        pap = (p[active] * ap).sum(1)
        bad = pap <= 0
        if bool(bad.any()):
            negative.extend(int(i) for i in active[bad])
        good = ~bad
        idx, ap, pap = active[good], ap[good], pap[good]
        alpha = rs[idx] / pap
        x[idx] += alpha[:, None] * p[idx]
        r[idx] -= alpha[:, None] * ap
        rs_new = (r[idx] * r[idx]).sum(1)
        beta = rs_new / rs[idx]
        rs[idx] = rs_new
        p[idx] = r[idx] + beta[:, None] * p[idx]
        for i in idx.tolist():
            iters[i] += 1
        active = idx[rs_new.sqrt() > tol * bnorm[idx]]
    # true residuals of the final iterates (r drifts in float32)
    res = ((apply(x) - b).norm(dim=1) / bnorm) if m else torch.zeros(0)
    products += m
    residuals = [float(v) for v in res]
    return x, SolveReport("cg", iters, residuals, all(v <= tol * 1.01 for v in residuals) and not negative,
                          products, sorted(set(negative)), damping, tol)


def _top_eigenvalue(apply: Callable[[Tensor], Tensor], dim: int, like: Tensor, iters: int = 20,
                    seed: int = 0) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, dim, generator=g, dtype=torch.float64).to(like)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = apply(v)
        lam = float((v * w).sum())
        v = w / w.norm().clamp_min(1e-30)
    return abs(lam)


def lissa(apply: Callable[[Tensor], Tensor], b: Tensor, *, tol: float, maxiter: int, scale: float | None = None,
          damping: float = 0.0, seed: int = 0) -> tuple[Tensor, SolveReport]:
    """Solve ``A x = b`` by the LiSSA/Neumann recursion ``h <- b + h - A h / s``, ``x = h / s``.

    Args:
        apply: ``A`` on rows.
        b: ``(m, D)`` right-hand sides.
        tol: Stop when every ``||A x - b|| / ||b||`` is below ``tol`` (the change of ``h`` is that residual).
        maxiter: Recursion depth.
        scale: ``s``, larger than ``A``'s top eigenvalue (default 1.1 x a power-iteration estimate).
        damping: Recorded in the report.
        seed: Seed of the power iteration.
    """
    extra = 0
    if scale is None:
        scale = 1.1 * _top_eigenvalue(apply, b.shape[1], b, seed=seed)
        extra = 20
    if not scale > 0:
        raise ValueError(f"lissa: scale must be positive, got {scale}.")
    h = b.clone()
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    it, done = 0, False
    for it in range(1, maxiter + 1):  # noqa: B007
        new = b + h - apply(h) / scale
        # new - h = b - A (h / s): the residual of the current iterate x = h / s
        res = (new - h).norm(dim=1) / bnorm
        h = new
        if bool((res <= tol).all()):
            done = True
            break
    x = h / scale
    res = (apply(x) - b).norm(dim=1) / bnorm
    residuals = [float(v) for v in res]
    m = b.shape[0]
    return x, SolveReport("lissa", [it] * m, residuals, done and all(v <= tol for v in residuals),
                          (it + 1) * m + extra, [], damping, tol)


def solve(a: DampedCurvature, b: Tensor, *, solver: Solver = "cg", tol: float | None = None,
          maxiter: int | None = None, scale: float | None = None, seed: int = 0) -> tuple[Tensor, SolveReport]:
    """``(C + lambda I)^-1 b`` for the rows of ``b`` with the chosen solver (see the module docstring)."""
    tol = (1e-8 if b.dtype == torch.float64 else 1e-3) if tol is None else float(tol)
    if solver == "auto":
        solver = "exact" if a.numel <= EXACT_MAX else "cg"
    if solver == "exact":
        before = a.n_products
        if a._lu is None:  # formed and factorised once, reused for every later block of right-hand sides
            mat = a.dense()
            a._lu = (mat, *torch.linalg.lu_factor(mat))
        mat, lu, piv = a._lu
        x = torch.linalg.lu_solve(lu, piv, b.T).T
        res = ((x @ mat.T - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)).tolist()
        return x, SolveReport("exact", [0] * b.shape[0], [float(v) for v in res], True, a.n_products - before, [],
                              a.damping, tol)
    if solver == "cg":
        return conjugate_gradient(a, b, tol=tol, maxiter=maxiter or min(a.numel, 1000), damping=a.damping)
    if solver == "lissa":
        return lissa(a, b, tol=tol, maxiter=maxiter or 1000, scale=scale, damping=a.damping, seed=seed)
    raise ValueError(f"solver must be 'auto', 'cg', 'lissa' or 'exact', got {solver!r}.")
