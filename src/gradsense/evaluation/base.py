"""Shared machinery of the explanation-quality metrics: the registry, ``evaluate``, argument checks,
chunked scoring of expanded batches, and explainers that recompute maps.

Every metric is a function ``metric(model, inputs, attributions, target, **options) -> MetricResult``
registered under a name. Batch-expanding work (perturbations, deletion steps, radii, seeds) is laid out
as rows ``(n_expand * N, ...)`` *sample-major* (row ``s * N + i`` belongs to example ``i``), and goes
through the model in chunks sized by :func:`gradsense.core.batching.chunk_size_for` under
``max_memory=``/``chunk_size=``, exactly as the attribution methods chunk. Every random draw comes from a
seeded CPU generator, so a seed gives the same numbers on every device and for every chunk size.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from gradsense.core.batching import chunk_size_for, chunks, estimate_example_bytes, parse_memory, progress
from gradsense.core.checks import check_inputs, check_positive_int, first_forward, suggest
from gradsense.core.functional import check_model, model_fingerprint
from gradsense.core.grad import warn_if_train_mode
from gradsense.core.targets import (
    Batch,
    ClassLogit,
    Probability,
    Target,
    TargetLike,
    _output_tensor,
    as_target,
)
from gradsense.results.attribution import AttributionResult
from gradsense.results.evaluation import MetricResult, mean_and_stderr

__all__ = [
    "METRICS",
    "Explainer",
    "RowTarget",
    "check_attributions",
    "evaluate",
    "get_metric",
    "make_explainer",
    "metric_names",
    "register_metric",
    "score_rows",
]

MetricFn = Callable[..., MetricResult]
METRICS: dict[str, MetricFn] = {}
Explainer = Union[str, Callable[[nn.Module, Tensor, Target], Tensor]]


def register_metric(*names: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator adding a metric function to :data:`METRICS` under ``names`` (first = canonical)."""

    def deco(fn: MetricFn) -> MetricFn:
        for n in names:
            METRICS[n] = fn
        fn.metric_name = names[0]  # type: ignore[attr-defined]
        return fn

    return deco


def metric_names() -> list[str]:
    """Canonical names of the registered metrics (aliases left out)."""
    return sorted({fn.metric_name for fn in METRICS.values()})  # type: ignore[attr-defined]


def get_metric(name: str) -> MetricFn:
    """The metric registered as ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: Unknown name (the message lists the known ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"metric must be a name (str), got {type(name).__name__}; available: {metric_names()}.")
    key = name.lower().replace("-", "_").replace(" ", "_")
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available metrics: {metric_names()}.{suggest(name, METRICS)}")
    return METRICS[key]


# --------------------------------------------------------------------------------------------- checks
def check_attributions(attributions: Any, inputs: Tensor, *, required: bool = True) -> Tensor | None:
    """Check attribution maps against the inputs and return them broadcastable to the inputs.

    Accepted: a tensor (or :class:`~gradsense.results.AttributionResult`) shaped like the inputs, or a
    channel-reduced map of an image ``(N, H, W)`` / ``(N, 1, H, W)`` (as the CAM family returns), which
    is returned as ``(N, 1, H, W)``.

    Raises:
        TypeError: Not a tensor / AttributionResult.
        ValueError: Missing when required, a shape that does not fit the inputs, NaN/Inf values.
    """
    if isinstance(attributions, AttributionResult):
        attributions = attributions.attributions
    if attributions is None:
        if required:
            raise ValueError("this metric needs attributions: a tensor shaped like the inputs, or an AttributionResult.")
        return None
    if not isinstance(attributions, Tensor):
        raise TypeError(
            f"attributions must be a tensor shaped like the inputs or an AttributionResult, got "
            f"{type(attributions).__name__}."
        )
    a = attributions.detach()
    shape, ishape = tuple(a.shape), tuple(inputs.shape)
    if shape != ishape:
        if inputs.ndim >= 3 and shape == (ishape[0], *ishape[2:]):
            a = a.unsqueeze(1)
        elif not (inputs.ndim >= 3 and shape == (ishape[0], 1, *ishape[2:])):
            raise ValueError(
                f"attributions have shape {shape} but the inputs have shape {ishape}; expected the inputs' shape "
                f"(or {(ishape[0], *ishape[2:])} for a channel-reduced image map). Pass the maps of these inputs."
            )
    if not a.is_floating_point():
        raise TypeError(f"attributions must be floating point, got dtype {a.dtype}.")
    if not bool(torch.isfinite(a).all()):
        n_bad = int((~torch.isfinite(a)).sum())
        raise ValueError(f"attributions contain {n_bad} NaN/Inf values; recompute them (or replace the bad values).")
    return a.to(inputs.device, inputs.dtype)


def check_count(value: Any, name: str) -> int:
    """A positive int count such as ``n_perturbations`` (a clear error for 0, negatives, non-ints)."""
    return check_positive_int(value, name)


def check_number(value: Any, name: str, *, minimum: float = 0.0, strict: bool = True) -> float:
    """A finite real number above ``minimum`` (``>=`` when ``strict=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}.")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}.")
    return float(value)


