"""Matplotlib figures for gradsense results.

Every function here builds a :class:`matplotlib.figure.Figure` directly (``Figure(...)``), never
through ``matplotlib.pyplot``: no global pyplot state is created or changed, no backend is switched,
and a figure is freed as soon as nothing refers to it. This keeps the functions safe to call from
scripts, servers and notebooks alike (in a notebook, a returned ``Figure`` displays itself).
PNG rendering goes through the Agg canvas, whatever backend the caller has selected.

User-supplied strings (titles, labels, feature names, tokens) are shown literally: a ``$`` never
switches on mathtext.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

__all__ = [
    "attribution_grid",
    "bar_chart",
    "close_figure",
    "fig_to_png",
    "line_chart",
    "method_grid",
    "token_heatmap",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Anything :func:`numpy.asarray` understands, or a torch tensor (any device or dtype).
ArrayLike = Any


# --------------------------------------------------------------------------------------- helpers
def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a tensor / array / nested sequence to a float64 numpy array for display."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name} must be a tensor, a numpy array or a nested sequence of numbers; got {type(x).__name__}."
        ) from exc


def _literal(text: object) -> str:
    """Make ``text`` render literally in matplotlib (escape ``$`` so mathtext never starts)."""
    return str(text).replace("$", r"\$")


def _max_abs(a: np.ndarray) -> float:
    """Largest finite absolute value of ``a``, or 1.0 if there is none or it is zero.

    Used as a colour limit; a zero limit would make a degenerate colour scale.
    """
    finite = np.abs(a[np.isfinite(a)])
    m = float(finite.max()) if finite.size else 0.0
    return m if m > 0.0 else 1.0


def _check_titles(titles: Sequence[str] | None, n: int) -> list[str]:
    if titles is None:
        return [f"example {i}" for i in range(n)]
    titles = [str(t) for t in titles]
    if len(titles) < n:
        raise ValueError(
            f"titles has {len(titles)} entries, but {n} examples are shown; give one per example."
        )
    return titles[:n]


def close_figure(fig: Any) -> None:
    """Release a figure after use.

    Figures made by this module are not tracked by pyplot and are freed by garbage collection;
    figures made with ``matplotlib.pyplot`` are tracked and would leak until closed. This closes
    the latter without importing pyplot when it was never imported (so nothing changes the
    caller's backend).

    Args:
        fig: A matplotlib figure.
    """
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def fig_to_png(fig: Figure, dpi: float = 100, *, close: bool = False) -> bytes:
    """Render a figure to PNG bytes with the Agg renderer.

    The bytes are remembered on the figure: rendering it again at the same resolution, unchanged since (matplotlib's
    ``stale`` flag is clear), returns them without drawing twice (a run folder and a report both showing a figure).

    Args:
        fig: The matplotlib figure to render.
        dpi: Resolution in dots per inch.
        close: Release the figure afterwards (see :func:`close_figure`).

    Returns:
        The PNG file contents.

    Raises:
        TypeError: If ``fig`` is not a matplotlib Figure.
        ValueError: If ``dpi`` is not positive.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib.figure.Figure; got {type(fig).__name__}.")
    if not dpi > 0:
        raise ValueError(f"dpi must be positive; got {dpi!r}.")
    cached = getattr(fig, "_gradsense_png", None)
    if cached is not None and cached[0] == float(dpi) and not fig.stale:
        if close:
            close_figure(fig)
        return cached[1]
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    finally:
        if close:
            close_figure(fig)
    png = buf.getvalue()
    # savefig leaves the flag set; clear it: any later change to an artist sets it again (it propagates up)
    fig.stale = False
    fig._gradsense_png = (float(dpi), png)  # type: ignore[attr-defined]
    return png


# --------------------------------------------------------------------------------------- attribution
def _display_image(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C,H,W) or (H,W) input -> an array imshow can show, min-max scaled to [0, 1], and its cmap.

    One or three channels show as grayscale or RGB; any other channel count shows its mean.
    """
    if x.ndim == 3:
        img = x[0] if x.shape[0] == 1 else (np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x.mean(axis=0))
    else:
        img = x
    finite = np.isfinite(img)
    lo = float(img[finite].min()) if finite.any() else 0.0
    hi = float(img[finite].max()) if finite.any() else 0.0
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    img = np.clip(np.nan_to_num(img), 0.0, 1.0)
    return img, (None if img.ndim == 3 else "gray")


def _grayscale(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114]) if img.ndim == 3 else img


def _image_grid(
    inputs: np.ndarray | None,
    attrs: np.ndarray,
    titles: list[str],
    cmap: str,
    signed: bool,
    colorbar: bool,
    overlay_alpha: float,
) -> Figure:
    n = attrs.shape[0]
    ncols = 2 if inputs is not None else 1
    width = 2.6 * ncols + (0.6 if colorbar else 0.0)
    fig = Figure(figsize=(width, 2.5 * n), layout="constrained")
    axes = fig.subplots(n, ncols, squeeze=False)
    for i in range(n):
        a = attrs[i]
        heat = (
            (a.sum(axis=0) if signed else np.abs(a).sum(axis=0))
            if a.ndim == 3
            else (a if signed else np.abs(a))
        )
        m = _max_abs(heat)
        vmin, vmax = (-m, m) if signed else (0.0, m)
        ax_heat = axes[i, ncols - 1]
        extent = None
        alpha = 1.0
        if inputs is not None:
            img, img_cmap = _display_image(inputs[i])
            ax_in = axes[i, 0]
            ax_in.imshow(img, cmap=img_cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax_in.set_title(_literal(titles[i]), fontsize=9)
            ax_in.set_label("input")
            ax_in.set_axis_off()
            h, w = img.shape[:2]
            extent = (-0.5, w - 0.5, h - 0.5, -0.5)
            ax_heat.imshow(_grayscale(img), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            alpha = overlay_alpha
        same_size = extent is None or heat.shape == (round(extent[2] + 0.5), round(extent[1] + 0.5))
        im = ax_heat.imshow(
            np.ma.masked_invalid(heat),
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            alpha=alpha,
            extent=extent,
            interpolation="nearest" if same_size else "bilinear",
        )
        ax_heat.set_title(_literal("attribution" if inputs is not None else titles[i]), fontsize=9)
        ax_heat.set_label("attribution")
        ax_heat.set_axis_off()
        if colorbar:
            fig.colorbar(
                ScalarMappable(norm=im.norm, cmap=im.get_cmap()), ax=ax_heat, fraction=0.046, pad=0.04
            )
    return fig


def _tabular_grid(
    inputs: np.ndarray | None,
    attrs: np.ndarray,
    titles: list[str],
    cmap: str,
    signed: bool,
    feature_names: Sequence[str] | None,
    top_k: int,
) -> Figure:
    n, f = attrs.shape
    if feature_names is None:
        names = [f"x{j}" for j in range(f)]
    else:
        names = [str(s) for s in feature_names]
        if len(names) != f:
            raise ValueError(
                f"feature_names has {len(names)} entries but the attributions have {f} features."
            )
    k = min(top_k, f)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, (0.28 * k + 1.0) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = colormaps[cmap]
    for ax in axes[n:]:
        fig.delaxes(ax)
    for i in range(n):
        a = attrs[i] if signed else np.abs(attrs[i])
        key = np.where(np.isfinite(a), np.abs(a), -np.inf)
        order = np.argsort(-key, kind="stable")[:k][::-1]  # largest at the top
        vals = np.nan_to_num(a[order])
        m = _max_abs(a)
        norm = Normalize(-m, m) if signed else Normalize(0.0, m)
        labels = [_literal(names[j] if inputs is None else f"{names[j]} = {inputs[i, j]:.3g}") for j in order]
        ax = axes[i]
        ax.barh(np.arange(k), vals, color=colours(norm(vals)), edgecolor="0.3", linewidth=0.5)
        ax.set_yticks(np.arange(k), labels=labels, fontsize=8)
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ax.set_title(_literal(titles[i]), fontsize=9)
        ax.set_xlabel("attribution" if signed else "|attribution|", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_label("attribution")
    return fig


def attribution_grid(
    inputs: ArrayLike | None,
    attributions: ArrayLike,
    *,
    titles: Sequence[str] | None = None,
    cmap: str | None = None,
    signed: bool = True,
    max_items: int = 8,
    feature_names: Sequence[str] | None = None,
    top_k: int = 10,
    colorbar: bool = True,
    overlay_alpha: float = 0.6,
    title: str | None = None,
) -> Figure:
    """Show attribution maps next to the inputs they explain, one example per row.

    The kind of plot follows the shape of ``attributions``:

    - images, ``(N, C, H, W)`` or ``(N, H, W)``: per example, the input (grayscale for ``C=1``,
      RGB for ``C=3``, the channel mean otherwise; min-max scaled per example) and the attribution
      map summed over channels, drawn over a grayscale copy of the input. Each map has its own
      colour scale: ``(-m, m)`` for signed maps and ``(0, m)`` otherwise, ``m`` being the largest
      absolute value of that example's map (``1`` for an all-zero map). Maps with a smaller
      spatial size than the input (e.g. Grad-CAM) are stretched over it.
    - features, ``(N, F)`` (or one example ``(F,)``): per example, a horizontal bar chart of the
      ``top_k`` features with the largest absolute attribution, coloured by value; with
      ``inputs`` of the same shape, the labels also show each feature's value.

    For token attributions use :func:`token_heatmap`.

    Args:
        inputs: The explained inputs, ``(N, C, H, W)``/``(N, H, W)`` for images or ``(N, F)``
            for features; ``None`` to show the attributions alone.
        attributions: Attribution maps, one per input (tensor or array).
        titles: One title per example (default ``"example i"``).
        cmap: Matplotlib colormap name; default ``"bwr"`` when ``signed`` else ``"magma"``
            (images) / ``"viridis"`` (features).
        signed: Keep signs (symmetric colour scale) or show magnitudes (channel sum of
            ``|attribution|`` for images).
        max_items: Show at most this many examples (the first ones).
        feature_names: Names of the ``F`` features (default ``x0 .. x{F-1}``).
        top_k: Number of features shown per example for feature attributions.
        colorbar: Add a colour bar next to each image map.
        overlay_alpha: Opacity of the map over the input image.
        title: Optional title of the whole figure.

    Returns:
        A Figure. Image grids hold, per example, an axes labelled ``"input"`` (when ``inputs`` is
        given), one labelled ``"attribution"`` and, with ``colorbar``, a colour-bar axes; feature
        grids hold one ``"attribution"`` axes per example.

    Raises:
        ValueError: On unsupported shapes, mismatched batch sizes, too few titles or feature
            names, or non-positive ``max_items``/``top_k``.
        TypeError: If an input cannot be converted to an array.

    Example:
        >>> import torch
        >>> fig = attribution_grid(torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8), colorbar=False)
        >>> len(fig.axes)
        4
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1; got {max_items}.")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}.")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"overlay_alpha must lie in [0, 1]; got {overlay_alpha}.")
    attrs = _to_numpy(attributions, "attributions")
    x = None if inputs is None else _to_numpy(inputs, "inputs")
    if attrs.ndim == 1:
        attrs = attrs[None]
        x = None if x is None else x.reshape(1, -1)
    if attrs.ndim not in (2, 3, 4):
        raise ValueError(
            "attributions must have shape (N, C, H, W) or (N, H, W) for images, or (N, F) for features; "
            f"got shape {tuple(attrs.shape)}. For tokens use token_heatmap()."
        )
    if x is not None and x.shape[0] != attrs.shape[0]:
        raise ValueError(
            f"inputs and attributions must hold the same number of examples; got {x.shape[0]} and {attrs.shape[0]}."
        )
    n = min(attrs.shape[0], max_items)
    if n == 0:
        raise ValueError("attributions hold no examples (batch size 0).")
    attrs = attrs[:n]
    x = None if x is None else x[:n]
    names = _check_titles(titles, n)
    if attrs.ndim == 2:
        if x is not None and x.shape != attrs.shape:
            raise ValueError(
                f"feature inputs must have the attributions' shape {tuple(attrs.shape)}; got {tuple(x.shape)}."
            )
        fig = _tabular_grid(
            x, attrs, names, cmap or ("bwr" if signed else "viridis"), signed, feature_names, top_k
        )
    else:
        if x is not None and x.ndim not in (3, 4):
            raise ValueError(f"image inputs must have shape (N, C, H, W) or (N, H, W); got {tuple(x.shape)}.")
        fig = _image_grid(
            x, attrs, names, cmap or ("bwr" if signed else "magma"), signed, colorbar, overlay_alpha
        )
    if title is not None:
        fig.suptitle(_literal(title))
    return fig


