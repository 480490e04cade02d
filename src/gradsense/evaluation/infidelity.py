"""Infidelity and max-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, "On the (In)fidelity and
Sensitivity of Explanations", NeurIPS).

- Infidelity: ``E_I[(I . Phi(x) - (f(x) - f(x - I)))^2]`` over random perturbations ``I``: how well the map
  predicts the change of the output when the input moves by ``-I``. With ``multiply_by_inputs=True`` the
  dot product uses ``I / (x - baseline)`` (captum's ``infidelity_perturb_func_decorator(True)``), the right
  pairing for maps that already multiply by the input (Input x Gradient, Integrated Gradients).
  ``normalize=True`` rescales the map by the optimal ``beta`` first (as captum does).
- Max-sensitivity: ``max_y ||Phi(x + y) - Phi(x)|| / ||Phi(x)||`` over perturbations ``y`` drawn in a small
  ball: how much the map moves when the input barely does.

Perturbations are a batch dimension: all ``n_perturbations x N`` rows go through the model (or the
explainer) in chunks under the memory budget; captum's ``infidelity``/``sensitivity_max`` run them all at
once unless ``max_examples_per_batch`` is set, and Quantus loops per example. Perturbations are drawn from a
seeded CPU generator, sample-major (``(n_perturbations, N, ...)``); an explicit tensor of that shape or a
callable may be given instead, which is how the tests feed the same perturbations to captum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Union

import torch
from torch import Tensor, nn

from gradsense.core.functional import preserve_model
from gradsense.core.targets import TargetLike
from gradsense.evaluation.base import (
    Explainer,
    build_result,
    check_attributions,
    check_count,
    check_number,
    explain_rows,
    generator,
    make_explainer,
    prepare,
    register_metric,
    resolve_target,
    rows_per_chunk,
    score_rows,
)
from gradsense.results.evaluation import MetricResult

__all__ = ["INFIDELITY_PERTURBATIONS", "infidelity", "max_sensitivity", "perturbations"]

YEH = "Yeh et al. 2019, On the (In)fidelity and Sensitivity of Explanations (NeurIPS)"
INFIDELITY_PERTURBATIONS = ("gaussian", "subset", "square")
SENSITIVITY_PERTURBATIONS = ("uniform", "gaussian")
Perturbation = Union[str, Tensor, Callable[[Tensor, torch.Generator], Tensor]]


def _unit_mask(shape: tuple[int, ...], inputs: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Bernoulli(p) over units (pixels shared by channels for images, elements otherwise)."""
    if inputs.ndim == 4:
        s, n, _c, h, w = shape
        return (torch.rand((s, n, 1, h, w), generator=gen) < p).to(inputs.dtype).expand(shape)
    return (torch.rand(shape, generator=gen) < p).to(inputs.dtype)


