"""Results of the importance analyses: scores, pruning masks, bit allocations and sparsity sweeps.

- :class:`ImportanceResult`: scores of weights, channels, heads or layers (``.scores``, ``.ranking()``), and the
  verbs that turn them into decisions: ``.prune(...)`` -> :class:`PruneResult`, ``.allocate_bits(...)`` ->
  :class:`BitsResult`. A result made by :func:`gradsense.importance.importance` remembers the model, loss and
  data it was computed from (not saved), so those decisions come with the measured loss change when ``heldout=``
  was given; a reloaded result can still prune, and ``.measure(model, loss, data)`` measures.
- :class:`PruneResult` is a mapping ``{parameter: bool mask}`` (``True`` = keep) with achieved sparsities and
  the measured-vs-predicted loss change; :class:`BitsResult` a mapping ``{parameter: bits}`` with the HAWQ-V2
  objective and the same comparison against uniform bits at the same budget.
- :class:`SweepResult`: methods x sparsities -> measured loss and accuracy, with the predictions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = [
    "PREDICTION_NOTE",
    "BitsResult",
    "ImportanceResult",
    "ImportanceVerbs",
    "PruneResult",
    "SweepResult",
    "attach_verbs",
    "prediction_verdict",
]


@dataclasses.dataclass(frozen=True)
class ImportanceVerbs:
    """What the result types need from the importance analysis, handed to them by it (results never import it).

    Attributes:
        prune: ``(result, sparsity, *, structure, scope, floor, measure) -> PruneResult``.
        allocate_bits: ``(result, mean_bits, *, choices, measure) -> BitsResult``.
        measurer: ``(model, loss_fn, data, *, calibration, metric, batch_size) -> (change -> measurement dict)``.
    """

    prune: Callable[..., PruneResult]
    allocate_bits: Callable[..., BitsResult]
    measurer: Callable[..., Callable[[Any], dict[str, Any]]]


_VERBS: list[ImportanceVerbs] = []


def attach_verbs(verbs: ImportanceVerbs) -> None:
    """Called by :mod:`gradsense.importance` when it is imported: the verbs behind the result methods."""
    _VERBS[:] = [verbs]


def _verbs(what: str) -> ImportanceVerbs:
    if not _VERBS:
        # the package root wires the layers: it imports the analysis that attaches the verbs (results name none)
        import gradsense

        gradsense._attach_verbs("importance")
    if not _VERBS:
        raise RuntimeError(f"{what} needs the importance analysis: import gradsense.importance first.")
    return _VERBS[0]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


PREDICTION_RTOL = 0.5
PREDICTION_NOTE = (
    "The Taylor prediction holds when it is within 50% of the measured change (or both are below 0.1% of the "
    "dense loss). A row marked 'fails' left the region where the local expansion describes the model: the change "
    "is too large for a first/second-order account, so trust the measured column, not the prediction.")


def prediction_verdict(m: dict[str, Any] | None) -> tuple[bool | None, str]:
    """Whether the Taylor prediction of a decision matches its measured loss change, and a short verdict.

    The second-order prediction is used when there is one. It holds when ``|measured - predicted| <= 0.5
    max(|measured|, |predicted|)``, or when both changes are below 0.1% of the dense held-out loss (too small
    to tell apart). Otherwise the verdict says by how much, and in which direction, it misses.

    Returns:
        ``(holds, text)``: ``holds`` is ``None`` when nothing was measured.
    """
    if not m:
        return None, "not measured"
    measured = float(m["loss_change"])
    pred = m.get("predicted_second_order")
    pred = float(m["predicted_first_order"] if pred is None else pred)
    if not (math.isfinite(measured) and math.isfinite(pred)):
        return False, "fails: not finite"
    atol = 1e-3 * abs(float(m.get("loss_before") or 0.0))
    if abs(measured) <= atol and abs(pred) <= atol:
        return True, "holds (both negligible)"
    if abs(measured - pred) <= PREDICTION_RTOL * max(abs(measured), abs(pred)):
        return True, "holds"
    if measured * pred <= 0:
        return False, "fails: wrong sign" if pred != 0 else "fails: predicted no change"
    factor = abs(measured) / abs(pred)
    return False, f"fails: {factor:.3g}x too small" if factor > 1 else f"fails: {1 / factor:.3g}x too large"


def measured_rows(m: dict[str, Any] | None, label: str = "") -> list[tuple[str, str]]:
    """Summary rows of a measurement (see :class:`gradsense.importance.measure.Measurer`)."""
    if not m:
        return [(f"measured{label}", "not measured (pass heldout= to importance(), or call .measure())")]
    rows = [
        (f"held-out loss{label}", f"{_fmt(m['loss_before'], 5)} -> {_fmt(m['loss_after'], 5)} "
                                  f"(measured change {m['loss_change']:+.4g})"),
        (f"predicted change{label}", f"first order {m['predicted_first_order']:+.4g}, second order "
                                     f"{_fmt(m.get('predicted_second_order'))}"),
    ]
    rows.append((f"Taylor prediction{label}", prediction_verdict(m)[1]))
    if m.get("metric_after") is not None:
        metric = m.get("metric_name") or "metric"
        rows.append((f"held-out {metric}{label}", f"{_fmt(m['metric_before'], 4)} -> {_fmt(m['metric_after'], 4)} "
                                                  f"({m['metric_change']:+.4g})"))
    return rows


@dataclasses.dataclass(frozen=True, repr=False)
class ImportanceResult(Result):
    """Importance scores of one method at one granularity.

    Tensors: ``score/<key>`` for every scored weight tensor (``granularity="weight"``, param-shaped), layer
    (``"channel"``/``"head"``: ``(units,)``; ``"layer"``: 0-d); method extras such as ``curvature/<param>``
    (``Tr(H_l)`` or ``Tr(F_l)``, used by :meth:`allocate_bits`), ``trace/<group>`` with ``trace_stderr/<group>``
    (Hutch++ per structure), ``hdiag/<param>`` (the Hessian diagonal), ``qerr/<param>`` (``||Q_b(W) - W||^2`` for
    ``b = 2..16``).

    A result from :func:`gradsense.importance.importance` keeps the run's model, loss and data in ``context`` (not
    saved), so that :meth:`prune` and :meth:`allocate_bits` measure on its held-out data. That measurement checks
    first that the model is still the one that was scored - the same weights and buffers (hash), BatchNorm/Dropout
    in eval mode - and raises a clear error otherwise (pass ``measure=False`` to skip it). A result read back
    with :meth:`Result.load` has no context: it prunes and allocates bits just the same (they need only the saved
    scores and shapes), without a measurement; measure those with ``PruneResult.measure(model, loss_fn, data)``.

    Attributes:
        context: The run's model, loss and data (not saved; ``None`` after :meth:`Result.load`).
    """

    context: Any = dataclasses.field(default=None, compare=False)
    kind = "importance"

    required_meta = (("keys", "list[str]"), ("param_names", "list[str]"), ("param_shapes", "list[shape]"))

    @property
    def granularity(self) -> str:
        """``"weight"``, ``"channel"``, ``"head"`` or ``"layer"``."""
        return str(self.meta.get("granularity", "weight"))

    @property
    def scores(self) -> dict[str, Tensor]:
        """``{name: scores}``: parameter names (weight), layer/attention module names (channel, head, layer)."""
        return {k: self.tensors[f"score/{k}"] for k in self.meta.get("keys", [])}

    def ranking(self, level: str = "layer") -> list[tuple[str, float]]:
        """Layers (or units) from most to least important.

        Args:
            level: ``"layer"``: each layer's total score (the sum over its weights or units), or ``"unit"``: every
                channel/head as ``"<layer>[i]"`` (channel/head granularity only).

        Returns:
            ``[(name, score), ...]`` sorted by decreasing score.

        Raises:
            ValueError: Unknown ``level``, or ``"unit"`` for weight/layer granularity.
        """
        if level == "unit":
            if self.granularity not in ("channel", "head"):
                raise ValueError(f"ranking(level='unit') needs channel or head scores, these are {self.granularity!r}.")
            items = [(f"{k}[{i}]", float(v)) for k, s in self.scores.items() for i, v in enumerate(s.reshape(-1))]
        elif level == "layer":
            totals: dict[str, float] = {}
            layers = self.meta.get("layers", {})
            for k, s in self.scores.items():
                layer = layers.get(k, k)
                totals[layer] = totals.get(layer, 0.0) + float(s.double().sum())
            items = list(totals.items())
        else:
            raise ValueError(f"level must be 'layer' or 'unit', got {level!r}.")
        return sorted(items, key=lambda t: -t[1])

    def prune(self, sparsity: float | None = None, structure: str = "unstructured", scope: str = "global", *,
              floor: int | float = 0, measure: bool = True) -> PruneResult:
        """Masks that remove the lowest-scored weights or units (see :func:`gradsense.importance.api.prune`)."""
        return _verbs("ImportanceResult.prune").prune(self, sparsity, structure=structure, scope=scope, floor=floor,
                                                      measure=measure)

    def allocate_bits(self, mean_bits: float, choices: tuple[int, ...] = (2, 3, 4, 8), *,
                      measure: bool = True) -> BitsResult:
        """HAWQ-V2 bit widths under an average budget (see :func:`gradsense.importance.api.allocate_bits`)."""
        return _verbs("ImportanceResult.allocate_bits").allocate_bits(self, mean_bits, choices=choices, measure=measure)

    @property
    def title(self) -> str:
        return f"Importance: {self.method} ({self.granularity})"

    def summary(self) -> list[tuple[str, str]]:
        rows = super().summary()
        rows.insert(1, ("granularity", self.granularity))
        rows.insert(2, ("scored", f"{self.meta.get('numel', 0)} parameters in {len(self.meta.get('param_names', []))} "
                                  f"tensors, {self.meta.get('n_examples', 0)} calibration examples"))
        cost = self.meta.get("cost") or {}
        if cost:
            rows.insert(3, ("cost", ", ".join(f"{k} {v}" for k, v in cost.items())))
        for key in ("loss_change", "integral", "taylor"):
            if key in self.meta:
                rows.append({"loss_change": ("PQI: measured L(Q(W)) - L(W)", ),
                             "integral": ("PQI: path integral total", ),
                             "taylor": ("PQI: Taylor estimate g . (Q(W) - W)", )}[key] + (f"{self.meta[key]:+.5g}",))
        for name, value in self.ranking()[:5]:
            rows.append((f"top layer: {name}", _fmt(value, 4)))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Bar chart of the layers ranked by total score (a logarithmic axis when they span 20x or more)."""
        from gradsense.viz.figures import bar_chart

        ranked = self.ranking()
        labels, values = [r[0] for r in ranked], [r[1] for r in ranked]
        log = all(v > 0 for v in values) and max(values) > 20 * min(values)
        opts: dict[str, Any] = {"title": f"Layers ranked by {self.method} importance (sum over {self.granularity}s)",
                                "xlabel": "total importance", "log": log}
        opts.update(kwargs)
        return bar_chart(labels, values, **opts)


