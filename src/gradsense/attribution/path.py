"""Path methods: Integrated Gradients (fixed rule or adaptive) and Expected Gradients.

- Integrated Gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks"):
  ``(x - x') * integral_0^1 dF(x' + a (x - x'))/dx da``. Completeness says the attributions add up to
  ``F(x) - F(x')``; ``.delta`` reports the gap of the numerical integral, per example.
- Adaptive IG: trapezoid rule on a per-example grid, refined until ``|delta| <= rtol * |F(x) - F(x')|``
  or ``max_steps``. Every gradient evaluation also gives ``F`` at that point, so each interval's
  error is known exactly; every evaluation is kept.
- Expected Gradients (Erion et al. 2021, "Improving performance of deep learning models with axiomatic
  attribution priors and expected gradients"): IG averaged over baselines drawn from a reference set,
  one random baseline and one random point on its path per sample.

Path points are a batch dimension: all (step, example) rows go through the model in chunks under the
memory budget, gradients w.r.t. the inputs only.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, register
from gradsense.core.batching import chunk_size_for
from gradsense.core.checks import check_positive_int
from gradsense.core.targets import Batch, Target

__all__ = ["RULES", "ExpectedGradients", "IntegratedGradients", "make_baseline", "quadrature"]

Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zeros", "blur", "uniform")


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``alpha`` in [0, 1] and weights for integrating over the path.

    ``gausslegendre`` and ``riemann_left``/``riemann_right``/``riemann_middle`` give the same points and
    weights as captum (``captum.attr._utils.approximation_methods``); ours also accept ``steps=1`` for the
    Riemann rules, where captum requires more than one step. ``riemann_trapezoid`` differs: the
    trapezoid rule here puts ``n`` points on [0, 1] with spacing ``1/(n-1)`` and weights
    ``1/(n-1)`` (halved at both ends), summing to 1, so a constant integrand integrates exactly. captum uses
    the same ``n`` points but weights ``1/n`` (halved at both ends), which sum to ``(n-1)/n``: its
    trapezoid Integrated Gradients are exactly ``(n-1)/n`` times ours and miss completeness by that factor.

    Args:
        rule: One of :data:`RULES`.
        steps: Number of points ``n`` (>= 2 for ``riemann_trapezoid``).

    Returns:
        ``(alphas, weights)``, two float64 arrays of length ``steps``.

    Raises:
        ValueError: Unknown rule, or too few steps for the rule.
    """
    alphas, weights = _quadrature(rule, steps)
    return alphas.copy(), weights.copy()