def check_chunking(chunk_size: Any, max_memory: Any) -> None:
    """Validate ``chunk_size``/``max_memory`` before any work."""
    if max_memory is not None:
        parse_memory(max_memory)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")


def generator(seed: int | None) -> torch.Generator:
    """A seeded CPU generator (``None`` means seed 0: metrics are deterministic by default)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}.")
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def as_probability(target: Target) -> Target:
    """``ClassLogit(c)`` -> ``Probability(c)``; other targets unchanged."""
    if type(target) is ClassLogit:
        return Probability(target.classes)
    return target


# --------------------------------------------------------------------------------------------- rows
class RowTarget(Target):
    """A target for expanded rows: row ``r`` belongs to example ``index[r]`` of the original batch.

    Lets a public ``attribute()`` call run on ``(n_expand * N)`` rows while per-example targets (one class
    per example, labels of a loss) follow their example.
    """

    def __init__(self, inner: Target, index: Tensor, n_examples: int) -> None:
        self.inner, self.index, self.n_examples = inner, index, n_examples
        self.name = inner.name

    def __call__(self, output: Any, batch: Batch) -> Tensor:
        idx = self.index.to(batch.index.device)[batch.index]
        return self.inner(output, Batch(inputs=batch.inputs, index=idx, labels=batch.labels))

    def validate(self, output: Any, n_examples: int) -> None:
        self.inner.validate(output, self.n_examples)

    def describe(self) -> str:
        return self.inner.describe()


def rows_per_chunk(
    model: nn.Module,
    inputs: Tensor,
    *,
    chunk_size: int | None,
    max_memory: int | str | None,
    total: int,
    forward: Callable[[Tensor], Any] | None = None,
    factor: float = 1.0 / 3.0,
) -> int:
    """Rows per model call: ``chunk_size`` if given, else what the memory budget allows.

    ``factor`` scales :func:`~gradsense.core.batching.estimate_example_bytes` (which assumes a forward+backward
    keeping every activation, x3): ``1/3`` for a forward without gradients (its activations are not kept).
    """
    if chunk_size is not None:
        return chunk_size_for(1, chunk_size=chunk_size, total=total)
    per_row = estimate_example_bytes(model, inputs[:2].detach(), forward=forward)
    return chunk_size_for(int(per_row * factor), max_memory=max_memory, total=total, device=inputs.device)


def score_rows(
    model: nn.Module,
    make_rows: Callable[[slice], Tensor],
    n_rows: int,
    target: Target,
    index: Tensor,
    *,
    chunk: int,
    forward: Callable[[Tensor], Any] | None = None,
    show_progress: bool | None = False,
    desc: str = "scores",
) -> Tensor:
    """Target value of every row, without gradients, in chunks.

    Args:
        model: The module.
        make_rows: ``make_rows(slice) -> rows``: builds the rows of one chunk (so all rows never need to
            exist at once).
        n_rows: Number of rows.
        target: The resolved target of the original examples.
        index: ``(n_rows,)`` example index of each row.
        chunk: Rows per forward.
        forward: How to run the model (default ``model(rows)``).
        show_progress: Progress bar.
        desc: Progress label.

    Returns:
        ``(n_rows,)`` target values.
    """
    run = forward or model
    out: Tensor | None = None
    parts = list(chunks(n_rows, chunk))
    with torch.no_grad():
        for sl in progress(parts, total=len(parts), desc=desc, enabled=show_progress):
            rows = make_rows(sl)
            s = target(run(rows), Batch(inputs=rows, index=index[sl]))
            if out is None:
                out = torch.empty(n_rows, dtype=s.dtype, device=s.device)
            out[sl] = s
    assert out is not None
    return out


# --------------------------------------------------------------------------------------------- explainers
def _accepted_options(cls: type) -> set[str]:
    return {
        p.name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values()
        if p.kind == p.KEYWORD_ONLY
    }


def make_explainer(
    explainer: Explainer | None,
    attributions: Any,
    options: Mapping[str, Any] | None,
    *,
    chunk_size: int | None,
    max_memory: int | str | None,
    forward: Callable[[Tensor], Any] | None = None,
) -> tuple[Callable[[nn.Module, Tensor, Target], Tensor], str]:
    """Turn ``explainer=`` into ``fn(model, rows, target) -> maps`` and a name for the metadata.

    ``explainer`` is a registered attribution method name (built with ``options`` on whichever model the
    metric passes: the caller's, or a randomised copy), or a callable ``(model, inputs, target) -> maps``
    where ``target`` is a resolved :class:`~gradsense.core.targets.Target`. With ``explainer=None`` the
    method named in an :class:`~gradsense.results.AttributionResult` ``attributions`` is used.

    Raises:
        ValueError: No explainer and no AttributionResult, an unknown method, an unknown option.
        TypeError: Neither a name nor a callable.
    """
    from gradsense.attribution import get_method

    opts = dict(options or {})
    if explainer is None:
        if isinstance(attributions, AttributionResult):
            explainer = attributions.method
        else:
            raise ValueError(
                "this metric recomputes maps: pass explainer= (an attribution method name such as 'saliency', "
                "or a callable (model, inputs, target) -> maps), or attributions as an AttributionResult."
            )
    if isinstance(explainer, str):
        cls = get_method(explainer)
        unknown = sorted(set(opts) - _accepted_options(cls))
        if unknown:
            raise ValueError(
                f"explainer {explainer!r} does not take option(s) {unknown}; it takes {sorted(_accepted_options(cls))}."
            )
        base = {"chunk_size": chunk_size, "max_memory": max_memory, "forward": forward}

        def run(model: nn.Module, rows: Tensor, target: Target) -> Tensor:
            return cls(model, **{**base, **opts}).attribute(rows, target).attributions

        return run, cls.name
    if callable(explainer):
        if opts:
            raise ValueError("explainer_options go with an explainer name; a callable explainer takes none.")
        fn = explainer

        def run_callable(model: nn.Module, rows: Tensor, target: Target) -> Tensor:
            out = fn(model, rows, target)
            if isinstance(out, AttributionResult):
                out = out.attributions
            if not isinstance(out, Tensor):
                raise TypeError(f"the explainer callable must return a tensor of maps, got {type(out).__name__}.")
            return out

        return run_callable, getattr(fn, "__qualname__", type(fn).__name__)
    raise TypeError(
        f"explainer must be an attribution method name or a callable (model, inputs, target) -> maps, got "
        f"{type(explainer).__name__}."
    )


def explain_rows(
    fn: Callable[[nn.Module, Tensor, Target], Tensor],
    model: nn.Module,
    rows: Tensor,
    target: Target,
    index: Tensor,
    n_examples: int,
    like: Tensor,
) -> Tensor:
    """Maps of expanded rows (row ``r`` is a copy of example ``index[r]``), broadcastable to ``like``'s rows."""
    maps = fn(model, rows, RowTarget(target, index, n_examples))
    shape = (rows.shape[0], *like.shape[1:])
    if maps.ndim == rows.ndim - 1 and rows.ndim >= 3:
        maps = maps.unsqueeze(1)
    if maps.shape[0] != rows.shape[0] or maps.ndim != rows.ndim:
        raise ValueError(f"the explainer returned maps of shape {tuple(maps.shape)} for rows of shape {shape}.")
    return maps.detach().to(rows.dtype)


# --------------------------------------------------------------------------------------------- the verb
def build_result(
    cls: type[MetricResult],
    tensors: dict[str, Tensor],
    *,
    metric: str,
    model: nn.Module,
    settings: Mapping[str, Any],
    higher_is_better: bool | None,
    reference: str,
    t0: float,
    seed: int | None = None,
    **extra: Any,
) -> MetricResult:
    """A metric result with the standard meta (mean, stderr over examples, model fingerprint, timing)."""
    mean, se = mean_and_stderr(tensors["values"])
    return cls.build(
        {k: v.detach().clone() for k, v in tensors.items()},  # no shared storage (safetensors refuses it)
        method=metric,
        settings=settings,
        model=model_fingerprint(model),
        seed=seed,
        wall_time_s=time.perf_counter() - t0,
        metric=metric,
        mean=mean,
        stderr=se,
        higher_is_better=higher_is_better,
        reference=reference,
        **extra,
    )


def resolve_target(
    model: nn.Module, inputs: Tensor, target: TargetLike, forward: Callable[[Tensor], Any] | None = None,
    what: str = "evaluate",
) -> Target:
    """``as_target`` for the original examples, validated on one forward of the first rows."""
    run = forward or model
    # the shared first-forward check: inputs that do not fit the model are one clear error, before any work
    first = first_forward(run, inputs.detach(), what=what, model=model)
    resolved = as_target(target, inputs.shape[0], predict=lambda: run(inputs.detach()))
    resolved.validate(_output_tensor(first), inputs.shape[0])
    return resolved


def evaluate(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor | AttributionResult | None,
    *,
    target: TargetLike,
    metric: str,
    **options: Any,
) -> MetricResult:
    """Measure an attribution map with the named explanation-quality metric.

    Metrics (``gradsense.evaluation.METRICS``): ``infidelity`` and ``max_sensitivity`` (Yeh et al. 2019),
    ``deletion`` and ``insertion`` (Petsiuk et al. 2018), ``randomization`` (Adebayo et al. 2018),
    ``hyperparameter_sensitivity`` (Bansal et al. 2020, SAM), ``taylor`` (predicted vs actual change),
    ``attribution_mass`` and ``pointing_game`` (localisation against a ground-truth ``mask=``).

    Args:
        model: The module that was explained (never modified; use ``model.eval()`` yourself).
        inputs: ``(N, ...)`` floating-point inputs.
        attributions: Maps shaped like ``inputs`` (or ``(N, H, W)`` for image maps), or an
            :class:`~gradsense.results.AttributionResult`. Metrics that recompute maps (max-sensitivity,
            randomisation, hyperparameter sensitivity) accept ``None`` with ``explainer=``; ``taylor``
            takes ``None`` for the exact gradient.
        target: What was explained (see :mod:`gradsense.core.targets`).
        metric: A registered metric name.
        **options: The metric's options (see each metric function's docstring).

    Returns:
        A :class:`~gradsense.results.MetricResult` (or subclass): ``values`` per example, ``mean``,
        ``stderr``.

    Raises:
        ValueError: Unknown metric (the message lists them) or option, bad inputs/attributions/target,
            raised before any work.
        TypeError: Arguments of the wrong type.

    Example:
        >>> r = gs.evaluate(model, x, a, target=y, metric="infidelity", n_perturbations=64)  # doctest: +SKIP
        >>> r.mean, r.stderr  # doctest: +SKIP
    """
    fn = get_metric(metric)
    accepted = {
        p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY and p.name != "target"
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"metric {metric!r} does not take option(s) {unknown}; it takes {sorted(accepted)}.")
    return fn(model, inputs, attributions, target=target, **options)


def prepare(
    model: Any, inputs: Any, metric: str, chunk_size: Any = None, max_memory: Any = None
) -> tuple[nn.Module, Tensor]:
    """The checks every metric runs first: a module, finite float inputs, valid chunking knobs."""
    check_model(model)
    check_inputs(inputs)
    check_chunking(chunk_size, max_memory)
    warn_if_train_mode(model, metric)
    return model, inputs


__all__ += ["as_probability", "build_result", "check_count", "check_number", "explain_rows", "generator",
            "prepare", "resolve_target", "rows_per_chunk"]
