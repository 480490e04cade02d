"""Results of the curvature analyses: Hessian eigenpairs, trace, spectral density.

Figures use :mod:`gradsense.viz.figures`: a bar chart of eigenvalues (and of per-group top eigenvalues),
a bar chart of per-group traces ``Tr(H_l)/n_l`` with error bars (or the running trace estimate), and the
spectral density on a logarithmic axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = ["DensityResult", "EigenResult", "TraceResult"]


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


class _Groups:
    """Shared accessors for results with per-group quantities (``meta['groups']``)."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def groups(self) -> list[str]:
        """Names of the parameter groups (empty without ``per=``)."""
        return list(self.meta.get("groups") or [])

    @property
    def group_numel(self) -> Tensor | None:
        """Scalars per group."""
        return self.tensors.get("group_numel")


@dataclasses.dataclass(frozen=True, repr=False)
class EigenResult(_Groups, Result):
    """Extreme eigenpairs of the loss Hessian (or GGN/Fisher) from Lanczos.

    Tensors: ``eigenvalues`` ``(k,)`` (or ``(2k,)`` for ``which="both"``: largest first, descending, then
    smallest, ascending), ``residuals`` (``||H v - lambda v||`` per pair), ``errors`` (estimated eigenvalue
    error ``|theta - lambda|`` per pair, ``min(r, r^2 / gap)``; absent in results saved before it existed),
    ``pair_converged``, optionally
    ``eigenvectors`` (``(k, n)`` flat rows in ``meta['param_names']`` order), ``gradient_overlap``
    (cumulative ``||P_i g||^2 / ||g||^2``), and with groups ``group_eigenvalues`` ``(G, k_g)`` (NaN-padded),
    ``group_residuals``, ``group_errors``, ``group_converged``, ``group_numel``, ``group_gradient_overlap``.
    """

    kind = "curvature"

    required_tensors = ("eigenvalues", "residuals", "pair_converged")

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues (float64)."""
        return self.tensors["eigenvalues"]

    @property
    def residuals(self) -> Tensor:
        """Ritz residual norm ``||H v - lambda v||`` of each pair (unit ``v``)."""
        return self.tensors["residuals"]

    @property
    def errors(self) -> Tensor | None:
        """Estimated absolute eigenvalue error ``|theta - lambda|`` of each pair (``min(r, r^2 / gap)``, the gap
        from the Ritz values), or ``None`` for results saved without it."""
        return self.tensors.get("errors")

    @property
    def relative_errors(self) -> Tensor | None:
        """:attr:`errors` relative to ``|eigenvalue|`` (``inf`` for an eigenvalue of exactly 0)."""
        err = self.errors
        return None if err is None else err / self.eigenvalues.abs()

    @property
    def converged(self) -> bool:
        """Whether every pair (and every group) met the tolerance and is confirmed among the ``k`` extreme ones."""
        ok = bool(self.tensors["pair_converged"].all())
        if "group_converged" in self.tensors:
            ok = ok and bool(self.tensors["group_converged"].all())
        return ok

    @property
    def n_hvp(self) -> int:
        """Hessian-vector products used (all groups included)."""
        return int(self.meta.get("n_hvp", 0))

    @property
    def flat_eigenvectors(self) -> Tensor | None:
        """``(k, n)`` eigenvectors as flat rows, or ``None`` when not kept."""
        return self.tensors.get("eigenvectors")

    @property
    def eigenvectors(self) -> list[dict[str, Tensor]] | None:
        """The eigenvectors as ``{parameter name: tensor}`` dicts (unit norm over all entries), or ``None``."""
        flat = self.flat_eigenvectors
        if flat is None:
            return None
        names, shapes = self.meta["param_names"], self.meta["param_shapes"]
        sizes = [math.prod(s) for s in shapes]
        out = []
        for row in flat:
            parts = torch.split(row, sizes)
            out.append({n: t.reshape(s).clone() for n, t, s in zip(names, parts, shapes)})
        return out

    @property
    def gradient_overlap(self) -> float | None:
        """``||P_k g||^2 / ||g||^2``: the share of the squared gradient in the top-``k`` eigenspace."""
        t = self.tensors.get("gradient_overlap")
        return None if t is None or t.numel() == 0 else float(t[-1])

    @property
    def group_eigenvalues(self) -> dict[str, Tensor]:
        """``{group: eigenvalues}`` of each diagonal block (NaN padding removed)."""
        vals = self.tensors.get("group_eigenvalues")
        if vals is None:
            return {}
        return {g: row[~torch.isnan(row)] for g, row in zip(self.groups, vals)}

    @property
    def title(self) -> str:
        which = self.meta.get("settings", {}).get("which", "largest")
        return f"Hessian eigenvalues ({which}, Lanczos)"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        vals = ", ".join(_fmt(float(v), 6) for v in self.eigenvalues)
        rows.insert(1, ("eigenvalues", vals))
        rows.insert(2, ("residuals", ", ".join(_fmt(float(r), 2) for r in self.residuals)))
        at = 3
        if self.errors is not None:
            crit = self.meta.get("settings", {}).get("criterion", "residual")
            rows.insert(at, ("estimated eigenvalue errors (relative)",
                             ", ".join(_fmt(float(e), 2) for e in self.relative_errors) + f" ({crit} criterion)"))
            at += 1
        rows.insert(at, ("converged", str(self.converged)))
        rows.insert(at + 1, ("Hessian-vector products", str(self.n_hvp)))
        if self.gradient_overlap is not None:
            end = "bottom" if self.meta.get("settings", {}).get("which") == "smallest" else "top"
            rows.insert(at + 2, (f"gradient in {end}-k eigenspace", f"{self.gradient_overlap:.1%}"))
        if "loss" in self.meta:
            rows.append(("loss", _fmt(float(self.meta["loss"]), 5)))
        for g, v in self.group_eigenvalues.items():
            rows.append((f"top eigenvalue, {g}", _fmt(float(v[0]), 5) if v.numel() else "n/a"))
        return rows

    def __repr__(self) -> str:
        vals = ", ".join(_fmt(float(v), 6) for v in self.eigenvalues)
        parts = [f"eigenvalues=[{vals}]"]
        if self.errors is not None:
            parts.append("relative_errors=[" + ", ".join(_fmt(float(e), 2) for e in self.relative_errors) + "]")
        parts += [f"converged={self.converged}", f"n_hvp={self.n_hvp}"]
        if self.groups:
            parts.append(f"groups={len(self.groups)}")
        return f"EigenResult({', '.join(parts)})"

    def plot(self, **kwargs: Any) -> Any:
        """Bar chart of the eigenvalues, followed by each group's first eigenvalue."""
        from gradsense.viz.figures import bar_chart

        labels = [f"lambda_{i + 1}" for i in range(self.eigenvalues.numel())]
        values = [float(v) for v in self.eigenvalues]
        for g, v in self.group_eigenvalues.items():
            if v.numel():
                labels.append(f"{g}: lambda_1")
                values.append(float(v[0]))
        opts: dict[str, Any] = {"title": self.title, "xlabel": "eigenvalue"}
        opts.update(kwargs)
        return bar_chart(labels, values, **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class TraceResult(_Groups, Result):
    """Trace of the loss Hessian by Hutch++ (or Hutchinson), with its standard error.

    Tensors: ``trace`` and ``stderr`` (0-d float64), ``samples`` (the residual samples, whose spread gives
    the standard error), ``running`` (the estimate after each sample), and with groups ``group_trace``,
    ``group_stderr``, ``group_numel`` (HAWQ-V2's ``Tr(H_l) / n_l`` is ``group_trace / group_numel``).
    """

    kind = "curvature"

    required_tensors = ("trace", "stderr")

    @property
    def value(self) -> float:
        """The estimated trace."""
        return float(self.tensors["trace"])

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`value` (0 when exact)."""
        return float(self.tensors["stderr"])

    @property
    def n_hvp(self) -> int:
        """Hessian-vector products used."""
        return int(self.meta.get("n_hvp", 0))

    @property
    def converged(self) -> bool:
        """Whether ``stderr <= rtol * |trace|`` was reached."""
        return bool(self.meta.get("converged", False))

    @property
    def per_group(self) -> dict[str, dict[str, float]]:
        """``{group: {"trace", "stderr", "numel", "mean"}}`` where ``mean = trace / numel`` (HAWQ-V2)."""
        if "group_trace" not in self.tensors:
            return {}
        out = {}
        for g, t, s, n in zip(self.groups, self.tensors["group_trace"], self.tensors["group_stderr"],
                              self.tensors["group_numel"]):
            out[g] = {"trace": float(t), "stderr": float(s), "numel": int(n), "mean": float(t) / max(int(n), 1)}
        return out

    @property
    def title(self) -> str:
        return f"Hessian trace ({self.method})"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("trace", f"{_fmt(self.value, 6)} ± {_fmt(self.stderr, 2)}"))
        rows.insert(2, ("converged", str(self.converged)))
        rows.insert(3, ("Hessian-vector products", str(self.n_hvp)))
        if self.meta.get("rank"):
            rows.insert(4, ("sketch rank", str(self.meta["rank"])))
        for g, d in self.per_group.items():
            rows.append((f"Tr(H)/n, {g}", f"{_fmt(d['mean'], 4)} ± {_fmt(d['stderr'] / max(d['numel'], 1), 2)}"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Per-group ``Tr(H_l)/n_l`` with 2-stderr bars; without groups, the running estimate."""
        from gradsense.viz.figures import bar_chart, line_chart

        groups = self.per_group
        if groups:
            means = [d["mean"] for d in groups.values()]
            errs = [2 * d["stderr"] / max(d["numel"], 1) for d in groups.values()]
            log = all(m > 0 for m in means) and max(means) > 20 * min(means)
            # on a log axis, a lower bar end at or below 0 cannot be drawn: stop it just above 0
            lower = [min(e, 0.9 * m) for m, e in zip(means, errs)] if log else errs
            opts: dict[str, Any] = {"title": "Average Hessian diagonal per group, Tr(H_l)/n_l (± 2 s.e.)",
                                    "xlabel": "Tr(H_l) / n_l", "errors": [lower, errs], "log": log}
            opts.update(kwargs)
            return bar_chart(list(groups), means, **opts)
        running = self.tensors["running"]
        x = torch.arange(1, running.numel() + 1)
        opts = {"title": f"Trace estimate ({self.method}) over residual samples", "xlabel": "residual sample",
                "ylabel": "trace estimate"}
        opts.update(kwargs)
        return line_chart(x, {"estimate": running, "final": torch.full_like(running, self.value)}, **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class DensityResult(_Groups, Result):
    """Spectral density of the loss Hessian by stochastic Lanczos quadrature.

    Tensors: ``grid``, ``density`` (Gaussian-broadened, integrates to 1 over the grid), ``ritz_values`` and
    ``weights`` (``(probes, steps)`` quadrature nodes and weights, each probe's weights summing to 1),
    ``sigma`` (0-d), and with groups ``group_density`` ``(G, grid)``, ``group_ritz_values`` and
    ``group_weights`` ``(G, probes, steps)``.
    """

    kind = "curvature"

    required_tensors = ("grid", "density", "ritz_values", "weights", "sigma")

    @property
    def grid(self) -> Tensor:
        """Eigenvalue grid."""
        return self.tensors["grid"]

    @property
    def density(self) -> Tensor:
        """Density on :attr:`grid` (integrates to 1)."""
        return self.tensors["density"]

    @property
    def ritz_values(self) -> Tensor:
        """``(probes, steps)`` quadrature nodes."""
        return self.tensors["ritz_values"]

    @property
    def weights(self) -> Tensor:
        """``(probes, steps)`` quadrature weights (each row sums to 1)."""
        return self.tensors["weights"]

    @property
    def sigma(self) -> float:
        """Standard deviation of the Gaussian broadening."""
        return float(self.tensors["sigma"])

    @property
    def n_hvp(self) -> int:
        """Hessian-vector products used."""
        return int(self.meta.get("n_hvp", 0))

    def moment(self, j: int) -> float:
        """``sum_i w_i theta_i^j`` averaged over probes: an estimate of ``tr(H^j) / n`` (exact in ``j`` up to
        ``2 * steps - 1`` for each probe, no broadening)."""
        return float((self.weights * self.ritz_values**j).sum(1).mean())

    @property
    def title(self) -> str:
        return "Hessian spectral density (stochastic Lanczos quadrature)"

    def moment_stderr(self, j: int) -> float:
        """Standard error of :meth:`moment` over the probes (``nan`` with one probe).

        Each probe's ``sum_i w_i theta_i^j`` is ``v^T H^j v`` for one random unit vector ``v``: SLQ's moments are
        Hutchinson estimates with as many samples as probes, so with few probes they scatter around ``tr(H^j)/n``
        by this much (Hutch++ in :func:`gradsense.hessian_trace` deflates the top eigenspace first and is far
        more precise for the trace)."""
        per = (self.weights * self.ritz_values**j).sum(1).double()
        return float(per.std() / per.numel() ** 0.5) if per.numel() > 1 else float("nan")

    def summary(self) -> list[tuple[str, str]]:
        rows = [r for r in super().summary() if r[0] != "sigma"]  # shown below as "broadening sigma"
        nodes = self.ritz_values[self.weights > 0]
        probes = int(self.ritz_values.shape[0])
        se = self.moment_stderr(1)
        mean = _fmt(self.moment(1), 4) + ("" if se != se else f" ± {_fmt(se, 2)}")
        rows.insert(1, ("eigenvalue range", f"[{_fmt(float(nodes.min()))}, {_fmt(float(nodes.max()))}]"))
        rows.insert(2, ("mean eigenvalue tr(H)/n", f"{mean} (Hutchinson estimate from {probes} probe"
                                                   f"{'s' if probes != 1 else ''}, ± 1 s.e.)"))
        rows.insert(3, ("broadening sigma", _fmt(self.sigma, 3)))
        rows.insert(4, ("Hessian-vector products", str(self.n_hvp)))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """The density on a logarithmic axis (and each group's, when there are groups)."""
        from gradsense.viz.figures import line_chart

        floor = float(self.density.max()) * 1e-8  # below this the Gaussian tails are not drawn

        def cut(d: Tensor) -> Tensor:
            return torch.where(d >= floor, d, torch.zeros_like(d))

        series = {"all parameters": cut(self.density)}
        gd = self.tensors.get("group_density")
        if gd is not None:
            for g, d in zip(self.groups, gd):
                series[g] = cut(d)
        opts: dict[str, Any] = {"title": self.title, "xlabel": "eigenvalue", "ylabel": "density", "logy": True}
        opts.update(kwargs)
        return line_chart(self.grid, series, **opts)
