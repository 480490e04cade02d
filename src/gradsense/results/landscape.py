"""Results of the landscape analyses: loss surfaces, interpolation lines and sharpness.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), like
:mod:`gradsense.viz.figures`: a 2-D surface shows a filled contour plot with the grid minimum (star) and
the model (cross) marked, a 3-D view and the 1-D slices through the model; a 1-D surface and an
interpolation show a line (accuracy on a second axis when the labels are classes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradsense.results.base import Result

__all__ = ["InterpolationResult", "SharpnessResult", "SurfaceResult"]


def _literal(text: object) -> str:
    return str(text).replace("$", r"\$")


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _auto_log(values: np.ndarray, log: bool | None) -> bool:
    if log is not None:
        return bool(log)
    finite = values[np.isfinite(values)]
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 100)


@dataclasses.dataclass(frozen=True, repr=False)
class SurfaceResult(Result):
    """The loss on a 1-D line or 2-D plane through a model in weight space.

    Tensors: ``alphas`` (``(steps,)``), ``betas`` (2-D only), ``losses`` (``(steps, steps)``, indexed
    ``[i, j]`` = ``(alphas[i], betas[j])``, or ``(steps,)``), ``accuracy`` (same shape, when the labels are
    classes), ``direction_k`` (each direction as one flat vector, in ``meta['param_names']`` order) and,
    for Hessian axes, ``eigenvalues``.
    """

    kind = "landscape"

    required_tensors = ("alphas", "losses")
    required_meta = (("center_loss", "number"), ("settings", "dict"))

    @property
    def alphas(self) -> Tensor:
        """Coordinates along the first direction."""
        return self.tensors["alphas"]

    @property
    def betas(self) -> Tensor | None:
        """Coordinates along the second direction (``None`` for a 1-D surface)."""
        return self.tensors.get("betas")

    @property
    def losses(self) -> Tensor:
        """Dataset-average loss at every grid point."""
        return self.tensors["losses"]

    @property
    def accuracy(self) -> Tensor | None:
        """Accuracy at every grid point, when the labels are class indices."""
        return self.tensors.get("accuracy")

    @property
    def dims(self) -> int:
        """1 (a line) or 2 (a plane)."""
        return int(self.losses.ndim)

    @property
    def center_loss(self) -> float:
        """The model's own loss on the data (the grid centre for odd ``steps``)."""
        return float(self.meta["center_loss"])

    @property
    def eigenvalues(self) -> Tensor | None:
        """Hessian eigenvalues of the axes (``directions="hessian"`` only)."""
        return self.tensors.get("eigenvalues")

    @property
    def directions(self) -> list[dict[str, Tensor]]:
        """The directions as ``{parameter name: tensor}`` dicts (CPU)."""
        names, shapes = self.meta["param_names"], self.meta["param_shapes"]
        out = []
        k = 0
        while f"direction_{k}" in self.tensors:
            flat, d, offset = self.tensors[f"direction_{k}"], {}, 0
            for n, s in zip(names, shapes):
                size = int(np.prod(s)) if s else 1
                d[n] = flat[offset : offset + size].reshape(s)
                offset += size
            out.append(d)
            k += 1
        return out

    def minimum(self) -> tuple[float, float, float | None]:
        """``(loss, alpha, beta)`` of the grid point with the lowest loss (``beta`` is ``None`` in 1-D).

        Non-finite losses (overflow far from the model) are never the minimum.
        """
        z = self.losses.reshape(-1)
        flat = int(torch.argmin(torch.where(torch.isnan(z), torch.full_like(z, math.inf), z)))
        if self.dims == 1:
            return float(self.losses[flat]), float(self.alphas[flat]), None
        i, j = divmod(flat, self.losses.shape[1])
        assert self.betas is not None
        return float(self.losses[i, j]), float(self.alphas[i]), float(self.betas[j])

    @property
    def title(self) -> str:
        return f"Loss surface: {self.meta['settings'].get('directions', '')} directions, {self.dims}-D"

    def summary(self) -> list[tuple[str, str]]:
        s = self.meta["settings"]
        steps = int(self.alphas.shape[0])
        grid = f"{steps} x {steps} ({steps * steps} points)" if self.dims == 2 else f"{steps} points"
        rows: list[tuple[str, str]] = [
            ("method", self.method),
            ("directions", f"{s.get('directions')}" + (", biases/BN moved" if s.get("include_bias_bn") else
                                                        ", biases/BN fixed" if s.get("directions") in
                                                        ("filter", "layer") else "")),
            ("grid", f"{grid}, span ±{s.get('span')}"),
            ("examples", str(s.get("examples"))),
        ]
        if "name" in (self.meta.get("model") or {}):
            rows.append(("model", str(self.meta["model"]["name"])))
        rows.append(("loss at the model", _fmt(self.center_loss, 6)))
        if self.meta.get("center_accuracy") is not None:
            rows.append(("accuracy at the model", f"{self.meta['center_accuracy']:.2%}"))
        lo, a, b = self.minimum()
        where = f"alpha={a:+.3g}" + ("" if b is None else f", beta={b:+.3g}")
        rows.append(("grid minimum", f"{_fmt(lo, 6)} at {where}"))
        rows.append(("grid maximum", _fmt(float(self.losses.max()), 6)))
        if self.eigenvalues is not None:
            rows.append(("Hessian eigenvalues of the axes", ", ".join(_fmt(float(v)) for v in self.eigenvalues)))
        if self.meta.get("cosine") is not None:
            rows.append(("cosine(d1, d2)", f"{self.meta['cosine']:+.3g}"))
        how = (f"vmap, {self.meta.get('chunk_size')} points per call" if self.meta.get("vectorized")
               else "one point at a time")
        rows.append(("evaluation", f"{how}, {self.meta.get('n_forward')} model calls"))
        if self.meta.get("seed") is not None:
            rows.append(("seed", str(self.meta["seed"])))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    # ------------------------------------------------------------------------------------ figures
    def plot(self, kind: str = "all", *, log: bool | None = None, levels: int = 20, **kwargs: Any) -> Any:
        """A matplotlib Figure of the surface.

        Args:
            kind: ``"all"`` (2-D: contour, 3-D view and slices side by side), ``"contour"``,
                ``"surface"`` (3-D) or ``"slices"``; a 1-D surface is always a line.
            log: Logarithmic loss scale; default when the loss spans more than a factor 100.
            levels: Number of contour levels.

        Returns:
            The Figure (axes labelled ``"contour"``, ``"surface"``, ``"slices"``).

        Raises:
            ValueError: Unknown ``kind``.
        """
        from matplotlib.figure import Figure

        kinds = ("all", "contour", "surface", "slices")
        if kind not in kinds:
            raise ValueError(f"kind must be one of {kinds}, got {kind!r}.")
        if self.dims == 1:
            fig = Figure(figsize=(6.0, 4.0), layout="constrained")
            self._line(fig.add_subplot(1, 1, 1), log)
            return fig
        panels = ["contour", "surface", "slices"] if kind == "all" else [kind]
        fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
        z = self.losses.detach().double().cpu().numpy()
        use_log = _auto_log(z, log)
        for i, panel in enumerate(panels):
            if panel == "contour":
                self._contour(fig, fig.add_subplot(1, len(panels), i + 1), z, use_log, levels)
            elif panel == "surface":
                import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3-D projection)

                self._surface(fig.add_subplot(1, len(panels), i + 1, projection="3d"), z, use_log)
            else:
                self._slices(fig.add_subplot(1, len(panels), i + 1), use_log)
        model = (self.meta.get("model") or {}).get("name")
        if model:
            fig.suptitle(_literal(f"{model}: loss around the model ({self.meta['settings'].get('directions')} "
                                  "directions)"), fontsize=10)
        return fig

    def _contour(self, fig: Any, ax: Any, z: np.ndarray, use_log: bool, levels: int) -> None:
        a = self.alphas.double().numpy()
        assert self.betas is not None
        b = self.betas.double().numpy()
        shown = np.log10(np.clip(z, 1e-300, None)) if use_log else z
        finite = shown[np.isfinite(shown)]
        lv = np.linspace(finite.min(), finite.max(), levels) if finite.size and finite.max() > finite.min() else levels
        cs = ax.contourf(a, b, shown.T, levels=lv, cmap="viridis")
        ax.contour(a, b, shown.T, levels=cs.levels, colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(cs, ax=ax, label="log10 loss" if use_log else "loss")
        lo, ma, mb = self.minimum()
        ax.plot([ma], [mb], marker="*", markersize=14, color="#ff7f0e", markeredgecolor="black",
                linestyle="none", label=f"grid minimum {lo:.4g}")
        ax.plot([0.0], [0.0], marker="+", markersize=12, markeredgewidth=2, color="red", linestyle="none",
                label=f"model {self.center_loss:.4g}")
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        ax.set_title("loss contours")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_label("contour")

    def _surface(self, ax: Any, z: np.ndarray, use_log: bool) -> None:
        assert self.betas is not None
        aa, bb = np.meshgrid(self.alphas.double().numpy(), self.betas.double().numpy(), indexing="ij")
        shown = np.log10(np.clip(z, 1e-300, None)) if use_log else z
        ax.plot_surface(aa, bb, shown, cmap="viridis", linewidth=0, antialiased=True, alpha=0.95)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_zlabel("log10 loss" if use_log else "loss")
        ax.set_title("surface")
        ax.set_label("surface")

    def _slices(self, ax: Any, use_log: bool) -> None:
        assert self.betas is not None
        a, b = self.alphas.double(), self.betas.double()
        ia, ib = int(torch.argmin(a.abs())), int(torch.argmin(b.abs()))
        ax.plot(a.numpy(), self.losses[:, ib].double().numpy(), marker="o", markersize=2.5,
                label=f"along direction 1 (beta={float(b[ib]):.2g})")
        ax.plot(b.numpy(), self.losses[ia, :].double().numpy(), marker="s", markersize=2.5,
                label=f"along direction 2 (alpha={float(a[ia]):.2g})")
        ev = self.eigenvalues
        if ev is not None:
            for k, lam in enumerate(ev.tolist()):
                ax.plot(a.numpy(), self.center_loss + 0.5 * lam * a.numpy() ** 2, linestyle="--", linewidth=0.8,
                        label=f"quadratic, lambda_{k + 1}={lam:.3g}")
        ax.axvline(0.0, color="0.6", linewidth=0.6)
        if use_log:
            ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("step along the direction")
        ax.set_ylabel("loss")
        ax.set_title("1-D slices through the model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_label("slices")

    def _line(self, ax: Any, log: bool | None) -> None:
        a = self.alphas.double().numpy()
        z = self.losses.double().numpy()
        ax.plot(a, z, marker="o", markersize=3, label="loss")
        ax.plot([0.0], [self.center_loss], marker="+", markersize=12, markeredgewidth=2, color="red",
                linestyle="none", label=f"model {self.center_loss:.4g}")
        ev = self.eigenvalues
        if ev is not None:
            ax.plot(a, self.center_loss + 0.5 * float(ev[0]) * a**2, linestyle="--", linewidth=0.8,
                    label=f"quadratic, lambda={float(ev[0]):.3g}")
        if _auto_log(z, log):
            ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("alpha (step along the direction)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if self.accuracy is not None:
            ax2 = ax.twinx()
            ax2.plot(a, self.accuracy.double().numpy(), color="#2ca02c", linestyle=":", label="accuracy")
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="upper center")
        ax.set_title(_literal(f"loss along one {self.meta['settings'].get('directions')} direction"))
        ax.set_label("slices")


@dataclasses.dataclass(frozen=True, repr=False)
class InterpolationResult(Result):
    """The loss along the straight line between two models.

    Tensors: ``alphas`` (the ``t`` values; 0 is model A, 1 is model B), ``losses`` and, for class labels,
    ``accuracy``. Meta: ``loss_a``, ``loss_b``, ``barrier`` (Frankle et al. 2020), ``distance``
    (Euclidean distance between the parameter vectors).
    """

    kind = "landscape"

    required_tensors = ("alphas", "losses")

    @property
    def alphas(self) -> Tensor:
        """Interpolation coefficients ``t``."""
        return self.tensors["alphas"]

    @property
    def losses(self) -> Tensor:
        """Loss at every ``t``."""
        return self.tensors["losses"]

    @property
    def accuracy(self) -> Tensor | None:
        """Accuracy at every ``t`` (class labels only)."""
        return self.tensors.get("accuracy")

    @property
    def barrier(self) -> float | None:
        """``max_t L(t) - ((1 - t) L(0) + t L(1))`` over the points in ``[0, 1]``."""
        b = self.meta.get("barrier")
        return None if b is None else float(b)

    @property
    def title(self) -> str:
        a, b = self.meta.get("names", ["A", "B"])
        return f"Linear interpolation: {a} -> {b}"

    def summary(self) -> list[tuple[str, str]]:
        a, b = self.meta.get("names", ["A", "B"])
        rows = [
            ("method", self.method),
            ("points", f"{self.alphas.shape[0]}, t from {float(self.alphas[0]):g} to {float(self.alphas[-1]):g}"),
            ("examples", str(self.meta["settings"].get("examples"))),
            (f"loss at {a} (t=0)", _fmt(self.meta.get("loss_a"), 6)),
            (f"loss at {b} (t=1)", _fmt(self.meta.get("loss_b"), 6)),
            ("max loss on the line", _fmt(float(self.losses.max()), 6)),
            ("loss barrier", _fmt(self.barrier, 4)),
            ("parameter distance", _fmt(self.meta.get("distance"), 4)),
        ]
        if self.meta.get("accuracy_a") is not None:
            rows.append((f"accuracy at {a} / {b}", f"{self.meta['accuracy_a']:.2%} / {self.meta['accuracy_b']:.2%}"))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    def plot(self, *, log: bool | None = None, **kwargs: Any) -> Any:
        """Loss (and accuracy) against ``t``, the two models marked, the chord between them dashed."""
        from matplotlib.figure import Figure

        t, z = self.alphas.double().numpy(), self.losses.double().numpy()
        a, b = self.meta.get("names", ["A", "B"])
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(t, z, marker="o", markersize=3, label="loss")
        la, lb = self.meta.get("loss_a"), self.meta.get("loss_b")
        if la is not None and lb is not None:
            ax.plot([0.0, 1.0], [la, lb], linestyle="--", color="0.5", linewidth=0.8, label="chord")
            ax.plot([0.0], [la], marker="o", markersize=8, color="red", linestyle="none", label=_literal(a))
            ax.plot([1.0], [lb], marker="s", markersize=8, color="purple", linestyle="none", label=_literal(b))
        if _auto_log(z, log):
            ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("t  (0 = model A, 1 = model B)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if self.accuracy is not None:
            ax2 = ax.twinx()
            ax2.plot(t, self.accuracy.double().numpy(), color="#2ca02c", linestyle=":", label="accuracy")
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.set_title(_literal(f"linear interpolation {a} -> {b}"))
        ax.set_label("interpolation")
        return fig


@dataclasses.dataclass(frozen=True, repr=False)
class SharpnessResult(Result):
    """A sharpness value with its diagnostics.

    Tensors: ``trajectory`` (SAM: ``L(w + e_t) - L(w)`` per ascent point; first-order:
    ``rho * ||grad L||`` per point, the first at ``w``; average: ``L(w + e_i) - L(w)`` per sample) and,
    for SAM/first-order, ``perturbation`` (the best ``e`` found, flat). Meta: ``value``, ``loss``
    (``L(w)``), ``stderr`` (average), ``n_loss``, ``n_grad``, ``n_hvp``, ``converged``.
    """

    kind = "landscape"

    required_meta = (("value", "number"), ("loss", "number"), ("n_loss", "int"), ("n_grad", "int"), ("n_hvp", "int"))

    @property
    def value(self) -> float:
        """The sharpness."""
        return float(self.meta["value"])

    def __float__(self) -> float:
        return self.value

    @property
    def loss(self) -> float:
        """``L(w)``, the model's own loss."""
        return float(self.meta["loss"])

    @property
    def stderr(self) -> float | None:
        """Standard error of the average-case value (``None`` for the others)."""
        s = self.meta.get("stderr")
        return None if s is None else float(s)

    @property
    def n_loss(self) -> int:
        """Forward-only passes over the data."""
        return int(self.meta["n_loss"])

    @property
    def n_grad(self) -> int:
        """Gradient passes over the data."""
        return int(self.meta["n_grad"])

    @property
    def n_hvp(self) -> int:
        """Hessian-vector-product passes over the data."""
        return int(self.meta["n_hvp"])

    @property
    def converged(self) -> bool | None:
        """Ascent: the last two points agree to 0.1% (``None`` for the average)."""
        c = self.meta.get("converged")
        return None if c is None else bool(c)

    @property
    def trajectory(self) -> Tensor:
        """Values per ascent point or per sample."""
        return self.tensors["trajectory"]

    @property
    def title(self) -> str:
        return f"Sharpness: {self.meta.get('kind')} (rho={self.meta.get('rho')})"

    def summary(self) -> list[tuple[str, str]]:
        kind = self.meta.get("kind")
        what = {
            "sam": "max L(w+e) - L(w), ||e|| <= rho (SAM, Foret et al. 2021)",
            "average": "E L(w+e) - L(w), e uniform on the sphere ||e|| = rho",
            "first-order": "rho * max ||grad L(w+e)||, ||e|| <= rho (GAM, Zhang et al. 2023)",
        }.get(str(kind), str(kind))
        value = _fmt(self.value, 5) + (f" ± {_fmt(self.stderr, 2)}" if self.stderr is not None else "")
        rows = [
            ("method", self.method),
            ("definition", what),
            ("rho", str(self.meta.get("rho"))),
            ("sharpness", value),
            ("loss at the model", _fmt(self.loss, 6)),
            ("evaluations", f"{self.n_loss} loss, {self.n_grad} gradient, {self.n_hvp} HVP"),
        ]
        if self.converged is not None:
            rows.append(("ascent converged (0.1%)", "yes" if self.converged else "no"))
        if self.meta.get("seed") is not None:
            rows.append(("seed", str(self.meta["seed"])))
        if self.meta.get("wall_time_s") is not None:
            rows.append(("wall time", f"{self.meta['wall_time_s']:.3f} s"))
        return rows

    def plot(self, **kwargs: Any) -> Any:
        """Ascent trajectory (SAM/first-order) or the distribution of sampled rises (average)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.0, 3.8), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        tr = self.trajectory.double().numpy()
        if self.meta.get("kind") == "average":
            ax.hist(tr, bins=max(5, min(30, tr.size // 2)), color="#4c72b0", alpha=0.85)
            ax.axvline(self.value, color="red", label=f"mean {self.value:.4g}")
            ax.set_xlabel("L(w + e) - L(w)")
            ax.set_ylabel("samples")
        else:
            ax.plot(np.arange(tr.size), tr, marker="o")
            ax.axhline(self.value, color="red", linestyle="--", linewidth=0.8, label=f"value {self.value:.4g}")
            ax.set_xlabel("ascent point")
            ax.set_ylabel("L(w + e) - L(w)" if self.meta.get("kind") == "sam" else "rho * ||grad L(w + e)||")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(_literal(self.title))
        ax.set_label("sharpness")
        return fig
