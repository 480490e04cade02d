"""Per-example layer gradients as Kronecker pieces: the inputs ``a`` and output gradients ``delta`` of
Linear, Conv2d and Embedding layers, from one batched forward and backward.

For a layer ``s = W a (+ b)`` applied at positions ``t`` (tokens of a sequence, pixels of a convolution),
the gradient of example ``i``'s loss w.r.t. ``W`` is the matrix ``G_i = sum_t delta_{i,t} a_{i,t}^T`` with
``delta = dL_i/ds``. That is all K-FAC/EK-FAC (Martens & Grosse 2015; George et al. 2018) and LoGra-style
projections (Choe et al. 2024) need, and it costs one ordinary forward and backward of the batch:

- Linear: ``a`` is the layer input, flattened to ``(n, T, in)``, with a column of ones when the bias is
  selected; ``G`` is ``out x (in [+1])`` (weight, then bias).
- Conv2d: ``a`` is the unfolded input (im2col, ``F.unfold``), ``(n, H'W', C kh kw [+1])``; ``G`` reshapes to
  the weight ``(out, C, kh, kw)`` (``groups=1`` and zero padding only).
- Embedding: ``a`` is the one-hot token, kept as indices ``(n, T)`` (``-1`` for ``padding_idx``, whose row
  gets no gradient); ``G`` is ``dim x vocab`` (the weight gradient transposed).

The caller's model is run through ``torch.func.functional_call`` with its own tensors; forward hooks (removed
on exit, also on error) add a zero "tap" to each layer output, ``s + 0``, whose gradient is ``delta``: nothing
is differentiated w.r.t. the parameters, ``.grad`` is never touched, and frozen parameters or integer inputs
do not matter. The batch loss must be the mean of per-example losses and the model must not mix examples
(BatchNorm in eval mode), so that ``n * loss`` differentiates into per-example ``delta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsense.core.checks import check_scalar_loss
from gradsense.core.functional import (
    FunctionalModel,
    ParamSpec,
    check_model,
    describe_training,
    select_parameters,
    training_stochastic_layers,
)

__all__ = [
    "LAYER_TYPES",
    "Layer",
    "LayerIO",
    "check_mean_loss",
    "find_layers",
    "layer_io",
    "shared_layers",
]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Embedding)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A supported layer and how its gradient matrix maps to its parameters.

    Attributes:
        name: Module name (``"(root)"`` when the model itself is the layer).
        module: The module.
        kind: ``"linear"``, ``"conv2d"`` or ``"embedding"``.
        weight: Full name of the weight parameter.
        bias: Full name of the bias parameter when it is selected (a column of ones in ``a``), else ``None``.
        out_dim: Rows of ``G`` (output features/channels; embedding: its dimension).
        in_dim: Columns of ``G`` (inputs [+1 for the bias]; conv: ``C kh kw [+1]``; embedding: vocabulary).
    """

    name: str
    module: nn.Module
    kind: str
    weight: str
    bias: str | None
    out_dim: int
    in_dim: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_dim, in_dim)``."""
        return (self.out_dim, self.in_dim)

    @property
    def params(self) -> list[str]:
        """The parameter names this layer's ``G`` covers, in model order (weight, bias)."""
        return [self.weight] + ([self.bias] if self.bias else [])

    def to_params(self, g: Tensor) -> dict[str, Tensor]:
        """``(n, out, in)`` matrices -> ``{param: (n, *param.shape)}``."""
        n = g.shape[0]
        w = self.module.weight
        if self.kind == "embedding":
            return {self.weight: g.transpose(1, 2).reshape(n, *w.shape)}
        cols = self.in_dim - (1 if self.bias else 0)
        out = {self.weight: g[:, :, :cols].reshape(n, *w.shape)}
        if self.bias:
            out[self.bias] = g[:, :, cols]
        return out

    def from_params(self, grads: dict[str, Tensor]) -> Tensor:
        """``{param: (n, *param.shape)}`` -> ``(n, out, in)`` matrices (inverse of :meth:`to_params`)."""
        w = grads[self.weight]
        n = w.shape[0]
        if self.kind == "embedding":
            return w.reshape(n, self.in_dim, self.out_dim).transpose(1, 2)
        parts = [w.reshape(n, self.out_dim, -1)]
        if self.bias:
            parts.append(grads[self.bias].reshape(n, self.out_dim, 1))
        return torch.cat(parts, dim=2)