@functools.lru_cache(maxsize=64)
def _quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quadrature`, computed once per ``(rule, steps)`` (Gauss-Legendre nodes cost milliseconds)."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    if rule == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), np.full(n, 1.0 / n)
    if rule == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), np.full(n, 1.0 / n)
    if rule == "riemann_middle":
        return np.linspace(1.0 / (2 * n), 1.0 - 1.0 / (2 * n), n), np.full(n, 1.0 / n)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2.")
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return np.linspace(0.0, 1.0, n), w
    raise ValueError(f"unknown integration rule {rule!r}; choose one of {RULES}.")


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Blur the trailing spatial dims of ``(N, C, *spatial)`` (or ``(N, F)``) with a Gaussian kernel."""
    if x.ndim < 3:
        return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True).expand_as(x).clone()
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    out = x
    c = x.shape[1]
    for dim in range(2, x.ndim):
        shape = [1] * (x.ndim - 2)
        shape[dim - 2] = k.numel()
        kernel = k.reshape(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - dim)] = pad[2 * (x.ndim - 1 - dim) + 1] = radius
        padded = torch.nn.functional.pad(out, pad, mode="replicate")
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[x.ndim]
        out = conv(padded, kernel, groups=c)
    return out


def make_baseline(
    baseline: str | float | Tensor, inputs: Tensor, *, seed: int | None = None, blur_sigma: float | None = None
) -> Tensor:
    """A baseline per example, shaped like ``inputs``.

    Args:
        baseline: ``"zeros"``, ``"blur"`` (Gaussian-blurred input, Sundararajan et al.'s "blurred"
            baseline), ``"uniform"`` (uniform noise over each example's value range), a number
            (constant), or a tensor broadcastable to ``inputs`` (e.g. one baseline ``(1, ...)``).
        inputs: The inputs.
        seed: Seed for ``"uniform"``.
        blur_sigma: Kernel width for ``"blur"`` in pixels (default: a tenth of the smallest spatial size,
            at least 1).

    Raises:
        ValueError: Unknown name, or a tensor that does not broadcast to the inputs.
    """
    if isinstance(baseline, Tensor):
        try:
            b = torch.broadcast_to(baseline.to(inputs.device, inputs.dtype), inputs.shape)
        except RuntimeError as err:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to the inputs' shape "
                f"{tuple(inputs.shape)}; give one baseline (1, ...) or one per example."
            ) from err
        if not bool(torch.isfinite(b).all()):
            raise ValueError("baseline contains NaN/Inf values.")
        return b.clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(inputs)
    if baseline == "blur":
        spatial = inputs.shape[2:] if inputs.ndim >= 3 else (1,)
        sigma = blur_sigma if blur_sigma is not None else max(1.0, min(spatial) / 10.0)
        return _gaussian_blur(inputs, float(sigma))
    if baseline == "uniform":
        g = torch.Generator().manual_seed(0 if seed is None else seed)
        flat = inputs.reshape(inputs.shape[0], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        u = torch.rand(flat.shape, generator=g, dtype=inputs.dtype).to(inputs.device)
        return (lo[:, None] + u * (hi - lo)[:, None]).reshape(inputs.shape)
    raise ValueError(f"baseline must be one of {BASELINES}, a number or a tensor; got {baseline!r}.")


class _PathMethod(Attribution):
    """Shared: evaluate target gradients at many path points as one chunked batch."""

    def _grads_at(
        self, points: Tensor, target: Target, index: Tensor, n_examples: int, desc: str, chunk: int | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._gradients(points, target, index, n_examples, desc=desc, chunk=chunk)

    def _scores(self, rows: Tensor, target: Target, index: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, rows.shape[0], 256):
                sl = slice(start, start + 256)
                out.append(target(self._run(rows[sl]), Batch(rows[sl], index[sl])))
        return torch.cat(out)


@register("integrated_gradients", "ig")
class IntegratedGradients(_PathMethod):
    """Integrated Gradients (Sundararajan et al. 2017), with ``.delta`` and an adaptive mode.

    Args:
        model: The module to explain.
        steps: Path points per example; ``"auto"`` refines a per-example trapezoid grid until
            ``|delta| <= rtol * |F(x) - F(baseline)|``; ``.tensors["steps"]`` reports the intervals used.
        rule: ``"gausslegendre"`` (default, as captum), ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"`` or ``"riemann_trapezoid"``; ignored when ``steps="auto"``.
        baseline: ``"zeros"``, ``"blur"``, ``"uniform"``, a number or a tensor (see :func:`make_baseline`).
        rtol: Relative completeness tolerance of the adaptive mode (default 1%).
        max_steps: Step cap of the adaptive mode.
        refine: Adaptive refinement, ``"uniform"`` (default) or ``"greedy"`` (fewer passes, less
            accurate maps; see :meth:`_adaptive`).
        multiply_by_inputs: Multiply by ``x - baseline`` (True, the paper's definition) or return the
            path-averaged gradient.
        seed: Seed for random baselines.
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.

    Example:
        >>> lin = nn.Linear(3, 1)
        >>> x = torch.randn(2, 3)
        >>> a = IntegratedGradients(lin, steps=8).attribute(x, target=0)
        >>> torch.allclose(a.attributions, x * lin.weight[0], atol=1e-6)
        True
    """

    clean_outputs = "target"

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int | str = 50,
        rule: Rule = "gausslegendre",
        baseline: str | float | Tensor = "zeros",
        rtol: float = 0.01,
        max_steps: int = 512,
        refine: str = "uniform",
        multiply_by_inputs: bool = True,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if steps != "auto":
            check_positive_int(steps, "steps")
        if rule not in RULES:
            raise ValueError(f"unknown integration rule {rule!r}; choose one of {RULES}.")
        if rule == "riemann_trapezoid" and steps != "auto" and steps < 2:
            raise ValueError("riemann_trapezoid needs steps >= 2.")
        if isinstance(baseline, str) and baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, a number or a tensor; got {baseline!r}.")
        if not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"rtol must be a positive number, got {rtol!r}.")
        check_positive_int(max_steps, "max_steps", minimum=4)
        if refine not in ("uniform", "greedy"):
            raise ValueError(f"refine must be 'uniform' or 'greedy', got {refine!r}.")
        self.refine = refine
        self.steps, self.rule, self.baseline = steps, rule, baseline
        self.rtol, self.max_steps = float(rtol), max_steps
        self.multiply_by_inputs, self.seed = bool(multiply_by_inputs), seed

    def settings(self) -> dict[str, Any]:
        base = self.baseline if not isinstance(self.baseline, Tensor) else f"tensor{tuple(self.baseline.shape)}"
        return {
            "steps": self.steps,
            "rule": "adaptive trapezoid" if self.steps == "auto" else self.rule,
            "baseline": base,
            "rtol": self.rtol if self.steps == "auto" else None,
            "refine": self.refine if self.steps == "auto" else None,
            "multiply_by_inputs": self.multiply_by_inputs,
        }

    def _check(self, inputs: Tensor) -> None:
        if isinstance(self.baseline, Tensor):
            make_baseline(self.baseline, inputs)

    def _baselines(self, inputs: Tensor, index: Tensor) -> Tensor:
        b = self.baseline
        if isinstance(b, Tensor) and b.ndim == inputs.ndim and b.shape[0] not in (1, inputs.shape[0]):
            raise ValueError(f"baseline has {b.shape[0]} rows for {inputs.shape[0]} inputs.")
        if isinstance(b, Tensor) and b.ndim == inputs.ndim and b.shape[0] > 1 and b.shape[0] != index.numel():
            b = b[index.to(b.device)]
        return make_baseline(b, inputs, seed=self.seed)

    def _path_average(
        self, x: Tensor, base: Tensor, alphas: Tensor, weights: Tensor, target: Target, index: Tensor,
        n_examples: int,
    ) -> Tensor:
        """``sum_s w_s grad(base + alpha_s (x - base))``, a group of steps at a time.

        A group holds as many (step, example) rows as the memory budget allows (at least one step), so no
        (steps x examples x ...) tensor is made: memory stays at one chunk of rows whatever ``steps``.
        """
        s, n = alphas.numel(), x.shape[0]
        if self.chunk_size is not None:
            rows = self.chunk_size
        else:
            per_row = self._row_bytes(x) + 2 * x[0].numel() * x.element_size()
            rows = chunk_size_for(per_row, max_memory=self.max_memory, total=s * n, device=x.device)
        per_group = max(1, rows // n)
        diff = x - base
        avg = torch.zeros_like(x)
        for start in range(0, s, per_group):
            a = alphas[start : start + per_group]
            k = a.numel()
            points = (base.unsqueeze(0) + a.reshape((k,) + (1,) * x.ndim) * diff.unsqueeze(0)).reshape(k * n, *x.shape[1:])
            grads, _ = self._grads_at(points, target, index.repeat(k), n_examples, desc=f"{s} path points", chunk=rows)
            avg += torch.einsum("s,s...->...", weights[start : start + k], grads.reshape(k, n, *x.shape[1:]))
            del points, grads
        return avg

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        base = self._baselines(inputs, index)
        f_x = self._clean_scores(inputs, target)  # from the first forward when it covered every row
        if f_x is None:
            f_x = self._scores(inputs, target, index)
        f_b = self._scores(base, target, index)
        if self.steps == "auto":
            avg_grad, steps_used = self._adaptive(inputs, base, target, index, n_examples, f_x - f_b)
        else:
            a_np, w_np = quadrature(self.rule, int(self.steps))
            alphas = torch.as_tensor(a_np, dtype=inputs.dtype, device=inputs.device)
            weights = torch.as_tensor(w_np, dtype=inputs.dtype, device=inputs.device)
            avg_grad = self._path_average(inputs, base, alphas, weights, target, index, n_examples)
            steps_used = torch.full((inputs.shape[0],), int(self.steps), dtype=torch.long)
        ig = (inputs - base) * avg_grad
        delta = ig.reshape(ig.shape[0], -1).sum(1) - (f_x - f_b)
        attributions = ig if self.multiply_by_inputs else avg_grad
        return attributions, {"delta": delta.detach(), "steps": steps_used.to(inputs.device), "scores": f_x}

    def _adaptive(
        self, x: Tensor, base: Tensor, target: Target, index: Tensor, n_examples: int, gap: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Adaptive trapezoid rule with exact per-interval errors, refined per example.

        Each gradient evaluation at a path point ``a`` also gives ``F(a)`` (the same forward pass). For
        an interval ``[a, b]`` the trapezoid estimate of ``integral dF/da`` is known exactly to be off by
        ``e = (b - a) (g(a) + g(b)) / 2 - (F(b) - F(a))``, with ``g = grad F . (x - baseline)``, and the
        completeness gap is ``delta = sum e``. Until ``|delta| <= rtol * |gap|`` (or ``max_steps``), an
        example's grid is refined - all new points of all examples in one batch:

        - ``refine="uniform"`` (default): every interval is bisected (nested doubling; all earlier
          evaluations reused).
        - ``refine="greedy"``: only intervals whose exact error is within a factor 2 of the worst.
          Measured on the bundled CNN and the ResNet-style CNN: 1% completeness in 11-15 passes per
          example (vs 40 uniform), but per-feature error against a 1024-step reference of 10-12%
          (L1) against 4-7% uniform and 2% for 50-point Gauss-Legendre: the errors of the refined
          intervals cancel in ``delta`` without the map being accurate. Completeness is a weak proxy
          for accuracy on ReLU networks; use greedy when completeness is what you need.
        """
        n = x.shape[0]
        dtype, dev = x.dtype, x.device
        diff = (x - base).reshape(n, -1)
        tol = (self.rtol * gap.abs()).tolist()
        alphas: list[list[float]] = [[0.0, 0.25, 0.5, 0.75, 1.0] for _ in range(n)]
        grads: list[list[Tensor]] = [[] for _ in range(n)]
        fvals: list[list[float]] = [[] for _ in range(n)]
        gdot: list[list[float]] = [[] for _ in range(n)]
        pending = [(e, k, a) for e in range(n) for k, a in enumerate(alphas[e])]  # (example, slot, alpha)
        while pending:
            rows_e = torch.tensor([p[0] for p in pending], device=dev)
            a_t = torch.tensor([p[2] for p in pending], dtype=dtype, device=dev)
            shape = (len(pending),) + (1,) * (x.ndim - 1)
            points = base[rows_e] + a_t.reshape(shape) * (x[rows_e] - base[rows_e])
            g, f = self._grads_at(points, target, index[rows_e], n_examples, desc=f"{len(pending)} path points")
            g_flat = g.reshape(len(pending), -1)
            dots = (g_flat * diff[rows_e]).sum(1).tolist()
            f_list = f.tolist()
            for j, (e, k, _a) in enumerate(pending):
                grads[e].insert(k, g_flat[j])
                fvals[e].insert(k, f_list[j])
                gdot[e].insert(k, dots[j])
            pending = []
            for e in range(n):
                a = alphas[e]
                errs = [
                    (a[i + 1] - a[i]) * (gdot[e][i] + gdot[e][i + 1]) / 2 - (fvals[e][i + 1] - fvals[e][i])
                    for i in range(len(a) - 1)
                ]
                if abs(sum(errs)) <= tol[e] or len(a) - 1 >= self.max_steps:
                    continue
                if self.refine == "greedy":  # only intervals within a factor 2 of the worst one
                    top = max(abs(v) for v in errs)
                    split = [i for i, v in enumerate(errs) if abs(v) >= 0.5 * top]
                else:  # uniform: every interval, i.e. nested doubling of this example's grid
                    split = list(range(len(errs)))
                split = split[: self.max_steps - (len(a) - 1)]
                mids = [0.5 * (a[i] + a[i + 1]) for i in split]
                a.extend(mids)
                a.sort()
                # slots in the final grid, inserted in ascending order into the per-node lists below
                pending.extend(sorted((e, a.index(m), m) for m in mids))
        avg = torch.empty_like(diff)
        for e in range(n):
            a = torch.tensor(alphas[e], dtype=dtype, device=dev)
            h = a[1:] - a[:-1]
            w = torch.zeros_like(a)
            w[:-1] += h / 2
            w[1:] += h / 2
            avg[e] = torch.einsum("k,kd->d", w, torch.stack(grads[e]))
        steps_used = torch.tensor([len(a) - 1 for a in alphas], dtype=torch.long)
        return avg.reshape(x.shape), steps_used

@register("expected_gradients", "eg")
class ExpectedGradients(_PathMethod):
    """Expected Gradients (Erion et al. 2021): IG over a distribution of baselines.

    ``E_{x' ~ refs, a ~ U(0,1)} [(x - x') * dF(x' + a (x - x'))/dx]``, estimated with ``n_samples``
    (baseline, alpha) draws per example.

    Args:
        model: The module to explain.
        references: ``(K, ...)`` reference inputs (e.g. training examples) the baselines are drawn from.
        n_samples: Draws per example.
        seed: Seed of the draws.
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.
    """

    clean_outputs = "outputs"

    def __init__(
        self, model: nn.Module, *, references: Tensor, n_samples: int = 50, seed: int | None = 0, **kwargs: Any
    ) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(references, Tensor) or references.ndim < 2 or references.shape[0] == 0:
            raise ValueError("references must be a non-empty tensor (K, ...) of reference inputs.")
        check_positive_int(n_samples, "n_samples")
        self.references, self.n_samples, self.seed = references.detach(), n_samples, seed

    def settings(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "references": int(self.references.shape[0])}

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.references.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"references have shape {tuple(self.references.shape[1:])} per example but inputs have "
                f"{tuple(inputs.shape[1:])}."
            )
        n, s = inputs.shape[0], self.n_samples
        g = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        ref_idx = torch.randint(0, self.references.shape[0], (s, n), generator=g)
        alphas = torch.rand((s, n), generator=g, dtype=inputs.dtype)
        refs = self.references.to(inputs.device, inputs.dtype)[ref_idx.reshape(-1).to(inputs.device)]
        refs = refs.reshape(s, n, *inputs.shape[1:])
        a = alphas.to(inputs.device).reshape((s, n) + (1,) * (inputs.ndim - 1))
        diff = inputs.unsqueeze(0) - refs
        points = (refs + a * diff).reshape(s * n, *inputs.shape[1:])
        grads, _ = self._grads_at(points, target, index.repeat(s), n_examples, desc=f"{s} samples")
        attr = (diff * grads.reshape(s, n, *inputs.shape[1:])).mean(0)
        return attr, {}