def _square_mask(shape: tuple[int, ...], size: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    s, n, _c, h, w = shape
    size_h, size_w = min(size, h), min(size, w)
    top = torch.randint(0, h - size_h + 1, (s, n), generator=gen)
    left = torch.randint(0, w - size_w + 1, (s, n), generator=gen)
    rows = torch.arange(h)[None, None, :]
    cols = torch.arange(w)[None, None, :]
    in_r = (rows >= top[..., None]) & (rows < top[..., None] + size_h)  # (s, n, h)
    in_c = (cols >= left[..., None]) & (cols < left[..., None] + size_w)  # (s, n, w)
    m = (in_r[..., :, None] & in_c[..., None, :]).to(dtype)  # (s, n, h, w)
    return m[:, :, None].expand(shape)


def perturbations(
    kind: Perturbation,
    inputs: Tensor,
    n: int,
    *,
    seed: int | None = 0,
    noise_scale: float = 0.1,
    radius: float = 0.02,
    fraction: float = 0.25,
    square_size: int | None = None,
    baseline: float | Tensor = 0.0,
) -> Tensor:
    """``n`` perturbations of every input, ``(n, N, ...)`` (sample-major), from a seeded CPU generator.

    Kinds: ``"gaussian"`` (``N(0, noise_scale^2)`` per element), ``"uniform"`` (uniform in the L-infinity
    ball of ``radius``, captum's default for sensitivity), ``"subset"`` (each unit, a pixel with all its
    channels for images, moved to ``baseline`` with probability ``fraction``: ``I = m * (x - baseline)``),
    ``"square"`` (images: a random ``square_size`` square moved to the baseline, Yeh et al.'s square
    removal); a tensor ``(n, N, ...)`` is used as it is; a callable ``fn(rows, generator)`` gets the inputs
    repeated sample-major ``(n * N, ...)`` and returns the perturbation of each row.

    Raises:
        ValueError: Unknown kind, a tensor of the wrong shape or with NaN, square perturbations of non-images.
    """
    shape = (n, *inputs.shape)
    gen = generator(seed)
    dtype, device = inputs.dtype, inputs.device
    if isinstance(kind, Tensor):
        if tuple(kind.shape) != shape:
            raise ValueError(
                f"explicit perturbations must have shape (n_perturbations, N, ...) = {shape}, got {tuple(kind.shape)}."
            )
        if not bool(torch.isfinite(kind).all()):
            raise ValueError("explicit perturbations contain NaN/Inf values.")
        return kind.detach().to(device, dtype)
    if callable(kind) and not isinstance(kind, str):
        rows = inputs.detach().unsqueeze(0).expand(shape).reshape(n * inputs.shape[0], *inputs.shape[1:])
        out = kind(rows, gen)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(rows.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the perturbation callable must return a tensor shaped like its rows {tuple(rows.shape)}, got {got}.")
        return out.detach().to(device, dtype).reshape(shape)
    if kind == "gaussian":
        return (torch.randn(shape, generator=gen, dtype=dtype) * noise_scale).to(device)
    if kind == "uniform":
        return ((torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * radius).to(device)
    if kind in ("subset", "square"):
        b = baseline if isinstance(baseline, Tensor) else torch.tensor(float(baseline), dtype=dtype)
        diff = inputs.detach() - b.to(device, dtype)
        if kind == "subset":
            m = _unit_mask(shape, inputs, fraction, gen)
        else:
            if inputs.ndim != 4:
                raise ValueError(f"square perturbations need images (N, C, H, W); got inputs of shape {tuple(inputs.shape)}.")
            size = square_size if square_size is not None else max(1, min(inputs.shape[2:]) // 4)
            m = _square_mask(shape, int(size), gen, dtype)
        return m.to(device) * diff.unsqueeze(0)
    raise ValueError(f"unknown perturbation {kind!r}; use one of {sorted(set(INFIDELITY_PERTURBATIONS + SENSITIVITY_PERTURBATIONS))}, "
                     "a tensor (n_perturbations, N, ...) or a callable (rows, generator) -> perturbations.")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``den == 0`` replaced by 1 (captum's ``safe_div(default_denom=1)``)."""
    return num / torch.where(den == 0, torch.ones_like(den), den)


def _check_perturbation_options(
    kind: Any, allowed: tuple[str, ...], noise_scale: float, fraction: float, inputs: Tensor, n: int
) -> None:
    if isinstance(kind, str) and kind not in allowed:
        raise ValueError(f"unknown perturbation {kind!r}; use one of {list(allowed)}, a tensor (n_perturbations, N, ...) "
                         "or a callable (rows, generator) -> perturbations.")
    if not isinstance(kind, (str, Tensor)) and not callable(kind):
        raise TypeError(f"perturbation must be a name, a tensor or a callable, got {type(kind).__name__}.")
    if isinstance(kind, Tensor):
        perturbations(kind, inputs, n)  # shape and NaN checks of an explicit tensor, before any forward
    if kind == "square" and inputs.ndim != 4:
        raise ValueError(f"square perturbations need images (N, C, H, W); got inputs of shape {tuple(inputs.shape)}.")
    check_number(noise_scale, "noise_scale")
    check_number(fraction, "fraction")
    if fraction > 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")


@register_metric("infidelity")
def infidelity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    n_perturbations: int = 64,
    perturbation: Perturbation = "gaussian",
    noise_scale: float = 0.1,
    fraction: float = 0.25,
    square_size: int | None = None,
    baseline: float | Tensor = 0.0,
    multiply_by_inputs: bool = False,
    normalize: bool = False,
    seed: int | None = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
) -> MetricResult:
    """Infidelity of attribution maps (Yeh et al. 2019): lower is better, 0 is a perfect linear account.

    ``INFD(Phi, f, x) = mean_s (I_s . Phi(x) - (f(x) - f(x - I_s)))^2`` over ``n_perturbations`` random ``I_s``.

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        attributions: Maps shaped like the inputs (or ``(N, H, W)`` image maps), or an AttributionResult.
        target: What was explained (its value is ``f``).
        n_perturbations: Perturbations per example.
        perturbation: ``"gaussian"`` (default), ``"subset"``, ``"square"``, a tensor ``(n_perturbations, N, ...)``
            of perturbations ``I``, or a callable ``(rows, generator) -> I`` (see :func:`perturbations`).
        noise_scale: Standard deviation of the Gaussian perturbations (absolute, input units).
        fraction: Probability that a unit is moved to the baseline (``"subset"``).
        square_size: Side of the removed square (``"square"``; default a quarter of the smaller side).
        baseline: Value (or tensor broadcastable to the inputs) that ``"subset"``/``"square"`` move towards.
        multiply_by_inputs: Dot the map with ``I / (x - baseline)`` instead of ``I`` (for maps that include the
            input factor, such as Input x Gradient and IG; captum's decorator flag of the same name).
        normalize: Scale the map by the optimal ``beta = E[a b] / E[a^2]`` first (captum's ``normalize``).
        seed: Seed of the perturbations.
        chunk_size: Rows per forward; default from ``max_memory``.
        max_memory: Memory budget (bytes or e.g. ``"2GB"``).
        forward: How to run the model on a batch (default ``model(x)``).
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.MetricResult`; ``values`` per example, ``value_stderr`` the Monte-Carlo
        standard error of each (without ``normalize``), ``f_x`` the target values.

    Raises:
        ValueError: ``n_perturbations < 1``, attributions of another shape or with NaN, unknown
            perturbation, before any forward pass.
        TypeError: Wrong argument types.
    """
    model, inputs = prepare(model, inputs, "infidelity", chunk_size, max_memory)
    a = check_attributions(attributions, inputs)
    s = check_count(n_perturbations, "n_perturbations")
    _check_perturbation_options(perturbation, INFIDELITY_PERTURBATIONS, noise_scale, fraction, inputs, s)
    t0 = time.perf_counter()
    n = inputs.shape[0]
    x = inputs.detach()
    with preserve_model(model):
        resolved = resolve_target(model, x, target, forward)
        pert = perturbations(perturbation, x, s, seed=seed, noise_scale=noise_scale, fraction=fraction,
                             square_size=square_size, baseline=baseline)  # (S, N, ...)
        flat = pert.reshape(s * n, *x.shape[1:])
        index = torch.arange(n, device=x.device).repeat(s)
        chunk = rows_per_chunk(model, x, chunk_size=chunk_size, max_memory=max_memory, total=s * n, forward=forward)
        f_x = score_rows(model, lambda sl: x[sl], n, resolved, index[:n], chunk=chunk, forward=forward)
        f_pert = score_rows(model, lambda sl: x[index[sl]] - flat[sl], s * n, resolved, index, chunk=chunk,
                            forward=forward, show_progress=show_progress, desc="infidelity: perturbed forwards")
    if multiply_by_inputs:
        b = baseline if isinstance(baseline, Tensor) else torch.tensor(float(baseline), dtype=x.dtype)
        rel = _safe_div(pert, (x - b.to(x.device, x.dtype)).unsqueeze(0))
    else:
        rel = pert
    dot = (rel * a.unsqueeze(0)).reshape(s, n, -1).sum(-1)  # (S, N)
    diff = f_x.unsqueeze(0) - f_pert.reshape(s, n)
    if normalize:
        beta = _safe_div((dot * diff).sum(0), (dot * dot).sum(0))
        err = (beta * dot - diff) ** 2
    else:
        err = (dot - diff) ** 2
    values = err.mean(0)
    value_se = err.std(0) / s**0.5 if s > 1 else torch.zeros_like(values)
    settings = {
        "n_perturbations": s,
        "perturbation": perturbation if isinstance(perturbation, str) else type(perturbation).__name__,
        "noise_scale": noise_scale if perturbation == "gaussian" else None,
        "fraction": fraction if perturbation == "subset" else None,
        "multiply_by_inputs": multiply_by_inputs,
        "normalize": normalize,
    }
    return build_result(
        MetricResult, {"values": values, "value_stderr": value_se, "f_x": f_x}, metric="infidelity", model=model,
        settings=settings, higher_is_better=False, reference=YEH, t0=t0, seed=seed, target=resolved.describe(),
        explained=getattr(attributions, "method", None),
    )


def _norm(t: Tensor, ord: str | float) -> Tensor:
    flat = t.reshape(t.shape[0], -1)
    if ord == "fro":
        return torch.linalg.vector_norm(flat, 2, dim=1)
    if ord == "inf":
        return flat.abs().amax(1)
    return torch.linalg.vector_norm(flat, float(ord), dim=1)


@register_metric("max_sensitivity", "sensitivity_max", "sensitivity")
def max_sensitivity(
    model: nn.Module,
    inputs: Tensor,
    attributions: Any,
    *,
    target: TargetLike,
    explainer: Explainer | None = None,
    explainer_options: dict[str, Any] | None = None,
    n_perturbations: int = 10,
    radius: float = 0.02,
    perturbation: Perturbation = "uniform",
    norm: str | float = "fro",
    seed: int | None = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
) -> MetricResult:
    """Max-sensitivity of an attribution method (Yeh et al. 2019): lower is better.

    ``SENS_max(Phi, x) = max_s ||Phi(x + y_s) - Phi(x)|| / ||Phi(x)||`` over ``n_perturbations`` draws ``y_s``
    (uniform in the L-infinity ball of ``radius`` by default, as captum's ``sensitivity_max``). Both maps
    are computed by the explainer (the given ``attributions`` only name it when no ``explainer`` is given).

    Args:
        model: The module (never modified).
        inputs: ``(N, ...)`` inputs.
        attributions: An AttributionResult (its method becomes the explainer), a tensor (shape-checked), or None.
        target: What is explained.
        explainer: Attribution method name or callable ``(model, inputs, target) -> maps``.
        explainer_options: Options of the named method (e.g. ``{"n_samples": 16}``).
        n_perturbations: Perturbations per example.
        radius: Radius of the ``"uniform"`` ball (noise scale of ``"gaussian"``).
        perturbation: ``"uniform"``, ``"gaussian"``, a tensor ``(n_perturbations, N, ...)`` of offsets ``y``, or
            a callable ``(rows, generator) -> y``.
        norm: ``"fro"`` (L2 of the flattened map, captum's default), ``"inf"`` or a number ``p``.
        seed: Seed of the perturbations.
        chunk_size, max_memory: Memory knobs of the explainer and of the blocks of rows.
        forward: How to run the model on a batch.
        show_progress: Progress bar.

    Returns:
        A :class:`~gradsense.results.MetricResult` with ``values`` per example and ``sensitivities``
        ``(n_perturbations, N)``.

    Raises:
        ValueError: ``n_perturbations < 1``, ``radius <= 0``, attributions of another shape, no explainer.
        TypeError: Wrong argument types.
    """
    model, inputs = prepare(model, inputs, "max_sensitivity", chunk_size, max_memory)
    if attributions is not None:
        check_attributions(attributions, inputs)
    s = check_count(n_perturbations, "n_perturbations")
    check_number(radius, "radius")
    _check_perturbation_options(perturbation, SENSITIVITY_PERTURBATIONS, 1.0, 0.5, inputs, s)
    if not (norm in ("fro", "inf") or (isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0)):
        raise ValueError(f"norm must be 'fro', 'inf' or a positive number, got {norm!r}.")
    fn, name = make_explainer(explainer, attributions, explainer_options, chunk_size=chunk_size,
                              max_memory=max_memory, forward=forward)
    t0 = time.perf_counter()
    n = inputs.shape[0]
    x = inputs.detach()
    with preserve_model(model):
        resolved = resolve_target(model, x, target, forward)
        ys = perturbations(perturbation, x, s, seed=seed, noise_scale=radius, radius=radius)  # (S, N, ...)
        base = explain_rows(fn, model, x, resolved, torch.arange(n, device=x.device), n, x)
        base_norm = _norm(base, norm)
        base_norm = torch.where(base_norm == 0, torch.ones_like(base_norm), base_norm)
        # all perturbed rows in one explainer call, which chunks them under its memory budget; an explicit
        # chunk_size also bounds the rows per call
        per_block = s if chunk_size is None else max(1, chunk_size // n)
        sens = torch.empty(s, n, dtype=x.dtype, device=x.device)
        from gradsense.core.batching import chunks, progress

        blocks = list(chunks(s, per_block))
        for sl in progress(blocks, total=len(blocks), desc="max-sensitivity: perturbed maps", enabled=show_progress):
            k = sl.stop - sl.start
            rows = (x.unsqueeze(0) + ys[sl]).reshape(k * n, *x.shape[1:])
            index = torch.arange(n, device=x.device).repeat(k)
            maps = explain_rows(fn, model, rows, resolved, index, n, x)
            d = _norm(maps - base.repeat(k, *([1] * (base.ndim - 1))), norm)
            sens[sl] = (d / base_norm.repeat(k)).reshape(k, n)
    values = sens.amax(0)
    settings = {
        "explainer": name,
        "explainer_options": explainer_options,
        "n_perturbations": s,
        "radius": radius,
        "perturbation": perturbation if isinstance(perturbation, str) else type(perturbation).__name__,
        "norm": norm,
    }
    return build_result(
        MetricResult, {"values": values, "sensitivities": sens}, metric="max_sensitivity", model=model,
        settings=settings, higher_is_better=False, reference=YEH, t0=t0, seed=seed, target=resolved.describe(),
        explained=name,
    )
