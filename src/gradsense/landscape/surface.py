"""Loss surfaces (1-D lines and 2-D planes through a model) and linear interpolation between models.

- :func:`loss_surface`: the loss on the grid ``w + alpha * d1 + beta * d2``, ``alpha, beta`` in
  ``[-span, span]``, with filter-normalised Gaussian directions (Li, Xu, Taylor, Studer & Goldstein 2018,
  "Visualizing the Loss Landscape of Neural Nets"), layer-normalised ones, the top Hessian eigenvectors
  (the LLA library's axes; Gabdullin 2024), or directions of your own.
- :func:`interpolate`: the loss along ``(1 - t) * w_a + t * w_b`` (Goodfellow, Vinyals & Saxe 2015,
  "Qualitatively characterizing neural network optimization problems"), with the loss barrier of
  Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis").
- :func:`perturbed_copy`: a copy of a model moved along a random filter-normalised direction, to
  interpolate between a checkpoint and a perturbed copy of it.

Every grid point is a row of a batch: chunks of points run through the model at once under
``torch.func.vmap`` (see :mod:`gradsense.landscape.engine`). The caller's model is never changed:
unlike loss-landscapes' default (``deepcopy_model=False``), which leaves the model's weights at the last
grid point, nothing here writes to a parameter.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from gradsense.core.distributed import DataLike
from gradsense.core.functional import ParamSpec, check_model, copy_buffers, model_fingerprint
from gradsense.landscape.directions import (
    Normalization,
    check_directions,
    direction_dot,
    direction_norm,
    draw_seed,
    hessian_directions,
    random_directions,
)
from gradsense.landscape.engine import LossEvaluator
from gradsense.results.landscape import InterpolationResult, SurfaceResult

__all__ = ["grid_axis", "interpolate", "loss_surface", "perturbed_copy"]

Params = dict[str, Tensor]
LossFn = Callable[[Any, Any], Tensor]
Directions = Union[Literal["filter", "layer", "hessian"], Sequence[Any], Mapping[str, Tensor], Tensor]


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int >= 2, got {type(steps).__name__} {steps!r}.")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a line needs two points), got {steps}.")
    return steps


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def grid_axis(steps: int, span: float) -> Tensor:
    """``steps`` float64 coordinates from ``-span`` to ``span``, symmetric, with an exact 0 for odd steps.

    Computed as ``span * (2i - (steps - 1)) / (steps - 1)`` from integers, so ``axis[i] == -axis[-1-i]``
    exactly and the middle point of an odd grid is exactly ``0.0`` (the model itself).

    Raises:
        ValueError: ``steps`` < 2 or ``span`` not positive.
    """
    steps = _check_steps(steps)
    span = _check_positive(span, "span")
    i = torch.arange(steps, dtype=torch.float64)
    return span * (2 * i - (steps - 1)) / (steps - 1)


def _moving_names(reference: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]) -> list[str]:
    return [n for n in reference if any(bool(d[n].any()) for d in directions)]


def _combiner(
    base: Mapping[str, Tensor] | None,
    directions: Sequence[Mapping[str, Tensor]],
    coeffs: Tensor,
    names: Sequence[str],
) -> Callable[[slice], Params]:
    """``make(slice)`` -> ``{name: base + sum_k c_k d_k}`` stacked over the points of the slice.

    The directions of the moving tensors are kept as one ``(K, numel)`` matrix per (device, dtype), so a
    chunk of points is one fused ``addmm`` (``base + C @ D``); each tensor is a view into that block.
    With ``c = 0`` the result is exactly ``base`` (and with ``base=None``, ``c = (0, 1)`` gives exactly
    the second direction), so the model itself and interpolation endpoints are represented exactly.
    The block is written into one buffer per group, allocated at the first call and reused (``out=``) by
    the next ones: a fresh multi-megabyte block per chunk cost more in page faults than the ``addmm``
    itself (bench/bench_landscape.py). The returned tensors are therefore only valid until the next call.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for n in names:
        t = directions[0][n]
        groups.setdefault((t.device, t.dtype), []).append(n)
    packed = []
    for (device, dtype), group in groups.items():
        mat = torch.stack([torch.cat([d[n].reshape(-1) for n in group]) for d in directions])
        flat_base = None if base is None else torch.cat([base[n].reshape(-1) for n in group]).unsqueeze(0)
        packed.append((device, dtype, group, mat, flat_base))

    buffers: list[Tensor | None] = [None] * len(packed)

    def make(sl: slice) -> Params:
        out: Params = {}
        for i, (device, dtype, group, mat, flat_base) in enumerate(packed):
            c = coeffs[sl].to(device=device, dtype=dtype)
            buf = buffers[i]
            if buf is None or buf.shape[0] < c.shape[0]:
                buf = buffers[i] = torch.empty(c.shape[0], mat.shape[1], device=device, dtype=dtype)
            block = buf[: c.shape[0]]
            if flat_base is None:
                torch.mm(c, mat, out=block)
            else:
                torch.addmm(flat_base, c, mat, out=block)
            offset = 0
            for n in group:
                shape = directions[0][n].shape
                size = directions[0][n].numel()
                out[n] = block[:, offset : offset + size].reshape(block.shape[0], *shape)
                offset += size
        return out

    return make


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    data: DataLike,
    *,
    steps: int = 21,
    span: float = 1.0,
    directions: Directions = "filter",
    dims: int = 2,
    seed: int | None = None,
    params: ParamSpec = None,
    include_bias_bn: bool = False,
    batch_size: int = 512,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    vectorize: bool | None = None,
    allow_train_mode: bool = False,
    show_progress: bool | None = False,
    name: str | None = None,
) -> SurfaceResult:
    """The loss on a 1-D line or 2-D plane through the model in weight space.

    The grid is ``w + alpha * d1 (+ beta * d2)`` with ``alpha, beta`` in ``[-span, span]``
    (``steps`` points each, see :func:`grid_axis`); ``losses[i, j]`` is the dataset-average loss at
    ``(alphas[i], betas[j])``. For odd ``steps`` the middle point is the model itself and its value is the
    model's own loss exactly (evaluated by the plain forward).

    Directions:

    - ``"filter"`` (default): Gaussian, each filter rescaled to the norm of the model's filter, biases and
      BatchNorm parameters zero (Li et al. 2018). ``span=1`` moves every filter by up to its own norm.
    - ``"layer"``: Gaussian, each parameter tensor rescaled to the tensor's norm.
    - ``"hessian"``: the top-``dims`` eigenvectors of the loss Hessian (unit vectors; ``alpha`` is then a
      Euclidean distance), from :func:`gradsense.curvature.hessian_eigs`.
    - your own: ``(d1, d2)`` (or ``d1`` / ``(d1,)`` for ``dims=1``), each a ``{name: tensor}`` dict shaped
      like the selected parameters or a flat vector; used as given.

    Args:
        model: The module (never modified). Must be in eval mode if it has BatchNorm/Dropout, unless
            ``allow_train_mode=True``.
        loss_fn: ``(output, labels) -> scalar`` mean loss of a batch (``gs.losses.cross_entropy``).
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader; the loss is averaged over all of it.
        steps: Points per axis (>= 2; odd puts the model on the grid).
        span: Half-width of the grid in units of the directions (> 0).
        directions: ``"filter"``, ``"layer"``, ``"hessian"`` or your own directions.
        dims: 1 (a line) or 2 (a plane).
        seed: Seed of the random directions (and of Lanczos for ``"hessian"``); ``None`` draws one,
            recorded in the result.
        params: Which parameters move (see :data:`~gradsense.core.functional.ParamSpec`); default all.
        include_bias_bn: Move biases and BatchNorm/LayerNorm parameters too (filter/layer directions).
        batch_size: Examples per model call for tensors and Datasets.
        chunk_size: Grid points per vectorised call; default from the memory budget.
        max_memory: Memory budget (bytes or e.g. ``"2GB"``).
        vectorize: ``True``: grid points as a vmap batch; ``False``: one point at a time; ``None`` (default):
            vmap on accelerators and for small per-point forwards on CPU, else one at a time (faster there;
            see :data:`~gradsense.landscape.engine.CPU_VMAP_MAX_BYTES`); vmap falls back to one point at a
            time, with a warning, when it cannot run the model. ``result.meta["vectorized"]`` says which ran.
        allow_train_mode: Accept a train-mode model with BatchNorm/Dropout (one point at a time).
        show_progress: Progress bar (``None``: on a TTY).
        name: Model name for the result (default: zoo name or class name).

    Returns:
        A :class:`~gradsense.results.landscape.SurfaceResult` with ``alphas``, ``betas`` (``None`` for
        ``dims=1``), ``losses`` (``(steps, steps)`` or ``(steps,)``), ``accuracy`` (when the labels are
        classes), ``directions`` and ``center_loss``.

    Raises:
        TypeError: Bad argument types.
        ValueError: ``steps`` < 2, ``span`` <= 0, ``dims`` not 1 or 2, an unknown direction name,
            directions that do not match the parameters (the message names the parameter), directions
            that are zero everywhere, or a train-mode model with BatchNorm/Dropout.
        ImportError: ``directions="hessian"`` without :func:`gradsense.curvature.hessian_eigs`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> s = loss_surface(model, torch.nn.functional.cross_entropy, (x, y), steps=5, seed=0)
        >>> s.losses.shape, bool(s.losses[2, 2] == s.center_loss)
        (torch.Size([5, 5]), True)
    """
    t0 = time.perf_counter()
    check_model(model)
    steps = _check_steps(steps)
    span = _check_positive(span, "span")
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}.")
    seed = draw_seed(seed, shared=True)
    ev = LossEvaluator(model, loss_fn, data, params=params, batch_size=batch_size,
                       allow_train_mode=allow_train_mode, seed=seed, what="loss_surface")
    reference = ev.params
    eigenvalues = None
    if isinstance(directions, str):
        if directions in ("filter", "layer"):
            norm: Normalization = directions  # type: ignore[assignment]
            dirs = random_directions(model, n=dims, normalization=norm, include_bias_bn=include_bias_bn,
                                     params=params, seed=seed)
        elif directions == "hessian":
            found, eigenvalues = hessian_directions(model, loss_fn, data, k=dims, params=params, seed=seed)
            dirs = check_directions(found, reference)
        else:
            raise ValueError(
                f"directions must be 'filter', 'layer', 'hessian' or your own (d1, d2); got {directions!r}."
            )
        kind = directions
    else:
        given = [directions] if isinstance(directions, (Mapping, Tensor)) else list(directions)
        if len(given) != dims:
            raise ValueError(
                f"dims={dims} needs {dims} direction(s), got {len(given)}. Pass (d1, d2) for a plane, d1 for a line."
            )
        dirs = check_directions(given, reference)
        kind = "custom"
    moving = _moving_names(reference, dirs)
    if not moving:
        raise ValueError(
            "the directions are zero for every parameter (filter normalisation zeroes biases and BatchNorm "
            "parameters): pass include_bias_bn=True or select other parameters."
        )

    axis = grid_axis(steps, span)
    if dims == 2:
        aa, bb = torch.meshgrid(axis, axis, indexing="ij")
        coeffs = torch.stack([aa.reshape(-1), bb.reshape(-1)], dim=1)
    else:
        coeffs = axis.reshape(-1, 1)
    make = _combiner(reference, dirs, coeffs, moving)
    center_loss, center_acc = ev.loss_at()
    pts = ev.evaluate(make, coeffs.shape[0], moving={n: reference[n] for n in moving}, chunk_size=chunk_size,
                      max_memory=max_memory, vectorize=vectorize, show_progress=show_progress,
                      desc="loss surface")
    losses, accuracy = pts.losses.clone(), None if pts.accuracy is None else pts.accuracy.clone()
    if steps % 2 == 1:  # the middle point is the model itself: its own loss, by the plain forward
        mid = (coeffs.shape[0] - 1) // 2
        losses[mid] = center_loss
        if accuracy is not None and center_acc is not None:
            accuracy[mid] = center_acc
    shape = (steps, steps) if dims == 2 else (steps,)
    tensors: dict[str, Tensor] = {"alphas": axis, "losses": losses.reshape(shape)}
    if dims == 2:
        tensors["betas"] = axis.clone()
    if accuracy is not None:
        tensors["accuracy"] = accuracy.reshape(shape)
    for k, d in enumerate(dirs):
        tensors[f"direction_{k}"] = torch.cat([d[n].reshape(-1) for n in reference]).detach().cpu()
    if eigenvalues is not None:
        tensors["eigenvalues"] = eigenvalues.detach().cpu().double()
    norms = [direction_norm(d) for d in dirs]
    cosine = direction_dot(dirs[0], dirs[1]) / (norms[0] * norms[1]) if dims == 2 and norms[0] * norms[1] > 0 else None
    return SurfaceResult.build(
        tensors,
        method=f"loss_surface/{kind}",
        settings={
            "steps": steps, "span": span, "dims": dims, "directions": kind, "include_bias_bn": include_bias_bn,
            "params": params if params is None or isinstance(params, (str, list, tuple)) else str(params),
            "batch_size": batch_size, "examples": ev.n_examples,
        },
        model=model_fingerprint(model, name),
        seed=seed,
        wall_time_s=time.perf_counter() - t0,
        center_loss=center_loss,
        center_accuracy=center_acc,
        param_names=list(reference),
        param_shapes=[list(t.shape) for t in reference.values()],
        moving=len(moving),
        direction_norms=norms,
        model_norm=direction_norm(reference),
        cosine=cosine,
        vectorized=pts.vectorized,
        chunk_size=pts.chunk_size,
        n_points=int(coeffs.shape[0]),
        n_forward=pts.n_forward + len(ev.batches),
        loss_name=getattr(loss_fn, "__name__", type(loss_fn).__name__),
    )