class _MappingResult:
    """Mapping access to ``tensors``/``meta`` entries (masks or bits by parameter name)."""

    def _items(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __contains__(self, key: object) -> bool:
        return key in self._items()

    def keys(self) -> Any:
        return self._items().keys()

    def values(self) -> Any:
        return self._items().values()

    def items(self) -> Any:
        return self._items().items()


@dataclasses.dataclass(frozen=True, repr=False)
class PruneResult(_MappingResult, Result):
    """Pruning masks ``{parameter: bool mask}`` (``True`` = keep) with sparsities and the measured loss change.

    Tensors: ``mask/<param>``. Meta: ``structure``, ``scope``, ``sparsity`` (target), ``achieved`` (fraction of
    candidates removed: weights, or channels/heads), ``weight_sparsity`` (zeros among the masked tensors),
    ``per_tensor`` sparsities, ``measured`` (see :class:`gradsense.importance.measure.Measurer`).
    """

    kind = "importance"

    required_meta = (("structure", "str"), ("scope", "str"))

    def _items(self) -> dict[str, Tensor]:
        return {k[5:]: v for k, v in self.tensors.items() if k.startswith("mask/")}

    @property
    def masks(self) -> dict[str, Tensor]:
        """``{parameter: bool mask}``."""
        return self._items()

    @property
    def measured(self) -> dict[str, Any] | None:
        """The measured and predicted loss change (``None`` if not measured)."""
        return self.meta.get("measured")

    def measure(self, model: Any, loss_fn: Any, data: Any, *, calibration: Any = None, metric: Any = "auto",
                batch_size: int = 256) -> PruneResult:
        """A copy of this result with the change measured on ``data`` (see :func:`gradsense.importance.measure`)."""
        meas = _verbs("PruneResult.measure").measurer(model, loss_fn, data, calibration=calibration, metric=metric,
                                                      batch_size=batch_size)
        return dataclasses.replace(self, meta={**self.meta, "measured": meas(self.masks)})

    @property
    def title(self) -> str:
        return f"Pruning masks: {self.meta.get('structure')} at {_pct(self.meta.get('achieved'))} ({self.method})"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("scores", str(self.method)), ("structure", str(self.meta.get("structure"))),
                                       ("scope", str(self.meta.get("scope")))]
        rows.append(("sparsity", f"target {_pct(self.meta.get('sparsity'))}, achieved {_pct(self.meta.get('achieved'))}"
                                 f" of {self.meta.get('candidates')} {self.meta.get('unit', 'weights')}"))
        rows.append(("zeros in masked tensors", _pct(self.meta.get("weight_sparsity"))))
        rows.extend(measured_rows(self.measured))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Bar chart of each tensor's sparsity."""
        from gradsense.viz.figures import bar_chart

        per = self.meta.get("per_tensor") or {}
        opts: dict[str, Any] = {"title": f"Sparsity per tensor ({self.meta.get('structure')}, {self.meta.get('scope')})",
                                "xlabel": "fraction of weights removed"}
        opts.update(kwargs)
        return bar_chart(list(per), [float(v) for v in per.values()], **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class BitsResult(_MappingResult, Result):
    """Bit widths ``{parameter: bits}`` (HAWQ-V2 under an average budget) with the measured loss change.

    Meta: ``bits``, ``mean_bits`` (target), ``achieved_mean_bits``, ``objective`` (``sum_l Tr(H_l)/n_l
    ||Q(W_l) - W_l||^2``), ``uniform_objective`` and ``uniform_measured`` (all tensors at ``mean_bits``, when it is
    one of the choices), ``measured``, ``exact`` (whether the knapsack search was exact).
    """

    kind = "importance"

    required_meta = (("bits", "dict[str, int]"),)

    def _items(self) -> dict[str, int]:
        return {k: int(v) for k, v in (self.meta.get("bits") or {}).items()}

    @property
    def bits(self) -> dict[str, int]:
        """``{parameter: bits}``."""
        return self._items()

    @property
    def measured(self) -> dict[str, Any] | None:
        """The measured and predicted loss change of the mixed-precision allocation."""
        return self.meta.get("measured")

    def measure(self, model: Any, loss_fn: Any, data: Any, *, calibration: Any = None, metric: Any = "auto",
                batch_size: int = 256) -> BitsResult:
        """A copy with the allocation (and uniform bits at the same budget) measured on ``data``."""
        meas = _verbs("BitsResult.measure").measurer(model, loss_fn, data, calibration=calibration, metric=metric,
                                                     batch_size=batch_size)
        extra: dict[str, Any] = {"measured": meas(self.bits)}
        uniform = self.meta.get("uniform_bits")
        if uniform is not None:
            extra["uniform_measured"] = meas(dict.fromkeys(self.bits, int(uniform)))
        return dataclasses.replace(self, meta={**self.meta, **extra})

    def __repr__(self) -> str:
        bits = ", ".join(f"{k!r}: {v}" for k, v in self.bits.items())
        return (f"BitsResult(method={self.method!r}, mean_bits={_fmt(self.meta.get('achieved_mean_bits'), 4)}, "
                f"bits={{{bits}}})")

    @property
    def title(self) -> str:
        return f"Mixed precision: {_fmt(self.meta.get('achieved_mean_bits'), 4)} bits on average ({self.method})"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [
            ("sensitivity", f"{self.meta.get('curvature')} trace per tensor, Tr/n ({self.method})"),
            ("budget", f"{self.meta.get('mean_bits')} bits/weight; used {_fmt(self.meta.get('achieved_mean_bits'), 5)}"),
            ("choices", str(self.meta.get("choices"))),
            ("objective sum Tr(H)/n ||Q(W)-W||^2", f"{_fmt(self.meta.get('objective'))} (uniform "
                                                  f"{_fmt(self.meta.get('uniform_objective'))})"),
        ]
        rows.extend(measured_rows(self.measured, " (mixed)"))
        if self.meta.get("uniform_measured"):
            rows.extend(measured_rows(self.meta["uniform_measured"], f" (uniform {self.meta.get('uniform_bits')} bits)"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Bar chart of the bits of each tensor."""
        from gradsense.viz.figures import bar_chart

        opts: dict[str, Any] = {"title": f"Bits per tensor (mean {_fmt(self.meta.get('achieved_mean_bits'), 4)})",
                                "xlabel": "bits"}
        opts.update(kwargs)
        return bar_chart(list(self.bits), list(self.bits.values()), **opts)


@dataclasses.dataclass(frozen=True, repr=False)
class SweepResult(Result):
    """Methods x sparsities -> measured held-out loss and metric, with the first/second-order predictions.

    Tensors (``(methods, sparsities)`` float64): ``loss``, ``metric`` (NaN without one), ``predicted_first_order``,
    ``predicted_second_order``, ``achieved``. Meta: ``methods``, ``sparsities``, ``structure``, ``scope``,
    ``loss_before``, ``metric_before``.
    """

    kind = "importance"

    required_tensors = ("loss", "metric", "predicted_first_order", "predicted_second_order", "achieved")
    required_meta = (("methods", "list[str]"), ("sparsities", "list[number]"), ("loss_before", "number"))

    @property
    def methods(self) -> list[str]:
        return list(self.meta.get("methods", []))

    @property
    def sparsities(self) -> list[float]:
        return [float(s) for s in self.meta.get("sparsities", [])]

    def table(self, metric: str | None = None) -> tuple[list[str], list[list[Any]]]:
        """``(header, rows)``: one row per (method, sparsity) with measured and predicted changes, whether the
        prediction holds (see :func:`prediction_verdict`), and the metric (named ``metric``, default
        ``meta['metric_name']`` or ``"metric"``)."""
        name = metric or self.meta.get("metric_name") or "metric"
        header = ["method", "sparsity", "held-out loss", "loss change", "predicted (1st order)",
                  "predicted (2nd order)", "Taylor prediction", name]
        rows = []
        t = self.tensors
        before = float(self.meta["loss_before"])
        for i, m in enumerate(self.methods):
            for j in range(len(self.sparsities)):
                value = float(t["metric"][i, j])
                change = float(t["loss"][i, j]) - before
                verdict = prediction_verdict({
                    "loss_change": change, "loss_before": before,
                    "predicted_first_order": float(t["predicted_first_order"][i, j]),
                    "predicted_second_order": float(t["predicted_second_order"][i, j])})[1]
                rows.append([m, f"{float(t['achieved'][i, j]):.0%}", f"{float(t['loss'][i, j]):.4f}",
                             f"{change:+.4f}", f"{float(t['predicted_first_order'][i, j]):+.4f}",
                             f"{float(t['predicted_second_order'][i, j]):+.4f}", verdict,
                             "n/a" if math.isnan(value) else f"{value:.4f}"])
        return header, rows

    def grid(self, what: str = "loss") -> tuple[list[str], list[list[Any]]]:
        """``(header, rows)``: methods as rows, sparsities as columns, ``what`` (``"loss"`` or ``"metric"``) in cells."""
        header = ["method", *[f"{s:.0%}" for s in self.sparsities]]
        rows = [[m, *[f"{float(v):.4f}" for v in self.tensors[what][i]]] for i, m in enumerate(self.methods)]
        return header, rows

    @property
    def title(self) -> str:
        return f"Sparsity sweep ({self.meta.get('structure')}, {self.meta.get('scope')})"

    def summary(self) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = [("methods", ", ".join(self.methods)),
                                       ("sparsities", ", ".join(f"{s:.0%}" for s in self.sparsities)),
                                       ("dense held-out loss", _fmt(self.meta.get("loss_before"), 5))]
        if self.meta.get("metric_before") is not None:
            rows.append(("dense held-out metric", _fmt(self.meta.get("metric_before"), 4)))
        loss = self.tensors["loss"]
        for j, s in enumerate(self.sparsities):
            best = int(torch.argmin(loss[:, j]))
            rows.append((f"best at {s:.0%}", f"{self.methods[best]} (loss {float(loss[best, j]):.4f})"))
        return rows

    def plot(self, what: str = "loss", **kwargs: Any) -> Any:
        """Measured held-out ``what`` (``"loss"`` or ``"metric"``) against sparsity, one line per method."""
        from gradsense.viz.figures import line_chart

        x = torch.tensor(self.sparsities)
        series = {m: self.tensors[what][i] for i, m in enumerate(self.methods)}
        ylabel = "held-out loss" if what == "loss" else "held-out metric"
        opts: dict[str, Any] = {"title": f"Measured {ylabel} vs sparsity ({self.meta.get('structure')})",
                                "xlabel": "sparsity", "ylabel": ylabel, "logy": what == "loss"}
        opts.update(kwargs)
        return line_chart(x, series, **opts)


Mapping.register(PruneResult)
Mapping.register(BitsResult)
