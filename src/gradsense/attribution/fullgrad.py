"""FullGrad (Srinivas & Fleuret 2019, "Full-Gradient Representation for Neural-Network Visualization").

For a network that is piecewise linear in its input (ReLU, max-pool, average-pool, affine layers,
BatchNorm in eval mode), the target decomposes exactly into an input-gradient term and one
bias-gradient term per layer with a bias:

    f(x) = sum(grad_x f * x) + sum_layers sum(grad_z f * b)

where ``z`` is the layer's output and ``b`` its bias broadcast over ``z`` (the channel dimension for
convolutions and BatchNorm, the last dimension for ``nn.Linear``). BatchNorm in eval mode is the
affine map ``gamma (z - mean) / sqrt(var + eps) + beta``, whose bias is
``beta - gamma * mean / sqrt(var + eps)``. LayerNorm and GroupNorm are not affine maps of their
input (they divide by its own spread), so their biases are not counted and the identity is
approximate for transformers; ``delta`` shows by how much.

The FullGrad saliency map post-processes each term as the paper does (absolute value, min-max
rescaling to [0, 1] per example over the whole term, bilinear upsampling to the input's spatial
size with ``align_corners=False`` as the CAM methods (the authors' code uses ``True``), sum over
channels) and adds the terms of the input and of every layer whose output is spatial
(same rank as the input); bias terms without spatial structure (``nn.Linear`` on vectors or
tokens) do not enter the map, as in the authors' code. ``post_process=False`` returns the raw terms
instead, for checking the decomposition: ``attributions = grad_x f * x`` (like the inputs), extra
``bias`` ``(N,)`` and ``bias_per_layer`` ``(N, L)``, and ``delta`` = completeness gap
``sum(attributions) + bias - f(x)`` (zero up to rounding for a piecewise-linear network).

The gradients of the layer outputs are recorded by :func:`gradsense.core.hooks.capture` (a forward
hook registers a tensor hook on each output) during one ``torch.autograd.grad`` call w.r.t. the
input. Tensor hooks see the gradient w.r.t. the output as the layer produced it, also when a later
in-place op (``ReLU(inplace=True)``) overwrites it. A layer whose output does not depend on the
input gets no gradient and its (constant) term is left out; ``delta`` then shows the gap. Hooks are
always removed and parameters' ``.grad`` is never touched. A module called more than once per
forward pass is not supported: only one call's term is counted (``delta`` shows the gap).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, register
from gradsense.core.batching import chunks, progress
from gradsense.core.hooks import capture
from gradsense.core.targets import Batch, Target

__all__ = ["FullGrad", "bias_layers", "effective_bias"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def bias_layers(model: nn.Module) -> list[str]:
    """Names of the submodules with a bias FullGrad accounts for: convolutions and linear layers
    with ``bias``, and every BatchNorm (in eval mode it always adds an effective bias)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and getattr(m, "bias", None) is not None
        ):
            out.append(name)
    return out