# ------------------------------------------------------------------------------------------ interpolation
def _state(model: nn.Module, buffers: bool) -> Params:
    out = {n: p.detach() for n, p in model.named_parameters()}
    if buffers:  # copies: a train-mode BatchNorm updates the running statistics it is handed, in place
        out.update({n: b for n, b in copy_buffers(model).items() if b.is_floating_point()})
    return out


def _endpoint_state(
    model_a: nn.Module, model_b: nn.Module | Mapping[str, Tensor], buffers: bool
) -> tuple[Params, Params]:
    """Matching ``{name: tensor}`` states of both endpoints; a clear error naming what differs."""
    state_a = _state(model_a, buffers)
    param_names = {n for n, _ in model_a.named_parameters()}
    if isinstance(model_b, nn.Module):
        raw_b = dict(model_b.named_parameters())
        raw_b.update(dict(model_b.named_buffers()))
        extra = [n for n, _ in model_b.named_parameters() if n not in param_names]
        if extra:
            raise ValueError(
                f"model_a and model_b have different architectures: parameter {extra[0]!r} is in model_b but "
                "not in model_a."
            )
        required = set(state_a)
    elif isinstance(model_b, Mapping):
        raw_b = dict(model_b)
        all_a = set(dict(model_a.named_parameters())) | set(dict(model_a.named_buffers()))
        extra = [n for n in raw_b if n not in all_a]
        if extra:
            raise ValueError(
                f"model_b has {extra[0]!r}, which is not a parameter or buffer of model_a: the checkpoints come "
                "from different architectures (or the names carry a prefix such as 'module.')."
            )
        required = param_names
    else:
        raise TypeError(
            f"model_b must be an nn.Module or a {{name: tensor}} state dict, got {type(model_b).__name__}."
        )
    state_b: Params = {}
    for n, ta in state_a.items():
        if n not in raw_b:
            if n in required:
                what = "parameter" if n in param_names else "buffer"
                raise ValueError(
                    f"model_a and model_b have different architectures: {what} {n!r} is in model_a but not in "
                    "model_b."
                )
            state_b[n] = ta  # a buffer the state dict does not carry: model_a's is used at every point
            continue
        tb = raw_b[n]
        if not isinstance(tb, Tensor):
            raise TypeError(f"model_b[{n!r}] must be a tensor, got {type(tb).__name__}.")
        if tuple(tb.shape) != tuple(ta.shape):
            what = "parameter" if n in param_names else "buffer"
            raise ValueError(
                f"model_a and model_b have different architectures: {what} {n!r} has shape {tuple(ta.shape)} in "
                f"model_a but {tuple(tb.shape)} in model_b."
            )
        tb = tb.detach().to(device=ta.device, dtype=ta.dtype)
        state_b[n] = tb if n in param_names else tb.clone()  # never the caller's buffer storage
    return state_a, state_b


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module | Mapping[str, Tensor],
    loss_fn: LossFn,
    data: DataLike,
    *,
    steps: int = 25,
    start: float = 0.0,
    end: float = 1.0,
    buffers: bool = True,
    batch_size: int = 512,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    vectorize: bool | None = None,
    allow_train_mode: bool = False,
    show_progress: bool | None = False,
    names: tuple[str, str] = ("A", "B"),
) -> InterpolationResult:
    """The loss along the straight line between two models (Goodfellow, Vinyals & Saxe 2015).

    Point ``t`` is ``(1 - t) * w_a + t * w_b`` for every parameter and, with ``buffers=True``, every
    floating-point buffer (BatchNorm running statistics); integer buffers are model_a's. ``t = 0`` and
    ``t = 1`` are exactly the two models, and their values are the models' own losses. Extending
    ``start``/``end`` beyond ``[0, 1]`` shows the loss past the endpoints.

    To look at a checkpoint and a perturbed copy of it, pass ``perturbed_copy(model, scale=..., seed=...)``
    as ``model_b``.

    Args:
        model_a: The first model (t = 0); its module is the template for every point (never modified).
        model_b: The second model (t = 1): a module of the same architecture, or a ``{name: tensor}``
            state dict (its parameters are required; buffers it lacks are model_a's).
        loss_fn: ``(output, labels) -> scalar`` mean loss of a batch.
        data: Tensor, ``(inputs, labels)``, Dataset or DataLoader.
        steps: Number of points (>= 2).
        start: First ``t``.
        end: Last ``t`` (> ``start``).
        buffers: Interpolate floating-point buffers too (default); ``False`` keeps model_a's.
        batch_size: Examples per model call.
        chunk_size: Points per vectorised call; default from the memory budget.
        max_memory: Memory budget.
        vectorize: ``None`` (as in :func:`loss_surface`), ``True`` (vmap) or ``False`` (one at a time).
        allow_train_mode: Accept a train-mode model with BatchNorm/Dropout (one point at a time).
        show_progress: Progress bar.
        names: Display names of the two models.

    Returns:
        An :class:`~gradsense.results.landscape.InterpolationResult` with ``alphas`` (the ``t`` values),
        ``losses``, ``accuracy``, ``loss_a``, ``loss_b`` and ``barrier`` (Frankle et al. 2020:
        ``max_t L(t) - ((1 - t) L(0) + t L(1))`` over the points with ``0 <= t <= 1``).

    Raises:
        TypeError: ``model_b`` is neither a module nor a state dict.
        ValueError: ``steps`` < 2, ``end <= start``, or two architectures that differ (the message names
            the first parameter or buffer that differs).
    """
    t0 = time.perf_counter()
    check_model(model_a)
    steps = _check_steps(steps)
    for v, nm in ((start, "start"), (end, "end")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{nm} must be a finite number, got {v!r}.")
    if not end > start:
        raise ValueError(f"end must be greater than start, got start={start}, end={end}.")
    state_a, state_b = _endpoint_state(model_a, model_b, buffers)
    ev = LossEvaluator(model_a, loss_fn, data, params=None, batch_size=batch_size,
                       allow_train_mode=allow_train_mode, what="interpolate")
    i = torch.arange(steps, dtype=torch.float64)
    alphas = start + (end - start) * i / (steps - 1)
    alphas[-1] = float(end)
    names_moving = [n for n in state_a if not torch.equal(state_a[n], state_b[n])] or list(state_a)
    static = {n: state_a[n] for n in state_a if n not in names_moving}
    coeffs = torch.stack([1.0 - alphas, alphas], dim=1)
    make = _combiner(None, [state_a, state_b], coeffs, names_moving)
    loss_a, acc_a = ev.loss_at(state_a)
    loss_b, acc_b = ev.loss_at(state_b)
    pts = ev.evaluate(make, steps, moving={n: state_a[n] for n in names_moving}, static=static,
                      chunk_size=chunk_size, max_memory=max_memory, vectorize=vectorize,
                      show_progress=show_progress, desc="interpolation")
    losses = pts.losses.clone()
    accuracy = None if pts.accuracy is None else pts.accuracy.clone()
    for t_value, (lv, av) in ((0.0, (loss_a, acc_a)), (1.0, (loss_b, acc_b))):
        hit = (alphas == t_value).nonzero().reshape(-1)
        for j in hit.tolist():
            losses[j] = lv
            if accuracy is not None and av is not None:
                accuracy[j] = av
    inside = (alphas >= 0) & (alphas <= 1)
    barrier = None
    if bool(inside.any()):
        line = (1 - alphas[inside]) * loss_a + alphas[inside] * loss_b
        barrier = float((losses[inside] - line).max())
    tensors: dict[str, Tensor] = {"alphas": alphas, "losses": losses}
    if accuracy is not None:
        tensors["accuracy"] = accuracy
    distance = math.sqrt(sum(float((state_b[n].double() - state_a[n].double()).pow(2).sum())
                             for n in state_a if n in dict(model_a.named_parameters())))
    return InterpolationResult.build(
        tensors,
        method="interpolate",
        settings={"steps": steps, "start": start, "end": end, "buffers": buffers, "batch_size": batch_size,
                  "examples": ev.n_examples},
        model=model_fingerprint(model_a, names[0]),
        wall_time_s=time.perf_counter() - t0,
        names=list(names),
        model_b=model_fingerprint(model_b, names[1]) if isinstance(model_b, nn.Module) else {"name": names[1]},
        loss_a=loss_a,
        loss_b=loss_b,
        accuracy_a=acc_a,
        accuracy_b=acc_b,
        barrier=barrier,
        distance=distance,
        vectorized=pts.vectorized,
        chunk_size=pts.chunk_size,
        n_forward=pts.n_forward + 2 * len(ev.batches),
    )


def perturbed_copy(
    model: nn.Module,
    *,
    scale: float = 1.0,
    directions: Literal["filter", "layer"] = "filter",
    include_bias_bn: bool = False,
    params: ParamSpec = None,
    seed: int | None = None,
) -> nn.Module:
    """A deep copy of ``model`` moved to ``w + scale * d`` along a random normalised direction.

    ``d`` is a filter- (or layer-) normalised Gaussian direction (:func:`random_directions`), so
    ``scale=1`` moves every filter by its own norm. The caller's model is not changed.

    Args:
        model: The module to copy.
        scale: Step along the direction.
        directions: ``"filter"`` or ``"layer"`` normalisation.
        include_bias_bn: Move biases and BatchNorm parameters too.
        params: Which parameters move.
        seed: Seed of the direction.

    Returns:
        The moved copy (same train/eval mode as ``model``).

    Raises:
        ValueError: A non-finite ``scale`` or an unknown normalisation.
    """
    check_model(model)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    (d,) = random_directions(model, n=1, normalization=directions, include_bias_bn=include_bias_bn,
                             params=params, seed=seed)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        named = dict(moved.named_parameters())
        for n, t in d.items():
            named[n].add_(t, alpha=float(scale))
    return moved
