"""Results of the explanation-quality metrics and of dataset-level input sensitivity.

- :class:`MetricResult`: one value per example (infidelity, max-sensitivity, localisation, ...), with the
  mean and its standard error over examples.
- :class:`CurveResult`: deletion / insertion curves and their areas (Petsiuk et al. 2018).
- :class:`RandomizationResult`: similarity of maps under cascading layer randomisation (Adebayo et al. 2018).
- :class:`TaylorResult`: predicted vs actual change of the output over growing radii.
- :class:`MethodTable`: several attribution methods ranked by a metric (the block-digits table).
- :class:`GlobalSensitivityResult`: per-feature mean ``|d^k L / dx_j^k|`` over a dataset, orders 1-3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = [
    "CurveResult",
    "GlobalSensitivityResult",
    "MethodTable",
    "MetricResult",
    "RandomizationResult",
    "TaylorResult",
    "mean_and_stderr",
]


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "n/a" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:.{digits}g}"


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean of the finite values and its standard error ``std / sqrt(n)`` (0 for one value)."""
    v = values.detach().double().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    if v.numel() == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(v.numel()))


@dataclasses.dataclass(frozen=True, repr=False)
class MetricResult(Result):
    """An explanation-quality metric: one value per example.

    Tensors: ``values`` ``(N,)`` and metric-specific extras (e.g. ``value_stderr``, the Monte-Carlo
    standard error of each example's value). Meta: ``metric``, ``mean``, ``stderr`` (over examples),
    ``higher_is_better``, the reference paper.
    """

    kind = "evaluation"

    required_tensors = ("values",)
    required_meta = (("mean", "number"), ("stderr", "number"))

    @property
    def values(self) -> Tensor:
        """The metric of each example."""
        return self.tensors["values"]

    @property
    def mean(self) -> float:
        """Mean over examples."""
        return float(self.meta["mean"])

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`mean` over examples."""
        return float(self.meta["stderr"])

    @property
    def metric(self) -> str:
        """The metric's registry name."""
        return str(self.meta.get("metric", self.method))

    @property
    def higher_is_better(self) -> bool | None:
        """Whether larger values mean a better explanation (``None``: neither)."""
        return self.meta.get("higher_is_better")

    @property
    def title(self) -> str:
        return f"Explanation quality: {self.metric}"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("mean +- s.e.", f"{_fmt(self.mean)} +- {_fmt(self.stderr, 2)}"))
        rows.insert(2, ("examples", str(self.values.shape[0])))
        hib = self.higher_is_better
        if hib is not None:
            rows.insert(3, ("better", "higher" if hib else "lower"))
        if self.meta.get("explained"):
            rows.insert(1, ("attribution method", str(self.meta["explained"])))
        if self.meta.get("reference"):
            rows.append(("reference", str(self.meta["reference"])))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """The value of each example as a bar, mean in the title."""
        from gradsense.viz.figures import bar_chart

        v = self.values.detach().double()
        err = self.tensors.get("value_stderr")
        opts: dict[str, Any] = {
            "title": f"{self.metric}: mean {_fmt(self.mean)} +- {_fmt(self.stderr, 2)}",
            "xlabel": self.metric,
            "errors": None if err is None else err.detach().double().numpy(),
        }
        opts.update(kwargs)
        return bar_chart([f"example {i}" for i in range(v.numel())], v.numpy(), **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class CurveResult(MetricResult):
    """Deletion or insertion curves (Petsiuk et al. 2018): the score after removing (or inserting) the
    top fraction of units in attribution order. ``values`` are the areas under the curves.

    Tensors: ``values`` (AUC per example), ``curves`` ``(N, steps + 1)``, ``fractions`` ``(steps + 1,)``.
    """

    required_tensors = ("values", "curves", "fractions")

    @property
    def curves(self) -> Tensor:
        """Score of each example (rows) at each fraction (columns)."""
        return self.tensors["curves"]

    @property
    def fractions(self) -> Tensor:
        """Fraction of units removed (deletion) or inserted (insertion) at each step."""
        return self.tensors["fractions"]

    def plot(self, **kwargs: Any) -> Any:
        """Mean curve over examples, and up to four examples' curves."""
        from gradsense.viz.figures import line_chart

        c = self.curves.detach().double()
        ys = {f"mean (AUC {_fmt(self.mean, 3)})": c.mean(0).numpy()}
        for i in range(min(4, c.shape[0])):
            ys[f"example {i} (AUC {_fmt(float(self.values[i]), 3)})"] = c[i].numpy()
        unit = self.meta.get("settings", {}).get("unit", "units")
        opts: dict[str, Any] = {
            "title": f"{self.metric} curve",
            "xlabel": f"fraction of {unit}s {'removed' if self.metric == 'deletion' else 'inserted'}",
            "ylabel": str(self.meta.get("score", "score")),
        }
        opts.update(kwargs)
        return line_chart(self.fractions.double().numpy(), ys, **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class RandomizationResult(MetricResult):
    """Cascading (or independent) model-parameter randomisation (Adebayo et al. 2018).

    Tensors: ``spearman`` and ``ssim`` ``(L, N)``: similarity of each example's map after randomising the
    first ``l + 1`` layers (from the output) to the map of the trained model; ``values`` is the Spearman
    correlation with every layer randomised. Meta: ``layers`` (names, output first), ``passed`` (the maps
    changed: mean final Spearman below ``threshold``).
    """

    required_tensors = ("values", "spearman", "ssim")

    @property
    def layers(self) -> list[str]:
        """The randomised layers, in the order they were randomised (output first)."""
        return list(self.meta.get("layers") or [])

    @property
    def spearman(self) -> Tensor:
        """Rank correlation ``(L, N)`` against the original maps."""
        return self.tensors["spearman"]

    @property
    def ssim(self) -> Tensor:
        """Structural similarity ``(L, N)`` against the original maps (NaN for 1-D maps)."""
        return self.tensors["ssim"]

    @property
    def passed(self) -> bool:
        """True if the maps changed when the model was randomised (the method passes the check)."""
        return bool(self.meta.get("passed"))

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(2, ("passed (maps change)", str(self.passed)))
        sp = self.spearman.double().mean(1)
        rows.append(("Spearman per step", ", ".join(_fmt(float(v), 3) for v in sp)))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Mean similarity (Spearman, SSIM) against the number of layers randomised."""
        from gradsense.viz.figures import line_chart

        ys = {"Spearman rank correlation": self.spearman.double().mean(1).numpy()}
        ss = self.ssim.double()
        if bool(torch.isfinite(ss).any()):
            ys["SSIM"] = ss.nanmean(1).numpy()
        opts: dict[str, Any] = {
            "title": f"{self.meta.get('mode', 'cascading')} randomisation: {self.meta.get('explained', '')}",
            "xlabel": "layers randomised (from the output)",
            "ylabel": "similarity to the trained model's maps",
        }
        opts.update(kwargs)
        return line_chart(list(range(1, self.spearman.shape[0] + 1)), ys, **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class TaylorResult(MetricResult):
    """Predicted vs actual change of the output under perturbations of growing radius.

    Tensors: ``radii`` ``(R,)``; ``error_order1`` (and ``error_order2``) ``(N, R)``, the relative error
    ``sum_d |predicted - actual| / sum_d |actual|`` over the random directions ``d``; ``radius_order1``
    (= ``values``) and ``radius_order2`` ``(N,)``, the first radius at which that error passes ``tol``
    (``inf`` if it never does on the grid).
    """

    required_tensors = ("values", "radii")

    @property
    def radii(self) -> Tensor:
        """The perturbation radii (relative to each example's norm when ``relative=True``)."""
        return self.tensors["radii"]

    def errors(self, order: int = 1) -> Tensor:
        """Relative error ``(N, R)`` of the first- or second-order prediction."""
        return self.tensors[f"error_order{order}"]

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        tol = self.meta.get("settings", {}).get("tol", 0.1)
        if "radius_order2" in self.tensors:
            r2 = self.tensors["radius_order2"].double()
            rows.insert(2, (f"median radius, 2nd order passes {tol:.0%}", _fmt(float(r2.median()))))
            if torch.allclose(self.errors(1).double(), self.errors(2).double(), rtol=1e-6, atol=0.0, equal_nan=True):
                rows.insert(3, ("curvature term", "adds nothing here: the 1st- and 2nd-order errors coincide (the "
                                                  "input Hessian is ~0, as in piecewise-linear ReLU networks)"))
        rows.insert(2, (f"median radius, 1st order passes {tol:.0%}", _fmt(float(self.values.double().median()))))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Median relative error over examples against the radius (log-log)."""
        from gradsense.viz.figures import line_chart

        ys = {"1st order (gradient)": self.errors(1).double().median(0).values.numpy()}
        if "error_order2" in self.tensors:
            ys["2nd order (+ curvature)"] = self.errors(2).double().median(0).values.numpy()
        opts: dict[str, Any] = {
            "title": "predicted vs actual change",
            "xlabel": "radius" + (" / ||x||" if self.meta.get("settings", {}).get("relative", True) else ""),
            "ylabel": "relative error of the prediction",
            "logy": True,
        }
        opts.update(kwargs)
        fig = line_chart(self.radii.double().numpy(), ys, **opts)
        ax = fig.axes[0]
        ax.set_xscale("log")
        ax.axhline(float(self.meta.get("settings", {}).get("tol", 0.1)), color="0.4", linestyle=":", linewidth=1)
        return fig


@dataclasses.dataclass(frozen=True, repr=False)
class MethodTable(Result):
    """Attribution methods ranked by an explanation-quality metric.

    Tensors: one ``(M,)`` tensor per column (``mass``, ``mass_stderr``, ``pointing``, ``deletion_auc``, ...),
    rows in ranked order. Meta: ``methods`` (ranked), ``columns``, ``rank_by``, ``skipped`` (method -> why).
    """

    kind = "evaluation"

    required_meta = (("methods", "list[str]"), ("columns", "list[str]"))

    @property
    def methods(self) -> list[str]:
        """Method names, best first."""
        return list(self.meta.get("methods") or [])

    @property
    def columns(self) -> list[str]:
        """The metric columns, in display order."""
        return list(self.meta.get("columns") or [])

    def column(self, name: str) -> Tensor:
        """One column, aligned with :attr:`methods`."""
        return self.tensors[name]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per method: ``{"method": name, column: value, ...}``, best first."""
        out = []
        for i, m in enumerate(self.methods):
            row: dict[str, Any] = {"method": m}
            for c in self.columns:
                row[c] = float(self.tensors[c][i])
                if f"{c}_stderr" in self.tensors:
                    row[f"{c}_stderr"] = float(self.tensors[f"{c}_stderr"][i])
            out.append(row)
        return out

    def table(self) -> tuple[list[str], list[list[str]]]:
        """``(header, rows)`` of formatted cells, for printing and the report."""
        header = ["rank", "method", *[self.meta.get("labels", {}).get(c, c) for c in self.columns]]
        cells = []
        for i, r in enumerate(self.rows()):
            row = [str(i + 1), r["method"]]
            for c in self.columns:
                se = r.get(f"{c}_stderr")
                row.append(_fmt(r[c], 3) + ("" if se is None else f" +- {_fmt(se, 2)}"))
            cells.append(row)
        return header, cells

    @property
    def title(self) -> str:
        return f"Attribution methods ranked by {self.meta.get('rank_by', '')}"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("ranked by", str(self.meta.get("rank_by", ""))))
        rows.insert(2, ("examples", str(self.meta.get("n_examples", ""))))
        for i, r in enumerate(self.rows()):
            vals = ", ".join(f"{self.meta.get('labels', {}).get(c, c)} {_fmt(r[c], 3)}" for c in self.columns)
            rows.append((f"{i + 1}. {r['method']}", vals))
        for m, why in (self.meta.get("skipped") or {}).items():
            rows.append((f"skipped: {m}", str(why)))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Bar chart of the ranking metric with standard-error bars."""
        from gradsense.viz.figures import bar_chart

        key = str(self.meta.get("rank_by"))
        err = self.tensors.get(f"{key}_stderr")
        opts: dict[str, Any] = {
            "title": self.title,
            "xlabel": self.meta.get("labels", {}).get(key, key),
            "errors": None if err is None else err.double().numpy(),
        }
        opts.update(kwargs)
        return bar_chart(self.methods, self.tensors[key].double().numpy(), **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class GlobalSensitivityResult(Result):
    """Dataset-level input sensitivity: per-feature statistics of ``d^k L / dx_j^k`` for ``k = 1..order``.

    Tensors: ``mean_abs_order{k}`` and ``mean_order{k}`` shaped like one input (the mean over examples of
    ``|d^k L/dx_j^k|`` and of the signed derivative), ``spearman`` ``(order, order)`` (rank agreement of the
    ``mean_abs`` vectors between orders). Meta: ``order``, ``n_examples``, ``feature_names``.
    """

    kind = "evaluation"

    required_tensors = ("spearman", "mean_abs_order1", "mean_order1")
    required_meta = (("order", "int"),)

    @property
    def order(self) -> int:
        """Highest derivative order computed."""
        return int(self.meta["order"])

    def mean_abs(self, order: int = 1) -> Tensor:
        """Per-feature mean ``|d^k L / dx_j^k|`` over the dataset."""
        if not 1 <= order <= self.order:
            raise ValueError(f"order must be in 1..{self.order}, got {order}.")
        return self.tensors[f"mean_abs_order{order}"]

    def mean(self, order: int = 1) -> Tensor:
        """Per-feature mean of the signed derivative over the dataset."""
        if not 1 <= order <= self.order:
            raise ValueError(f"order must be in 1..{self.order}, got {order}.")
        return self.tensors[f"mean_order{order}"]

    @property
    def spearman(self) -> Tensor:
        """``(order, order)`` Spearman rank correlation between the orders' feature rankings."""
        return self.tensors["spearman"]

    @property
    def feature_names(self) -> list[str]:
        """Feature names (``feature 0, ...`` when none were given)."""
        names = self.meta.get("feature_names")
        n = self.mean_abs(1).numel()
        return list(names) if names else [f"feature {i}" for i in range(n)]

    def ranking(self, order: int = 1) -> list[tuple[str, float]]:
        """``(feature, mean |d^k L/dx^k|)``, most sensitive first."""
        v = self.mean_abs(order).reshape(-1).double()
        idx = torch.argsort(v, descending=True, stable=True)
        names = self.feature_names
        return [(names[i], float(v[i])) for i in idx.tolist()]

    @property
    def title(self) -> str:
        return f"Global input sensitivity (orders 1-{self.order})" if self.order > 1 else "Global input sensitivity"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("examples", str(self.meta.get("n_examples"))))
        rows.insert(2, ("differentiated", str(self.meta.get("target", ""))))
        for k in range(1, self.order + 1):
            top = ", ".join(f"{n} ({_fmt(v, 3)})" for n, v in self.ranking(k)[:5])
            rows.append((f"top features, order {k}", top))
        for a in range(self.order):
            for b in range(a + 1, self.order):
                rows.append((f"Spearman order {a + 1} vs {b + 1}", _fmt(float(self.spearman[a, b]), 3)))
        return rows

    def plot(self, order: int = 1, top: int = 20, **kwargs: Any) -> Any:
        """Ranked bar chart of the ``top`` features by mean ``|d^k L/dx^k|``."""
        from gradsense.viz.figures import bar_chart

        ranked = self.ranking(order)[:top]
        opts: dict[str, Any] = {
            "title": f"mean |d^{order}L/dx^{order}| over {self.meta.get('n_examples')} examples",
            "xlabel": f"mean |d^{order} L / dx_j^{order}|",
        }
        opts.update(kwargs)
        return bar_chart([n for n, _ in ranked], [v for _, v in ranked], **opts)
