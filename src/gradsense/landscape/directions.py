"""Directions in weight space: filter- and layer-normalised Gaussian directions, Hessian eigenvectors,
and checks for directions the caller gives.

A *direction* is a ``{parameter name: tensor}`` dict shaped like the model's (selected) parameters.

- Filter normalisation (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the Loss Landscape of
  Neural Nets", Sec. 4): draw ``d ~ N(0, I)`` and rescale every *filter* ``d_i`` to the norm of the
  model's filter: ``d_i <- d_i / ||d_i|| * ||w_i||``. A filter is one slice along the first dimension
  of a parameter with two or more dimensions: one output channel of a convolution, one row (output
  unit) of a linear layer or an embedding. Parameters with at most one dimension (biases, BatchNorm and
  LayerNorm scales and shifts) get a zero direction, as in the paper; ``include_bias_bn=True`` includes
  them, each rescaled as a whole to the parameter's norm (the paper's reference code copies ``w`` into
  ``d`` instead; a random sign pattern keeps the plot from being a pure rescaling of those parameters).
- Layer normalisation: the same, with the whole parameter tensor as one filter.
- Hessian eigenvectors (the LLA library's axes: "Investigating generalization capabilities of neural
  networks by means of loss landscapes and Hessian analysis", Gabdullin 2024): the top eigenvectors of
  the loss Hessian from :func:`gradsense.curvature.hessian_eigs` (Lanczos), unit vectors in parameter
  space.

Random directions are drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (one per
direction, in parameter order) and then moved to the parameters' device, so the same seed gives the
same directions on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradsense.core.checks import draw_seed
from gradsense.core.distributed import DataLike
from gradsense.core.functional import ParamSpec, check_model, select_parameters

__all__ = [
    "Normalization",
    "check_directions",
    "draw_seed",
    "filter_normalize",
    "hessian_directions",
    "random_directions",
]

Params = dict[str, Tensor]
Normalization = Literal["filter", "layer"]
_NORMALIZATIONS = ("filter", "layer")


def _is_bias_like(t: Tensor) -> bool:
    return t.ndim <= 1


def filter_normalize(
    direction: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    normalization: Normalization = "filter",
    include_bias_bn: bool = False,
) -> Params:
    """Rescale a direction filter by filter (or layer by layer) to the norms of ``reference``.

    Args:
        direction: ``{name: tensor}``, same names and shapes as ``reference``.
        reference: The model's parameters (the point the direction starts from).
        normalization: ``"filter"`` (each slice along the first dimension of a tensor with two or more
            dimensions; Li et al. 2018) or ``"layer"`` (each tensor as a whole).
        include_bias_bn: Also move parameters with at most one dimension (biases, BatchNorm/LayerNorm
            parameters): their direction is the parameter itself, as in the paper's code
            (``net_plotter.normalize_directions_for_weights``, ``d.copy_(w)``); by default it is zero.

    Returns:
        A new direction dict. A filter whose reference norm is zero gets a zero direction.

    Raises:
        ValueError: Unknown ``normalization`` or a direction that does not match ``reference``.

    Example:
        >>> w = {"weight": torch.tensor([[3.0, 4.0], [0.0, 2.0]]), "bias": torch.ones(2)}
        >>> d = filter_normalize({"weight": torch.ones(2, 2), "bias": torch.ones(2)}, w)
        >>> [round(n, 4) for n in d["weight"].norm(dim=1).tolist()], d["bias"].tolist()  # filter norms; bias 0
        ([5.0, 2.0], [0.0, 0.0])
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
    direction = check_directions([direction], reference)[0]
    out: Params = {}
    for name, w in reference.items():
        d = direction[name]
        if _is_bias_like(w):
            if not include_bias_bn:
                out[name] = torch.zeros_like(d)
                continue
            out[name] = w.detach().to(d.dtype).clone()  # net_plotter.py: d.copy_(w) for 1-D parameters
        elif normalization == "layer":
            out[name] = _rescale(d.reshape(1, -1), w.reshape(1, -1)).reshape(d.shape)
        else:
            out[name] = _rescale(d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)).reshape(d.shape)
    return out


def _rescale(d: Tensor, w: Tensor) -> Tensor:
    """Rows of ``d`` rescaled to the norms of the rows of ``w`` (zero where either norm is zero)."""
    dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    wn = torch.linalg.vector_norm(w.to(d.dtype), dim=1, keepdim=True)
    scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
    return d * scale


def random_directions(
    model: nn.Module,
    *,
    n: int = 2,
    normalization: Normalization = "filter",
    include_bias_bn: bool = False,
    params: ParamSpec = None,
    seed: int | None = None,
) -> list[Params]:
    """``n`` Gaussian directions, filter- or layer-normalised to the model's parameters (Li et al. 2018).

    Args:
        model: The module whose parameters set the norms (never modified).
        n: Number of directions.
        normalization: ``"filter"`` or ``"layer"`` (see :func:`filter_normalize`).
        include_bias_bn: Also move parameters with at most one dimension (biases, BatchNorm); default
            zero there, as in the paper.
        params: Which parameters the directions span (see :data:`~gradsense.core.functional.ParamSpec`).
        seed: Random seed; ``None`` draws one from torch's global RNG (of this rank: under torch.distributed,
            pass a seed so that every rank draws the same directions).

    Returns:
        A list of ``n`` direction dicts ``{name: tensor}`` on the parameters' devices and dtypes.
        Directions are not orthogonalised: independent Gaussian directions in many dimensions are
        nearly orthogonal (Li et al. 2018, Sec. 5); their cosine is recorded by :func:`loss_surface`.

    Raises:
        ValueError: ``n`` < 1, unknown ``normalization``, or a ``params`` that selects nothing.
    """
    check_model(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}.")
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}.")
    reference = {k: p.detach() for k, p in select_parameters(model, params).items()}
    gen = torch.Generator(device="cpu").manual_seed(draw_seed(seed))
    out = []
    for _ in range(n):
        raw = {
            k: torch.randn(w.shape, generator=gen, dtype=w.dtype if w.is_floating_point() else torch.float32)
            .to(w.device)
            for k, w in reference.items()
        }
        out.append(
            filter_normalize(raw, reference, normalization=normalization, include_bias_bn=include_bias_bn)
        )
    return out