def token_heatmap(
    tokens: Sequence[str],
    scores: ArrayLike,
    *,
    title: str | None = None,
    cmap: str | None = None,
    signed: bool = True,
    line_chars: int = 80,
    colorbar: bool = True,
) -> Figure:
    """Draw tokens as coloured boxes, the colour showing each token's score.

    Tokens flow left to right and wrap into lines of about ``line_chars`` characters. The colour
    scale is ``(-m, m)`` for signed scores and ``(0, m)`` otherwise, ``m = max |score|``.

    Args:
        tokens: The tokens, in order (shown literally).
        scores: One score per token (1-D tensor or array; a batch of one, ``(1, T)``, is accepted).
        title: Optional figure title.
        cmap: Colormap name; default ``"bwr"`` when ``signed`` else ``"Reds"``.
        signed: Keep signs or show ``|score|``.
        line_chars: Approximate line width in characters before wrapping.
        colorbar: Add a horizontal colour bar below the text.

    Returns:
        A Figure whose text axes holds one ``Rectangle`` patch and one text per token.

    Raises:
        ValueError: If ``scores`` is not 1-D with one entry per token, there are no tokens, or
            ``line_chars`` is smaller than 8.
    """
    tokens = [str(t) for t in tokens]
    s = _to_numpy(scores, "scores")
    if s.ndim == 2 and s.shape[0] == 1:
        s = s[0]
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one score per token); got shape {tuple(s.shape)}.")
    if len(tokens) == 0:
        raise ValueError("tokens is empty; nothing to draw.")
    if s.shape[0] != len(tokens):
        raise ValueError(f"got {len(tokens)} tokens but {s.shape[0]} scores; give one score per token.")
    if line_chars < 8:
        raise ValueError(f"line_chars must be at least 8; got {line_chars}.")
    values = s if signed else np.abs(s)
    m = _max_abs(values)
    norm = Normalize(-m, m) if signed else Normalize(0.0, m)
    colours = colormaps[cmap or ("bwr" if signed else "Reds")]

    # Lay out in character units: a box is the token's length plus padding; wrap at line_chars.
    pad, gap = 1.0, 0.4
    boxes: list[tuple[float, int, float]] = []  # (x, line, width)
    x, line = 0.0, 0
    for tok in tokens:
        width = max(len(tok), 1) + pad
        if x > 0 and x + width > line_chars:
            x, line = 0.0, line + 1
        boxes.append((x, line, width))
        x += width + gap
    n_lines = line + 1
    # A short text gets a narrower figure (but wide enough for a readable colour bar).
    used = max(max(bx + bw for bx, _, bw in boxes), 30.0 if colorbar else 1.0)
    line_chars = min(line_chars, math.ceil(used))

    height = 0.32 * n_lines + (0.9 if colorbar else 0.3) + (0.3 if title else 0.0)
    fig = Figure(figsize=(0.105 * line_chars + 0.6, height), layout="constrained")
    if colorbar:
        ax, cax = fig.subplots(2, 1, height_ratios=[max(n_lines, 1), 0.35])
    else:
        ax, cax = fig.subplots(), None
    for tok, value, (bx, bl, bw) in zip(tokens, values, boxes):
        face = colours(norm(value)) if np.isfinite(value) else (0.85, 0.85, 0.85, 1.0)
        luminance = 0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]
        ax.add_patch(Rectangle((bx, bl + 0.1), bw, 0.8, facecolor=face, edgecolor="0.6", linewidth=0.4))
        ax.text(
            bx + bw / 2,
            bl + 0.5,
            tok,
            ha="center",
            va="center",
            family="monospace",
            fontsize=9,
            color="white" if luminance < 0.45 else "black",
            parse_math=False,
        )
    ax.set_xlim(-0.2, line_chars + 0.2)
    ax.set_ylim(n_lines, 0)
    ax.set_axis_off()
    ax.set_label("tokens")
    if cax is not None:
        fig.colorbar(ScalarMappable(norm=norm, cmap=colours), cax=cax, orientation="horizontal")
        cax.tick_params(labelsize=8)
    if title is not None:
        fig.suptitle(_literal(title), fontsize=10)
    return fig


