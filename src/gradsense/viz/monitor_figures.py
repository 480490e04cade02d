"""Figures of a monitored training run, and its section of the HTML report.

Like :mod:`gradsense.viz.figures`, every function builds a :class:`matplotlib.figure.Figure` directly (no
pyplot state). :func:`add_monitor_section` adds the whole monitor part of a report from a
:class:`gradsense.results.MonitorResult`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gradsense.viz.figures import _literal, _to_numpy

__all__ = ["add_monitor_section", "conflict_matrix", "layer_heatmap", "noise_scale_figure", "training_curves"]

_MAX_ROWS = 40  # layers shown in a heatmap (the ones with the largest values)


def layer_heatmap(matrix: Any, layers: Sequence[str], steps: Any, *, marks: Sequence[tuple[int, str]] = (),
                  title: str = "", log: bool = True, label: str = "") -> Figure:
    """Layers x steps heatmap of a per-layer quantity, with marked (step, layer) cells.

    Args:
        matrix: ``(L, T)`` values (NaN: not recorded).
        layers: The ``L`` row names.
        steps: The ``T`` step numbers.
        marks: ``(step, layer)`` pairs to mark (alarms), drawn as red rings.
        title: Figure title.
        log: Colour by ``log10`` of the values.
        label: Colour bar label (default: the quantity and scale).

    Returns:
        The figure (an empty-plot note when there is nothing to show).
    """
    mat = _to_numpy(matrix, "matrix")
    xs = _to_numpy(steps, "steps").reshape(-1)
    names = [str(n) for n in layers]
    fig = Figure(figsize=(7.2, 0.9 + 0.22 * max(3, min(len(names), _MAX_ROWS))), layout="constrained")
    ax = fig.subplots()
    if mat.size == 0 or not np.isfinite(mat).any():
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    recorded = np.isfinite(mat).any(axis=0)
    if recorded.sum() >= 2 and not recorded.all():  # a quantity on a schedule: show the steps it was recorded at
        mat, xs = mat[:, recorded], xs[recorded]
    if len(names) > _MAX_ROWS:
        top = np.argsort(-np.nan_to_num(np.nanmax(mat, axis=1), nan=-np.inf))[:_MAX_ROWS]
        keep = np.sort(top)
        mat, names = mat[keep], [names[i] for i in keep]
    shown = np.where(mat > 0, mat, np.nan) if log else mat
    data = np.log10(shown) if log else shown
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    x0, x1 = (float(xs[0]), float(xs[-1])) if xs.size else (0.0, 1.0)
    half = 0.5 * (x1 - x0) / max(xs.size - 1, 1)
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest", cmap="viridis",
                   vmin=vmin, vmax=vmax, extent=(x0 - half, x1 + half, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_literal(n) for n in names], fontsize=7)
    ax.set_xlabel("step")
    row = {n: i for i, n in enumerate(names)}
    pts = [(s, row[layer]) for s, layer in marks if layer in row]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=70, facecolors="none", edgecolors="red", linewidths=1.6,
                   label="alarm")
        ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    cbar = fig.colorbar(im, ax=ax, shrink=0.9)
    cbar.set_label(_literal(label or ("log10 " + (title or "value") if log else (title or "value"))), fontsize=8)
    if title:
        ax.set_title(_literal(title))
    return fig


def training_curves(steps: Any, series: dict[str, Any], *, marks: Sequence[tuple[int, float]] = (),
                    title: str = "", logy: bool = True) -> Figure:
    """Global curves over steps (loss, gradient norm before/after clipping), alarms marked on the first one."""
    xs = _to_numpy(steps, "steps").reshape(-1)
    fig = Figure(figsize=(7.2, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, ys in series.items():
        y = _to_numpy(ys, name).reshape(-1)
        ok = np.isfinite(y)
        ax.plot(xs[ok], y[ok], label=_literal(name), linewidth=1.2)
    if marks:
        ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=60, facecolors="none", edgecolors="red",
                   linewidths=1.6, zorder=5, label="alarm")
    if logy:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(_literal(title))
    return fig


def noise_scale_figure(steps: Any, gns: Any, stderr: Any, *, per_step: Any | None = None, title: str = "") -> Figure:
    """The gradient noise scale over steps with a band of ± 2 standard errors (and per-step estimates as dots)."""
    xs = _to_numpy(steps, "steps").reshape(-1)
    g, se = _to_numpy(gns, "gns").reshape(-1), _to_numpy(stderr, "stderr").reshape(-1)
    fig = Figure(figsize=(7.2, 3.4), layout="constrained")
    ax = fig.subplots()
    if per_step is not None:
        p = _to_numpy(per_step, "per_step").reshape(-1)
        ok = np.isfinite(p) & (p > 0)
        ax.scatter(xs[ok], p[ok], s=6, color="0.6", label="one step (ratio of that step's estimates)")
    ok = np.isfinite(g)
    band = ok & np.isfinite(se)
    log = bool((g[ok] > 0).any())  # a log axis needs a positive estimate to show
    lower = g[band] - 2 * se[band]
    if log:  # a band reaching 0 or below is drawn to the bottom of the axis, not to 1e-12
        positive = g[ok & (g > 0)]
        bottom = float(positive.min()) / 10.0
        ax.set_ylim(bottom, max(float(np.nanmax(g[band] + 2 * se[band])) if band.any() else 0.0,
                                float(positive.max())) * 3.0)
        lower = np.maximum(lower, bottom)
    ax.fill_between(xs[band], lower, g[band] + 2 * se[band], alpha=0.3, color="C0", label="± 2 s.e.")
    ax.plot(xs[ok], g[ok], color="C0", label="B_simple (window)")
    if not ok.any():
        ax.text(0.5, 0.5, "no estimate yet (the gradient signal |G|^2 is not yet resolved from the noise)",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
    if log:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step")
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_literal(title or "Gradient noise scale B_simple = tr(Sigma) / |G|^2"))
    return fig


def conflict_matrix(names: Sequence[str], cosines: Any, fractions: Any | None = None, *, title: str = "") -> Figure:
    """``K x K`` matrix of the mean cosine between objectives' gradients (and the share of steps with cos < 0)."""
    cos = _to_numpy(cosines, "cosines")
    k = len(names)
    fig = Figure(figsize=(1.6 + 0.9 * k, 1.2 + 0.8 * k), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(cos, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels([_literal(n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels([_literal(n) for n in names], fontsize=8)
    frac = None if fractions is None else _to_numpy(fractions, "fractions")
    for i in range(k):
        for j in range(k):
            if not math.isfinite(cos[i, j]):
                continue
            txt = f"{cos[i, j]:.2f}"
            if frac is not None and i != j and math.isfinite(frac[i, j]):
                txt += f"\n{frac[i, j]:.0%} < 0"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if abs(cos[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("mean cosine", fontsize=8)
    ax.set_title(_literal(title or "Gradient conflict between objectives"))
    return fig


# ------------------------------------------------------------------------------------------ report
def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "n/a"


def add_monitor_section(report: Any, result: Any, *, title: str | None = None, text: str | None = None) -> None:
    """Add a monitored run to a report: summary and curves, per-layer heatmaps with alarms, noise scale,
    conflict matrix, the alarm table.

    Args:
        report: A :class:`gradsense.viz.report.Report`.
        result: A :class:`gradsense.results.MonitorResult`.
        title: Heading of the first section.
        text: Text above the summary.
    """
    cols = set(result.columns)
    steps = result.steps
    alarms = result.alarms
    title = title or "Training monitor"
    curves: dict[str, Any] = {}
    clipped = "clip_factor" in cols and bool((result.series("clip_factor") < 1 - 1e-6).any())
    for name, label in (("loss", "loss"), ("grad_norm", "gradient norm" + (", before clipping" if clipped else "")),
                        ("grad_norm_clipped", "gradient norm, after clipping (used)")):
        if name in cols and (name != "grad_norm_clipped" or clipped):
            curves[label] = result.series(name)
    figures: list[Any] = []
    if curves:
        marks = []
        if "loss" in cols:
            loss = result.series("loss").numpy()
            index = {int(s): i for i, s in enumerate(steps.tolist())}
            marks = [(a.step, float(loss[index[a.step]])) for a in alarms
                     if a.kind == "loss_spike" and a.step in index and math.isfinite(loss[index[a.step]])]
        figures.append(("loss and global gradient norm", training_curves(steps, curves, marks=marks,
                                                                           title="Loss and global gradient norm")))
    rows = [[k, v] for k, v in result.summary()]
    report.add_section(title, text=text, table=(["key", "value"], rows), figures=figures)

    heat = []
    for quantity, what in (("grad_norm", "gradient norm (before clipping)"), ("update_ratio", "update / weight norm"),
                           ("snr", "gradient SNR |G|^2 / tr(Sigma)"), ("rotation", "rotation from init (1 - cos)")):
        names, mat = result.matrix(quantity)
        if names:
            kinds = {"grad_norm": ("grad_spike",), "update_ratio": ("update_spike",)}.get(quantity, ())
            marks = [(a.step, a.layer) for a in alarms if a.kind in kinds]
            heat.append((f"{what}: layers x steps, log10 colour; red rings: alarms",
                         layer_heatmap(mat, names, steps, marks=marks, title=what)))
    if heat:
        report.add_section(f"{title}: per-layer view", level=3, figures=heat, text=(
            "Each row is a layer (module), each column a recorded step. A spike alarm is a value whose z-score "
            "against the layer's running log-statistics (EMA) exceeds the threshold."))

    if "gns" in cols:
        per_step = None
        if "gns/trace" in cols and "gns/grad_sq" in cols:
            with np.errstate(divide="ignore", invalid="ignore"):
                per_step = result.series("gns/trace").numpy() / result.series("gns/grad_sq").numpy()
        gns, se = result.noise_scale()
        report.add_section(f"{title}: gradient noise scale", level=3, figures=[noise_scale_figure(
            steps, result.series("gns"), result.series("gns_stderr"), per_step=per_step)], text=(
            f"B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018): the batch size where gradient noise and signal are "
            f"equal, a rough guide to the critical batch size. Numerator and denominator are unbiased per-step "
            f"estimates averaged over a window before dividing; the band is ± 2 standard errors. Last: "
            f"{_fmt(gns)} ± {_fmt(se)}."))

    conflict = result.conflict()
    if conflict:
        objectives = sorted({n for pair in conflict for n in pair.split("|")})
        k = len(objectives)
        cos = np.eye(k)
        frac = np.full((k, k), np.nan)
        for pair, d in conflict.items():
            a, b = pair.split("|")
            i, j = objectives.index(a), objectives.index(b)
            cos[i, j] = cos[j, i] = d["mean_cos"]
            frac[i, j] = frac[j, i] = d["fraction_in_conflict"]
        report.add_section(f"{title}: gradient conflict", level=3,
                           figures=[conflict_matrix(objectives, cos, frac)], text=(
                               "Mean cosine between the objectives' gradients over the steps where it was measured, "
                               "and the share of steps in conflict (cosine < 0)."))

    if alarms:
        table = [[a.step, a.kind.replace("_", " "), a.layer or "-", _fmt(a.value),
                  _fmt(a.zscore), ", ".join(a.layers[:3]) or "-"] for a in alarms[:50]]
        more = f" (first 50 of {len(alarms)})" if len(alarms) > 50 else ""
        report.add_section(f"{title}: alarms{more}", level=3,
                           table=(["step", "kind", "layer", "value", "z", "moved first"], table))