def hessian_directions(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: DataLike,
    *,
    k: int = 2,
    params: ParamSpec = None,
    seed: int | None = None,
) -> tuple[list[Params], Tensor]:
    """The ``k`` eigenvectors of the loss Hessian with the largest eigenvalues, as directions.

    Uses :func:`gradsense.curvature.hessian_eigs` (Lanczos on Hessian-vector products). The
    eigenvectors are unit vectors in the space of the selected parameters, so a step ``alpha`` along
    one is a move of Euclidean length ``|alpha|``, and near a minimum the loss along eigenvector ``i``
    rises like ``lambda_i * alpha^2 / 2``.

    Args:
        model: The module (never modified).
        loss_fn: ``(output, labels) -> scalar``.
        data: The data the Hessian is averaged over.
        k: Number of eigenvectors.
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`).
        seed: Seed of the Lanczos start vector.

    Returns:
        ``(directions, eigenvalues)``: a list of ``k`` direction dicts and a ``(k,)`` tensor.

    Raises:
        ValueError: As :func:`gradsense.curvature.hessian_eigs` (e.g. ``k`` larger than the parameter count).
    """
    from gradsense.curvature import hessian_eigs  # the public API of the curvature analysis

    kwargs: dict[str, Any] = {"k": k, "which": "largest", "seed": seed, "overlap": False}
    if params is not None:
        kwargs["params"] = params
    res = hessian_eigs(model, loss_fn, data, **kwargs)
    vectors = [dict(v) for v in res.eigenvectors][:k]
    values = torch.as_tensor(res.eigenvalues).detach().reshape(-1)[:k]
    if len(vectors) < k:
        raise ValueError(f"hessian_eigs returned {len(vectors)} eigenvectors, {k} were asked for.")
    return vectors, values


def check_directions(directions: Sequence[Any], reference: Mapping[str, Tensor]) -> list[Params]:
    """Validate directions against the parameters they move, and bring them to the same device/dtype.

    Each direction may be a ``{name: tensor}`` dict with exactly the names and shapes of ``reference``,
    or one flat vector with as many elements as all of ``reference`` together (in ``reference`` order).

    Args:
        directions: The directions.
        reference: ``{name: parameter}`` they must match.

    Returns:
        The directions as dicts, on the reference tensors' devices and dtypes.

    Raises:
        TypeError: A direction that is neither a dict nor a tensor.
        ValueError: Missing or extra names, a shape that differs (the message names the parameter and
            both shapes), a flat vector of the wrong length, or non-finite values.
    """
    total = sum(t.numel() for t in reference.values())
    out: list[Params] = []
    for i, d in enumerate(directions):
        label = f"direction {i}"
        if isinstance(d, Tensor):
            if d.ndim != 1 or d.numel() != total:
                raise ValueError(
                    f"{label} is a tensor of shape {tuple(d.shape)}; a flat direction must be a 1-D vector "
                    f"of {total} elements (all selected parameters), or give a {{name: tensor}} dict."
                )
            parts, offset = {}, 0
            for name, w in reference.items():
                parts[name] = d[offset : offset + w.numel()].reshape(w.shape)
                offset += w.numel()
            d = parts
        elif not isinstance(d, Mapping):
            raise TypeError(
                f"{label} must be a {{parameter name: tensor}} dict or a flat tensor, got {type(d).__name__}."
            )
        missing = [k for k in reference if k not in d]
        extra = [k for k in d if k not in reference]
        if missing or extra:
            parts_msg = []
            if missing:
                parts_msg.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts_msg.append(f"not parameters of the model {extra[:5]}{' ...' if len(extra) > 5 else ''}")
            raise ValueError(f"{label} does not match the model's parameters: {'; '.join(parts_msg)}.")
        clean: Params = {}
        for name, w in reference.items():
            t = d[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"{label}[{name!r}] must be a tensor, got {type(t).__name__}.")
            if tuple(t.shape) != tuple(w.shape):
                raise ValueError(
                    f"{label}[{name!r}] has shape {tuple(t.shape)}, but parameter {name!r} has shape "
                    f"{tuple(w.shape)}."
                )
            t = t.detach().to(device=w.device, dtype=w.dtype if w.is_floating_point() else t.dtype)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label}[{name!r}] contains NaN/Inf values.")
            clean[name] = t
        out.append(clean)
    return out


def direction_norm(direction: Mapping[str, Tensor]) -> float:
    """Euclidean norm of a direction dict (all tensors together)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in direction.values()))


def direction_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Inner product of two direction dicts with the same names."""
    return float(sum(float((a[k].double() * b[k].double()).sum()) for k in a))