# --------------------------------------------------------------------------------------- generic charts
def bar_chart(
    labels: Sequence[str],
    values: ArrayLike,
    *,
    title: str = "",
    xlabel: str = "",
    log: bool = False,
    errors: ArrayLike | None = None,
) -> Figure:
    """A horizontal bar chart, first label at the top.

    Args:
        labels: One label per bar (shown literally).
        values: One value per bar.
        title: Figure title.
        xlabel: Label of the value axis.
        log: Use a logarithmic value axis (all values must then be positive).
        errors: Optional error-bar half-widths, one per bar (or shape ``(2, n)`` for
            lower/upper).

    Returns:
        A Figure with one axes holding one bar per label.

    Raises:
        ValueError: If lengths differ, there are no bars, or ``log`` is set with a non-positive value.
    """
    names = [str(s) for s in labels]
    v = _to_numpy(values, "values").reshape(-1)
    if len(names) != v.shape[0]:
        raise ValueError(f"got {len(names)} labels but {v.shape[0]} values; give one value per label.")
    if not names:
        raise ValueError("bar_chart needs at least one bar.")
    err = None
    if errors is not None:
        err = _to_numpy(errors, "errors")
        if err.shape not in ((len(names),), (2, len(names))):
            raise ValueError(f"errors must have shape ({len(names)},) or (2, {len(names)}); got {err.shape}.")
    if log and not np.all(v[np.isfinite(v)] > 0):
        raise ValueError("log=True needs all values to be positive.")
    fig = Figure(figsize=(6.4, 0.3 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    pos = np.arange(len(names))
    ax.barh(pos, v, xerr=err, color="#4c72b0", ecolor="0.25", capsize=2 if err is not None else 0)
    ax.set_yticks(pos, labels=[_literal(s) for s in names])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
    ax.set_xlabel(_literal(xlabel))
    if title:
        ax.set_title(_literal(title))
    ax.grid(axis="x", alpha=0.3)
    return fig


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def line_chart(
    x: ArrayLike,
    ys: Mapping[str, ArrayLike],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
) -> Figure:
    """Several named series over a shared x axis.

    Every series keeps its own line style and marker and later series are drawn thinner on top, so a series
    that coincides with another stays visible (a thick line with a dashed one over it); such a series is
    also named in the legend as equal to the earlier one.

    Args:
        x: The x values, shared by every series.
        ys: Series name -> y values (same length as ``x``), one line each, named in the legend.
        title: Figure title.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        logy: Use a logarithmic y axis (non-positive points are not drawn).

    Returns:
        A Figure with one axes holding one line per series.

    Raises:
        ValueError: If ``ys`` is empty or a series' length differs from ``x``.
    """
    xs = _to_numpy(x, "x").reshape(-1)
    if not ys:
        raise ValueError("ys is empty; give at least one series.")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    drawn: list[tuple[str, np.ndarray]] = []
    for i, (name, series) in enumerate(ys.items()):
        y = _to_numpy(series, f"ys[{name!r}]").reshape(-1)
        if y.shape[0] != xs.shape[0]:
            raise ValueError(f"series {name!r} has {y.shape[0]} values but x has {xs.shape[0]}.")
        same = next((prev for prev, py in drawn
                     if np.allclose(py.astype(float), y.astype(float), rtol=1e-6, atol=0.0, equal_nan=True)), None)
        label = _literal(name) if same is None else f"{_literal(name)} (= {_literal(same)})"
        ax.plot(xs, y, linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                marker=_MARKERS[i % len(_MARKERS)] if xs.shape[0] <= 30 else None,
                markersize=max(2.0, 5.0 - i), fillstyle="full" if i == 0 else "none",
                linewidth=max(0.8, 2.4 - 0.7 * i), zorder=2 + i, label=label)
        drawn.append((str(name), y))
    if logy:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel(_literal(xlabel))
    ax.set_ylabel(_literal(ylabel))
    if title:
        ax.set_title(_literal(title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def method_grid(
    inputs: ArrayLike,
    maps: Mapping[str, ArrayLike],
    *,
    titles: Sequence[str] | None = None,
    signed: Mapping[str, bool] | None = None,
    max_items: int = 8,
) -> Figure:
    """Examples (rows) x methods (columns): each input, then each method's map on it.

    Each map is reduced over channels (``(N, C, H, W)`` summed, ``(N, H, W)`` as is) and scaled per
    cell: ``(-m, m)`` with a diverging colormap for signed maps, ``(0, m)`` otherwise.

    Args:
        inputs: ``(N, C, H, W)`` images.
        maps: ``{method name: (N, ...) map}``, in column order.
        titles: Row titles (e.g. labels).
        signed: ``{method name: signed?}`` (default True).
        max_items: Rows shown at most.

    Returns:
        The Figure.

    Raises:
        ValueError: No maps, or a map whose batch size differs from the inputs'.
    """
    x = _to_numpy(inputs, "inputs")
    if not maps:
        raise ValueError("method_grid needs at least one map.")
    n = min(x.shape[0], max_items)
    names = list(maps)
    arrays = {k: _to_numpy(v, k) for k, v in maps.items()}
    for k, a in arrays.items():
        if a.shape[0] != x.shape[0]:
            raise ValueError(f"map {k!r} has {a.shape[0]} rows for {x.shape[0]} inputs.")
    row_titles = _check_titles(titles, x.shape[0])
    fig = Figure(figsize=(1.35 * (len(names) + 1), 1.35 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, len(names) + 1, squeeze=False)
    for i in range(n):
        img, img_cmap = _display_image(x[i])
        axes[i, 0].imshow(img, cmap=img_cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[i, 0].set_ylabel(_literal(row_titles[i]), fontsize=8)
        for j, name in enumerate(names):
            a = arrays[name][i]
            heat = a.sum(axis=0) if a.ndim == 3 else a
            sgn = True if signed is None else bool(signed.get(name, True))
            m = _max_abs(heat)
            axes[i, j + 1].imshow(heat, cmap="bwr" if sgn else "inferno", vmin=-m if sgn else 0.0, vmax=m,
                                  interpolation="nearest" if heat.shape == img.shape[:2] else "bilinear")
            if i == 0:
                axes[i, j + 1].set_title(_literal(name), fontsize=8)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