def _check_supported(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise ValueError(
                f"layer {name!r} ({m}): only Conv2d with groups=1 and numeric zero padding is supported for "
                "layer-wise gradients (K-FAC/EK-FAC, Kronecker projections). Exclude it with params=... or use "
                "projection='dense' / method='influence'."
            )
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        raise ValueError(f"layer {name!r}: Embedding with max_norm or sparse=True is not supported; exclude it "
                         "with params=....")


def find_layers(model: nn.Module, params: ParamSpec = None, *, strict: bool = False,
                exclude: Sequence[str] = ()) -> dict[str, Layer]:
    """The Linear, Conv2d and Embedding layers whose weight is among the selected parameters.

    Args:
        model: The module.
        params: Which parameters (see :data:`~gradsense.core.functional.ParamSpec`); a selected bias whose
            weight is not selected is ignored.
        strict: Raise if a selected parameter belongs to no supported layer (else it is skipped).
        exclude: Module names to leave out (e.g. from :func:`shared_layers`).

    Returns:
        ``{module name: Layer}`` in model order.

    Raises:
        ValueError: No supported layer is selected; an unsupported configuration (grouped convolution, string
            padding, Embedding with ``max_norm``); with ``strict``, a selected parameter outside them.
    """
    check_model(model)
    selected = select_parameters(model, params)
    out: dict[str, Layer] = {}
    covered: set[str] = set()
    for name, m in model.named_modules():
        if not isinstance(m, LAYER_TYPES) or name in exclude:
            continue
        prefix = f"{name}." if name else ""
        wname = f"{prefix}weight"
        if wname not in selected:
            continue
        _check_supported(name, m)
        bname = f"{prefix}bias" if getattr(m, "bias", None) is not None and f"{prefix}bias" in selected else None
        if isinstance(m, nn.Linear):
            kind, out_dim, in_dim = "linear", m.out_features, m.in_features
        elif isinstance(m, nn.Conv2d):
            kind, out_dim = "conv2d", m.out_channels
            in_dim = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            kind, out_dim, in_dim = "embedding", m.embedding_dim, m.num_embeddings
        in_dim += 1 if bname else 0
        out[name or "(root)"] = Layer(name or "(root)", m, kind, wname, bname, out_dim, in_dim)
        covered.update([wname] + ([bname] if bname else []))
    if not out:
        raise ValueError(
            f"params={params!r} selects no Linear, Conv2d or Embedding weight of {type(model).__name__}; "
            "layer-wise methods (ekfac, projection='kronecker') need at least one."
        )
    rest = [n for n in selected if n not in covered]
    if strict and rest:
        raise ValueError(
            f"{len(rest)} selected parameters are not the weight/bias of a Linear, Conv2d or Embedding layer "
            f"(e.g. {rest[:4]}); layer-wise methods cannot use them. Select only those layers (params=(nn.Linear, "
            "nn.Conv2d, nn.Embedding)) or use a method that works on any parameter."
        )
    return out


@dataclasses.dataclass
class LayerIO:
    """What :func:`layer_io` recorded for a batch.

    Attributes:
        inputs: ``{layer: a}``: ``(n, T, in_dim)`` (Linear/Conv2d) or ``(n, T)`` token indices (Embedding).
        grads: ``{layer: delta}``: ``(n, T, out_dim)``, gradients of the per-example losses.
        output: The model output (detached).
    """

    inputs: dict[str, Tensor]
    grads: dict[str, Tensor]
    output: Any

    def matrix(self, layer: Layer) -> Tensor:
        """Per-example gradient matrices ``G_i = sum_t delta_t a_t^T``, ``(n, out, in)``."""
        a, d = self.inputs[layer.name], self.grads[layer.name]
        if layer.kind == "embedding":
            n = d.shape[0]
            g = torch.zeros(n, layer.in_dim, layer.out_dim, dtype=d.dtype, device=d.device)
            idx = a.clamp_min(0)
            src = d * (a >= 0).unsqueeze(-1).to(d.dtype)
            g.scatter_add_(1, idx.unsqueeze(-1).expand_as(src), src)
            return g.transpose(1, 2)
        return torch.einsum("nto,nti->noi", d, a)


def _flatten_input(layer: Layer, x: Tensor) -> Tensor:
    m = layer.module
    if layer.kind == "embedding":
        idx = x.reshape(x.shape[0], -1).long()
        if m.padding_idx is not None:
            idx = torch.where(idx == m.padding_idx, torch.full_like(idx, -1), idx)
        return idx
    if layer.kind == "conv2d":
        a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride).transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if layer.bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], dim=2)
    return a