def effective_bias(module: nn.Module) -> Tensor:
    """The bias a layer adds to its output: ``bias``, or BatchNorm's ``beta - gamma mean / sqrt(var + eps)``.

    Raises:
        ValueError: A BatchNorm in train mode or without running statistics (then it is not an
            affine map of each example alone).
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"FullGrad needs BatchNorm in eval mode with running statistics (then it is affine); "
                f"{type(module).__name__} is in train mode or tracks no statistics. Call model.eval()."
            )
        scale = torch.rsqrt(module.running_var + module.eps)
        gamma = module.weight if module.weight is not None else torch.ones_like(scale)
        beta = module.bias if module.bias is not None else torch.zeros_like(scale)
        return beta - gamma * module.running_mean * scale
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor):
        raise ValueError(f"{type(module).__name__} has no bias.")
    return bias


def _broadcast_bias(module: nn.Module, bias: Tensor, z: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return bias.reshape((1,) * (z.ndim - 1) + (-1,))
    return bias.reshape((1, -1) + (1,) * (z.ndim - 2))


def _minmax(t: Tensor) -> Tensor:
    """Rescale each row (example) of ``t`` to [0, 1] over all its other dims; constant rows become 0."""
    flat = t.reshape(t.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(t.shape)


@register("fullgrad", "full_grad")
class FullGrad(Attribution):
    """FullGrad (Srinivas & Fleuret 2019): input-gradient plus bias-gradient terms of every layer.

    Args:
        model: The module to explain. BatchNorm layers must be in eval mode.
        post_process: The paper's saliency map (True, unsigned, ``(N, H, W)`` for images, the
            input's shape without the channel dimension; ``(N, F)`` for vectors), or the raw terms
            (False, signed, shaped like the inputs, with ``bias``, ``bias_per_layer`` and ``delta``).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> a = FullGrad(net, post_process=False).attribute(x, target=1)
        >>> torch.allclose(a.sum_per_example() + a.tensors["bias"], net(x)[:, 1], atol=1e-5)
        True
    """

    def __init__(self, model: nn.Module, *, post_process: bool = True, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.post_process = bool(post_process)
        self.signed = not self.post_process
        self.layers = bias_layers(self.model)

    def settings(self) -> dict[str, Any]:
        return {"post_process": self.post_process, "bias_layers": self.layers}

    def _check(self, inputs: Tensor) -> None:
        """A BatchNorm in train mode or without running statistics is refused before any forward pass."""
        modules = dict(self.model.named_modules())
        for name in self.layers:
            effective_bias(modules[name])

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        modules = dict(self.model.named_modules())
        biases = {name: effective_bias(modules[name]) for name in self.layers}  # checks BN mode before work
        maps, input_terms, per_layer, scores = [], [], [], []
        parts = list(chunks(inputs.shape[0], self._chunk(inputs)))
        for sl in progress(parts, total=len(parts), desc=f"{self.name}: gradients", enabled=self.show_progress):
            x = inputs[sl].detach().requires_grad_(True)
            hooks = capture(self.model, self.layers, gradients=True) if self.layers else nullcontext()
            with torch.enable_grad(), hooks as cap:
                out = self._run(x)
                s = target(out, Batch(inputs=x, index=index[sl]))
                if s.shape != (x.shape[0],):
                    raise ValueError(f"target returned shape {tuple(s.shape)}, expected ({x.shape[0]},).")
                (gx,) = torch.autograd.grad(s.sum(), x, allow_unused=True)
            gx = torch.zeros_like(x) if gx is None else gx
            input_term = (gx * x).detach()
            sums = torch.zeros((x.shape[0], len(self.layers)), dtype=x.dtype, device=x.device)
            terms: dict[str, Tensor] = {}
            for j, name in enumerate(self.layers):
                g = None if cap is None else cap.gradients.get(name)
                if g is None:  # not called, or its output does not depend on the input
                    continue
                term = g * _broadcast_bias(modules[name], biases[name].detach().to(g.dtype), g)
                terms[name] = term
                sums[:, j] = term.reshape(term.shape[0], -1).sum(1)
            input_terms.append(input_term)
            per_layer.append(sums)
            scores.append(s.detach())
            if self.post_process:
                maps.append(self._saliency(input_term, terms))
        bias_per_layer = torch.cat(per_layer)
        target_values = torch.cat(scores)
        if self.post_process:
            return torch.cat(maps), {"bias_per_layer": bias_per_layer, "scores": target_values}
        raw = torch.cat(input_terms)
        bias = bias_per_layer.sum(1)
        delta = raw.reshape(raw.shape[0], -1).sum(1) + bias - target_values
        return raw, {"bias": bias, "bias_per_layer": bias_per_layer, "delta": delta, "scores": target_values}

    @staticmethod
    def _saliency(input_term: Tensor, terms: dict[str, Tensor]) -> Tensor:
        spatial = input_term.ndim >= 3
        total = _minmax(input_term.abs())
        if not spatial:
            return total
        total = total.sum(1)
        size = tuple(input_term.shape[2:])
        mode = _MODES.get(len(size))
        for term in terms.values():
            if term.ndim != input_term.ndim or mode is None:
                continue  # no spatial structure that matches the input's
            t = _minmax(term.abs())
            if tuple(t.shape[2:]) != size:
                t = F.interpolate(t, size=size, mode=mode, align_corners=False)
            total = total + t.sum(1)
        return total