def _flatten_grad(layer: Layer, g: Tensor) -> Tensor:
    if layer.kind == "conv2d":
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@contextmanager
def _taps(layers: dict[str, Layer]) -> Iterator[tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]]:
    inputs: dict[str, list[Tensor]] = {k: [] for k in layers}
    taps: dict[str, list[Tensor]] = {k: [] for k in layers}
    handles = []

    def make(layer: Layer) -> Callable[..., Tensor]:
        def hook(_m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            inputs[layer.name].append(_flatten_input(layer, args[0].detach()))
            tap = torch.zeros_like(output, requires_grad=True)
            taps[layer.name].append(tap)
            return output + tap

        return hook

    try:
        for layer in layers.values():
            handles.append(layer.module.register_forward_hook(make(layer)))
        yield inputs, taps
    finally:
        for h in handles:
            h.remove()


def layer_io(
    fm: FunctionalModel,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Any,
    labels: Any,
    layers: dict[str, Layer],
    *,
    sample_labels: Callable[[Any], Any] | None = None,
    forward: Callable[[FunctionalModel, Any], Any] | None = None,
) -> LayerIO:
    """Inputs and per-example output gradients of ``layers`` for one batch.

    Args:
        fm: The model as a function (its tensors are used as they are, none is differentiated).
        loss_fn: ``(output, labels) -> scalar``, the *mean* over the batch of per-example losses.
        inputs: The batch inputs (any type the model takes).
        labels: The batch labels.
        layers: From :func:`find_layers` on ``fm.module``.
        sample_labels: Optional ``output -> labels`` drawn from the model's predictive distribution (for
            the "true" Fisher); replaces ``labels``.
        forward: How to run the model (default ``fm(fm.params, inputs)``).

    Returns:
        A :class:`LayerIO`. A layer called several times in one forward has its calls concatenated along ``T``
        (its gradient is the sum over calls).

    Raises:
        ValueError: BatchNorm/Dropout in train mode; a loss that is not a scalar.
    """
    stochastic = training_stochastic_layers(fm.module)
    if stochastic:
        raise ValueError(f"{describe_training(stochastic)}: per-example layer gradients need examples that do not "
                         "interact. Call model.eval() first.")
    n = _batch_size(inputs)
    with torch.enable_grad(), _taps(layers) as (ins, taps):
        out = forward(fm, inputs) if forward is not None else fm(fm.params, inputs)
        y = sample_labels(_detach(out)) if sample_labels is not None else labels
        loss = loss_fn(out, y)
        check_scalar_loss(loss)
        live = [(k, t) for k, ts in taps.items() for t in ts]
        grads = torch.autograd.grad(loss * n, [t for _, t in live], allow_unused=True)
    per: dict[str, list[Tensor]] = {k: [] for k in layers}
    for (k, t), g in zip(live, grads):
        per[k].append(_flatten_grad(layers[k], torch.zeros_like(t) if g is None else g))
    shared = [k for k, v in ins.items() if any(t.shape[0] != n for t in v)]
    if shared:
        raise ValueError(f"layers {shared[:4]} see inputs shared by all examples (e.g. position embeddings broadcast "
                         "over the batch), so their per-example gradients cannot be separated; exclude them with "
                         "params=.")
    missing = [k for k in layers if not ins[k]]
    if missing:
        raise ValueError(f"layers {missing[:4]} were not called by the model's forward; exclude them with params=.")
    return LayerIO(
        inputs={k: torch.cat(v, dim=1) for k, v in ins.items()},
        grads={k: torch.cat(v, dim=1).detach() for k, v in per.items()},
        output=_detach(out),
    )


def shared_layers(fm: FunctionalModel, layers: dict[str, Layer], inputs: Any,
                  forward: Callable[[FunctionalModel, Any], Any] | None = None) -> list[str]:
    """Layers whose input is not one row per example (position embeddings indexed by a ``(1, T)`` tensor and
    broadcast over the batch): their per-example gradients cannot be separated from a batched backward.

    Runs one forward (no gradient) on ``inputs`` (at least two examples) with temporary hooks.

    Returns:
        Their names.
    """
    n = _batch_size(inputs)
    found: list[str] = []
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, Tensor) and (x.ndim == 0 or x.shape[0] != n) and name not in found:
                found.append(name)

        return hook

    try:
        for layer in layers.values():
            handles.append(layer.module.register_forward_hook(make(layer.name)))
        with torch.no_grad():
            forward(fm, inputs) if forward is not None else fm(fm.params, inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    return out


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, dict):
        return _batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)):
        return _batch_size(inputs[0])
    raise TypeError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}.")


def check_mean_loss(fm: FunctionalModel, loss_fn: Callable[[Any, Any], Tensor], inputs: Tensor,
                    labels: Tensor) -> None:
    """Check that ``loss_fn`` averages over the batch: ``2 loss(x[:2]) == loss(x[0]) + loss(x[1])``.

    Per-example gradients from a batched backward assume it; a summed loss would scale them by the batch size.

    Raises:
        ValueError: It does not (with what to do).
    """
    if inputs.shape[0] < 2:
        return
    with torch.no_grad():
        pair = loss_fn(fm(fm.params, inputs[:2]), labels[:2])
        check_scalar_loss(pair)
        one = loss_fn(fm(fm.params, inputs[:1]), labels[:1]) + loss_fn(fm(fm.params, inputs[1:2]), labels[1:2])
    if not torch.allclose(2 * pair.double(), one.double(), rtol=1e-4, atol=1e-6 * max(1.0, float(one.abs()))):
        raise ValueError(
            "loss_fn must return the mean of per-example losses over the batch (reduction='mean'): on two examples "
            f"it gave {float(pair):.6g}, but the two one-example losses sum to {float(one):.6g}."
        )
