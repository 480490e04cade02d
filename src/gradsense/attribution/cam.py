"""Class activation maps: where, at one spatial layer, the evidence for the target lies.

A CAM method reads a layer's activation ``A`` of shape ``(N, C, h, w)`` and the gradient
``G = d target / d A``, combines the channels into one ``(N, h, w)`` map, and upsamples it
(bilinear, ``align_corners=False``) to the input's spatial size. ``attributions`` is the upsampled
``(N, H, W)`` map; the low-resolution map is kept as the extra tensor ``raw``.

- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
  Gradient-based Localization"): ``w_c = mean_ij G_cij``, map ``ReLU(sum_c w_c A_c)``.
- Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Generalized Gradient-based Visual Explanations
  for Deep Convolutional Networks"): pixel-wise weights ``alpha`` from the closed-form higher-order
  terms under the exponential assumption (their eq. 19).
- Smooth Grad-CAM++ (Omeiza et al. 2019, "Smooth Grad-CAM++: An Enhanced Inference Level
  Visualization Technique for Deep Convolutional Neural Network Models"): Grad-CAM++ with the
  gradient moments averaged over noisy copies of the input.
- NormGrad (Rebuffi et al. 2020, "There and Back Again: Revisiting Backpropagation Saliency
  Methods"): per location ``||A_ij|| * ||G_ij||`` (norms over channels), at one layer or summed over
  every ``nn.Conv2d``.
- CF-CAM (He, Pan & Yao 2025, "CF-CAM: Cluster Filter Class Activation Mapping for Reliable
  Gradient-Based Interpretability"): Grad-CAM whose low-importance channels are clustered with
  DBSCAN (noise channels dropped) and whose cluster gradients are Gaussian-filtered.

The layer: ``layer=`` a submodule name or object, or ``None`` to find one (:func:`find_cam_layer`):
for a vision transformer (``model.blocks`` of blocks without convolutions) the output of the
second-to-last block, i.e. the last block's input, whose patch tokens become a ``g x g`` grid; else
the last ``nn.Conv2d`` in ``model.modules()``. Token activations ``(N, T, D)`` are turned into
``(N, D, g, g)`` with ``g = isqrt(T)`` after dropping the ``T - g^2`` leading (CLS-like) tokens
(:func:`tokens_to_grid`); ``reshape=`` overrides that for other layouts.

Gradients are taken with ``torch.autograd.grad`` w.r.t. the captured activation
(:func:`gradsense.core.hooks.capture` with ``keep_graph=True``; hooks always removed), rows in chunks
under the memory budget. Parameters' ``.grad`` is never touched. When an in-place op overwrites
the layer's output (``ReLU(inplace=True)`` right after a conv), activation and gradient are both
read from the overwritten tensor: the map is that of the in-place op's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, register
from gradsense.attribution.noise import noisy_rows
from gradsense.core.batching import chunks, progress
from gradsense.core.checks import check_positive_int
from gradsense.core.hooks import capture, resolve_layers
from gradsense.core.targets import Batch, Target

__all__ = [
    "CFCAM",
    "GRADIENT_METHODS",
    "GradCAM",
    "GradCAMPlusPlus",
    "NormGrad",
    "SmoothGradCAMPlusPlus",
    "find_cam_layer",
    "tokens_to_grid",
    "upsample",
]

#: Registered methods that need no spatial layer (named in the error when no CAM layer exists).
GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad")

Reshape = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------- layer helpers
def _is_transformer_stack(blocks: Any) -> bool:
    return (
        isinstance(blocks, (nn.ModuleList, nn.Sequential))
        and len(blocks) > 0
        and not any(isinstance(m, nn.Conv2d) for m in blocks[-1].modules())
    )


def find_cam_layer(model: nn.Module, method: str = "cam") -> tuple[str, bool]:
    """The default CAM layer of ``model``, found from its structure alone (no forward pass).

    - A vision transformer (``model.blocks`` is a ``ModuleList``/``Sequential`` whose blocks hold no
      ``nn.Conv2d``): the output of ``blocks[-2]``, i.e. the input of the last block. The last
      block's own output is not used: a CLS-pooled classifier reads only the CLS token there, so
      the gradient on every patch token is exactly zero (pytorch-grad-cam picks
      ``blocks[-1].norm1`` for the same reason).
    - Otherwise the last ``nn.Conv2d`` in ``model.modules()``.

    Returns:
        ``(name, is_tokens)``: the layer's name in ``model.named_modules()`` and whether its output
        is a token sequence ``(N, T, D)``.

    Raises:
        ValueError: No such layer, naming the methods that need none; or a one-block transformer.
    """
    blocks = getattr(model, "blocks", None)
    names = {id(m): n for n, m in model.named_modules()}
    if _is_transformer_stack(blocks):
        if len(blocks) < 2:
            raise ValueError(
                f"{method}: model.blocks has a single block; the last block's output carries no "
                "gradient on the patch tokens of a CLS-pooled transformer, and there is no earlier "
                "block. Pass layer= (e.g. the block's first LayerNorm, 'blocks.0.norm1')."
            )
        return names[id(blocks[-2])], True
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1], False
    raise ValueError(
        f"{method}: no spatial layer found in {type(model).__name__}: it has no nn.Conv2d and no "
        "`blocks` of transformer blocks, so a class activation map has nothing to be drawn on. "
        "Pass layer= (a submodule whose output is (N, C, h, w) or tokens (N, T, D)), or use a "
        f"method that needs no spatial layer: {', '.join(GRADIENT_METHODS)}."
    )


def tokens_to_grid(tokens: Tensor) -> Tensor:
    """``(N, T, D)`` tokens -> ``(N, D, g, g)`` patch grid, ``g = isqrt(T)``.

    The ``T - g^2`` leading tokens (CLS, distillation or register tokens) are dropped; the rest are
    read row-major, as ``conv(x).flatten(2).transpose(1, 2)`` patch embeddings lay them out.

    Raises:
        ValueError: Not 3-D, or more leading tokens than a CLS-like prefix explains (``>= g``).
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens (N, T, D), got shape {tuple(tokens.shape)}.")
    n, t, d = tokens.shape
    g = math.isqrt(t)
    extra = t - g * g
    if g == 0 or extra >= max(g, 2):
        raise ValueError(
            f"cannot lay {t} tokens out on a square grid (isqrt={g}, {extra} leftover tokens); "
            "pass reshape= a function (N, T, D) -> (N, C, h, w)."
        )
    return tokens[:, extra:].transpose(1, 2).reshape(n, d, g, g)


def upsample(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``(N, h, w)`` maps to ``(N, *size)``."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


# ---------------------------------------------------------------------------------- shared base
class _LayerMethod(Attribution):
    """Shared: the layer(s), chunked forward/backward passes, token reshaping, upsampling."""

    signed = False

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | nn.Module | None = None,
        reshape: Reshape | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if reshape is not None and not callable(reshape):
            raise TypeError(f"reshape must be a callable (activation) -> (N, C, h, w), got {type(reshape).__name__}.")
        self.reshape = reshape
        self.layers = self._resolve(layer)

    def _resolve(self, layer: str | nn.Module | None) -> list[str]:
        if layer is None:
            name, _tokens = find_cam_layer(self.model, self.name)
            return [name]
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layer must be a submodule name or an nn.Module, got {type(layer).__name__}.")
        return list(resolve_layers(self.model, layer))

    def settings(self) -> dict[str, Any]:
        reshape = None if self.reshape is None else getattr(self.reshape, "__qualname__", type(self.reshape).__name__)
        return {"layer": self.layers[0] if len(self.layers) == 1 else self.layers, "reshape": reshape}

    def _spatial(self, t: Tensor, layer: str) -> Tensor:
        """A captured activation (or its gradient) as ``(N, C, h, w)``."""
        out = self.reshape(t) if self.reshape is not None else (tokens_to_grid(t) if t.ndim == 3 else t)
        if out.ndim != 4:
            raise ValueError(
                f"{self.name}: layer {layer!r} gives shape {tuple(t.shape)}"
                + (f" (after reshape: {tuple(out.shape)})" if self.reshape is not None else "")
                + "; CAM methods need (N, C, h, w) or tokens (N, T, D). Pass reshape= a function to "
                "(N, C, h, w), or choose another layer."
            )
        return out

    def _passes(
        self, rows: Tensor, target: Target, index: Tensor, desc: str
    ) -> Iterator[tuple[slice, dict[str, Tensor], dict[str, Tensor], Tensor]]:
        """For each chunk of rows: ``(slice, activations, gradients, target values)``; maps ``(n, C, h, w)``."""
        parts = list(chunks(rows.shape[0], self._chunk(rows)))
        for sl in progress(parts, total=len(parts), desc=f"{self.name}: {desc}", enabled=self.show_progress):
            x = rows[sl].detach().requires_grad_(True)
            with torch.enable_grad(), capture(self.model, self.layers, gradients=False, keep_graph=True) as cap:
                out = self._run(x)
                s = target(out, Batch(inputs=x, index=index[sl]))
                if s.shape != (x.shape[0],):
                    raise ValueError(f"target returned shape {tuple(s.shape)}, expected ({x.shape[0]},).")
                acts = [self._activation(cap.activations, name) for name in self.layers]
                grads = torch.autograd.grad(s.sum(), acts, allow_unused=True)
            a_out = {name: self._spatial(a.detach(), name) for name, a in zip(self.layers, acts)}
            g_out = {
                name: self._spatial(torch.zeros_like(a) if g is None else g.detach(), name)
                for name, a, g in zip(self.layers, acts, grads)
            }
            yield sl, a_out, g_out, s.detach()

    def _activation(self, activations: dict[str, Tensor], name: str) -> Tensor:
        if name not in activations:
            raise ValueError(f"{self.name}: layer {name!r} was not called in the forward pass; choose another layer.")
        a = activations[name]
        if not a.requires_grad:
            raise ValueError(
                f"{self.name}: the output of layer {name!r} is not part of the autograd graph (computed "
                "under no_grad or detached); choose another layer."
            )
        return a

    @staticmethod
    def _size(inputs: Tensor, raw: Tensor) -> tuple[int, ...]:
        """Spatial size of the attributions: the input's last two dims (images), else the raw map's."""
        return tuple(inputs.shape[-2:]) if inputs.ndim >= 3 else tuple(raw.shape[1:])


class _ChannelCAM(_LayerMethod):
    """CAMs of the form ``ReLU(sum_c w_c A_c)`` with per-row channel weights ``w`` from ``(A, G)``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | nn.Module | None = None,
        reshape: Reshape | None = None,
        relu: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(layer, str) and layer == "all":
            raise ValueError(f"{type(self).__name__} takes one layer; layer='all' is for NormGrad.")
        super().__init__(model, layer=layer, reshape=reshape, **kwargs)
        self.relu = bool(relu)
        self.signed = not self.relu

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "relu": self.relu}

    def _weights(self, acts: Tensor, grads: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(n, C)`` channel weights for one chunk, plus per-row extras."""
        raise NotImplementedError

    def _combine(self, acts: Tensor, weights: Tensor) -> Tensor:
        cam = torch.einsum("nc,nchw->nhw", weights, acts)
        return cam.clamp_min(0) if self.relu else cam

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raws, weights, extras, scores = [], [], [], []
        (layer,) = self.layers
        for _sl, acts, grads, s in self._passes(inputs, target, index, desc="layer gradients"):
            w, extra = self._weights(acts[layer], grads[layer])
            raws.append(self._combine(acts[layer], w))
            weights.append(w)
            extras.append(extra)
            scores.append(s)
        raw = torch.cat(raws)
        out = {"raw": raw, "weights": torch.cat(weights), "scores": torch.cat(scores)}
        for key in extras[0]:
            out[key] = torch.cat([e[key] for e in extras])
        return upsample(raw, self._size(inputs, raw)), out


# ---------------------------------------------------------------------------------- methods
@register("gradcam", "grad_cam")
class GradCAM(_ChannelCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatially averaged gradients.

    ``w_c = mean_ij dS/dA_cij``, map ``ReLU(sum_c w_c A_c)`` at the layer's resolution (extra tensor
    ``raw``, ``(N, h, w)``), upsampled bilinearly to the input's ``(H, W)`` (``attributions``). The
    channel weights are returned as ``weights`` ``(N, C)``.

    Args:
        model: The module to explain.
        layer: Submodule name or object; ``None`` finds one (:func:`find_cam_layer`).
        reshape: ``(activation) -> (N, C, h, w)`` for layers whose output is neither ``(N, C, h, w)``
            nor square-grid tokens ``(N, T, D)``; applied to the gradient too.
        relu: Apply the paper's ReLU to the map (False: signed map).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.

    Raises:
        ValueError: No layer given and none found (the message lists the methods that need none).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(3, 2))
        >>> a = GradCAM(net).attribute(torch.randn(2, 1, 6, 6), target=1)
        >>> a.attributions.shape, a.tensors["raw"].shape
        (torch.Size([2, 6, 6]), torch.Size([2, 6, 6]))
    """

    def _weights(self, acts: Tensor, grads: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return grads.mean(dim=(2, 3)), {}


def gradcampp_weights(acts: Tensor, m1: Tensor, m2: Tensor, m3: Tensor) -> Tensor:
    """Grad-CAM++ channel weights from the first three gradient moments (their eq. 19 and 9).

    With ``Y = exp(S)`` and a piecewise-linear network, the higher derivatives of ``Y`` are powers of
    the gradient ``g`` of ``S``, and ``alpha_cij = g^2 / (2 g^2 + (sum_ab A_cab) g^3)``; the weights
    are ``w_c = sum_ij alpha_cij ReLU(g_cij)``. ``m1, m2, m3`` are ``g, g^2, g^3`` (or their averages
    over noise samples for Smooth Grad-CAM++). Where the denominator is 0, ``alpha = 0``.
    """
    sum_a = acts.sum(dim=(2, 3), keepdim=True)
    alpha = _safe_div(m2, 2 * m2 + sum_a * m3)
    return (alpha * m1.clamp_min(0)).sum(dim=(2, 3))


@register("gradcam_plus_plus", "gradcampp", "gradcam_pp", "grad_cam_plus_plus")
class GradCAMPlusPlus(_ChannelCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018): pixel-weighted positive gradients.

    ``alpha_cij = g_cij^2 / (2 g_cij^2 + sum_ab A_cab g_cij^3)`` (the closed form under the
    exponential assumption, as in the paper's eq. 19 and pytorch-grad-cam, with ``alpha = 0`` where
    the denominator vanishes instead of an ``eps``), ``w_c = sum_ij alpha_cij ReLU(g_cij)``, map
    ``ReLU(sum_c w_c A_c)``. Arguments and outputs as :class:`GradCAM`.
    """

    def _weights(self, acts: Tensor, grads: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        g2 = grads * grads
        return gradcampp_weights(acts, grads, g2, g2 * grads), {}


@register("smooth_gradcam_plus_plus", "smooth_gradcampp", "smooth_gradcam_pp", "smoothgradcampp")
class SmoothGradCAMPlusPlus(_ChannelCAM):
    """Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ on gradient moments averaged over noise.

    For each example, ``n_samples`` noisy copies ``x + N(0, sigma^2)`` are drawn (``sigma`` is
    ``noise_level`` times the example's value range, as SmoothGrad, or the absolute ``sigma=``); the
    layer gradients ``g`` of the copies give the moments ``mean g, mean g^2, mean g^3``, which enter
    the Grad-CAM++ formula (:func:`gradcampp_weights`) together with the activation of the *clean*
    input, whose map is drawn. Noise samples are rows of one expanded batch, chunked under the budget.
    With ``n_samples=1`` and no noise this is Grad-CAM++.

    Args:
        model: The module to explain.
        layer, reshape, relu: As :class:`GradCAM`.
        n_samples: Noisy copies per example.
        noise_level: Noise standard deviation relative to each example's range ``max - min``.
        sigma: Absolute standard deviation instead of ``noise_level``.
        seed: Seed of the noise (drawn on a CPU generator: same numbers on every device).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | nn.Module | None = None,
        reshape: Reshape | None = None,
        relu: bool = True,
        n_samples: int = 50,
        noise_level: float = 0.15,
        sigma: float | None = None,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layer=layer, reshape=reshape, relu=relu, **kwargs)
        check_positive_int(n_samples, "n_samples")
        if isinstance(noise_level, bool) or not (isinstance(noise_level, (int, float)) and noise_level >= 0):
            raise ValueError(f"noise_level must be a number >= 0, got {noise_level!r}.")
        if sigma is not None and (isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and sigma >= 0)):
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}.")
        self.n_samples, self.noise_level, self.sigma, self.seed = n_samples, float(noise_level), sigma, seed

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "n_samples": self.n_samples,
            "noise_level": None if self.sigma is not None else self.noise_level,
            "sigma": self.sigma,
        }

    def _clean_activations(self, inputs: Tensor) -> Tensor:
        (layer,) = self.layers
        out = []
        for sl in chunks(inputs.shape[0], self._chunk(inputs)):
            with torch.no_grad(), capture(self.model, layer, gradients=False) as cap:
                self._run(inputs[sl])
            if layer not in cap.activations:
                raise ValueError(f"{self.name}: layer {layer!r} was not called in the forward pass.")
            out.append(self._spatial(cap.activations[layer], layer))
        return torch.cat(out)

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n, s = inputs.shape[0], self.n_samples
        rows = noisy_rows(inputs, s, noise_level=self.noise_level, sigma=self.sigma, seed=self.seed)
        local = torch.arange(s * n, device=inputs.device) % n  # the example (of this call) each row is
        (layer,) = self.layers
        moments: list[Tensor] = []
        for sl, _acts, grads, _s in self._passes(rows, target, index.repeat(s), desc=f"{s} noise samples"):
            gr = grads[layer]
            if not moments:
                moments = [torch.zeros((n, *gr.shape[1:]), dtype=gr.dtype, device=gr.device) for _ in range(3)]
            g2 = gr * gr
            for m, power in zip(moments, (gr, g2, g2 * gr)):
                m.index_add_(0, local[sl], power)
        m1, m2, m3 = (m / s for m in moments)
        acts = self._clean_activations(inputs)
        w = gradcampp_weights(acts, m1, m2, m3)
        raw = self._combine(acts, w)
        return upsample(raw, self._size(inputs, raw)), {"raw": raw, "weights": w}


@register("normgrad", "norm_grad")
class NormGrad(_LayerMethod):
    """NormGrad (Rebuffi et al. 2020): ``||A_ij|| * ||G_ij||`` per location, norms over channels.

    This is the Frobenius norm of the weight gradient of a virtual 1x1 identity convolution
    inserted after the layer (the gradient is the outer product ``G_ij A_ij^T``). With
    ``layer="all"`` the maps of every ``nn.Conv2d`` are upsampled to the input size and summed
    (extra tensor ``per_layer``, ``(N, L, H, W)``); with one layer, ``raw`` is the ``(N, h, w)`` map.

    Args:
        model: The module to explain.
        layer: Submodule name or object, ``"all"``, or ``None`` (:func:`find_cam_layer`).
        reshape: As :class:`GradCAM`.
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.
    """

    def _resolve(self, layer: str | nn.Module | None) -> list[str]:
        if isinstance(layer, str) and layer == "all":
            convs = [n for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                find_cam_layer(self.model, self.name)  # raises the no-spatial-layer error for a convless model
                raise ValueError(f"{self.name}: layer='all' needs nn.Conv2d layers; {type(self.model).__name__} has none.")
            return convs
        return super()._resolve(layer)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layers": len(self.layers)}

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        per_layer: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        for _sl, acts, grads, _s in self._passes(inputs, target, index, desc="layer gradients"):
            for name in self.layers:
                per_layer[name].append(acts[name].norm(dim=1) * grads[name].norm(dim=1))
        raws = {name: torch.cat(v) for name, v in per_layer.items()}
        if len(self.layers) == 1:
            raw = raws[self.layers[0]]
            return upsample(raw, self._size(inputs, raw)), {"raw": raw}
        size = tuple(inputs.shape[-2:]) if inputs.ndim >= 3 else None
        if size is None:
            raise ValueError(f"{self.name}: layer='all' needs image inputs (N, C, H, W) to upsample to.")
        stacked = torch.stack([upsample(raws[name], size) for name in self.layers], dim=1)
        return stacked.sum(1), {"per_layer": stacked}


@register("cfcam", "cf_cam")
class CFCAM(_ChannelCAM):
    """CF-CAM (He, Pan & Yao 2025): Grad-CAM with DBSCAN channel clustering and Gaussian-filtered gradients.

    The recipe, per example, at the layer's ``A, G`` of shape ``(C, h, w)``:

    1. Grad-CAM weights ``a_c = mean_ij G_cij``; gradient-weighted features ``F_c = a_c A_c``
       (flattened to ``h*w``), each channel's term in the Grad-CAM sum.
    2. Hierarchical importance: channels with ``||F_c||_2 >=`` the ``keep_quantile`` quantile of
       these norms are *key* channels and keep their weight ``a_c`` (``keep_quantile=None``: none).
    3. The other channels are clustered with scikit-learn's ``DBSCAN(eps, min_samples)`` on the rows
       ``F_c`` (Euclidean distances from ``scipy.spatial.distance.pdist``, passed precomputed, so
       identical channels are exactly 0 apart). ``eps="auto"``: the ``eps_quantile`` quantile of their pairwise
       distances (at least a tiny positive number); ``min_samples=None``: ``max(2, ceil(0.05 C'))``
       for ``C'`` clustered channels (the authors' adaptive choices). Noise channels (label -1)
       get weight 0: they are dropped.
    4. Cluster-conditioned filtering: for each cluster, the mean gradient of its channels (``h x w``)
       is smoothed with ``scipy.ndimage.gaussian_filter(sigma, mode="nearest")`` and every member's
       weight is the spatial mean of that filtered gradient.
    5. Map ``ReLU(sum_c w_c A_c)`` (the Grad-CAM combination; the authors' code applies a softmax
       over the weights first, which we do not), upsampled as :class:`GradCAM`.

    Extra tensors: ``raw``, ``weights`` ``(N, C)`` and ``clusters`` ``(N, C)`` int64 labels (-2 key
    channel, -1 dropped noise channel, ``k >= 0`` DBSCAN cluster). DBSCAN runs per example on the
    CPU (a Python loop over rows); everything else is batched. Deterministic (DBSCAN is).

    Args:
        model: The module to explain.
        layer, reshape, relu: As :class:`GradCAM`.
        keep_quantile: Quantile of channel importance above which channels skip clustering.
        eps: DBSCAN neighbourhood radius, or ``"auto"``.
        eps_quantile: Quantile of pairwise distances used by ``eps="auto"``.
        min_samples: DBSCAN core-point size, or ``None`` (adaptive).
        sigma: Gaussian filter width in layer pixels (0: no filtering).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: str | nn.Module | None = None,
        reshape: Reshape | None = None,
        relu: bool = True,
        keep_quantile: float | None = 0.75,
        eps: float | str = "auto",
        eps_quantile: float = 0.25,
        min_samples: int | None = None,
        sigma: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, layer=layer, reshape=reshape, relu=relu, **kwargs)
        if keep_quantile is not None and not (_is_number(keep_quantile) and 0 <= keep_quantile <= 1):
            raise ValueError(f"keep_quantile must be in [0, 1] or None, got {keep_quantile!r}.")
        if not (eps == "auto" or (_is_number(eps) and eps > 0)):
            raise ValueError(f"eps must be a positive number or 'auto', got {eps!r}.")
        if not (_is_number(eps_quantile) and 0 <= eps_quantile <= 1):
            raise ValueError(f"eps_quantile must be in [0, 1], got {eps_quantile!r}.")
        if min_samples is not None:
            check_positive_int(min_samples, "min_samples")
        if not (_is_number(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}.")
        self.keep_quantile, self.eps, self.eps_quantile = keep_quantile, eps, float(eps_quantile)
        self.min_samples, self.sigma = min_samples, float(sigma)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "keep_quantile": self.keep_quantile,
            "eps": self.eps,
            "eps_quantile": self.eps_quantile,
            "min_samples": self.min_samples,
            "sigma": self.sigma,
        }

    def _weights(self, acts: Tensor, grads: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        a = grads.mean(dim=(2, 3))
        feats = (a[:, :, None, None] * acts).flatten(2)
        rows_w, rows_l = [], []
        for i in range(acts.shape[0]):
            w, labels = self._row(a[i], feats[i], grads[i])
            rows_w.append(w)
            rows_l.append(labels)
        weights = torch.as_tensor(np.stack(rows_w), dtype=acts.dtype, device=acts.device)
        clusters = torch.as_tensor(np.stack(rows_l), dtype=torch.long, device=acts.device)
        return weights, {"clusters": clusters}

    def _row(self, a: Tensor, feats: Tensor, grads: Tensor) -> tuple[np.ndarray, np.ndarray]:
        from scipy.ndimage import gaussian_filter
        from scipy.spatial.distance import pdist, squareform
        from sklearn.cluster import DBSCAN

        a_np = a.detach().cpu().double().numpy()
        f_np = feats.detach().cpu().double().numpy()
        g_np = grads.detach().cpu().double().numpy()
        c = a_np.shape[0]
        labels = np.full(c, -1, dtype=np.int64)
        weights = np.zeros(c, dtype=np.float64)
        norms = np.linalg.norm(f_np, axis=1)
        key = np.zeros(c, dtype=bool) if self.keep_quantile is None else norms >= np.quantile(norms, self.keep_quantile)
        labels[key] = -2
        weights[key] = a_np[key]
        rest = np.flatnonzero(~key)
        if rest.size == 0:
            return weights, labels
        dist = pdist(f_np[rest]) if rest.size > 1 else np.zeros(0)
        floor = np.finfo(np.float64).eps * max(1.0, float(dist.max()) if dist.size else 1.0)
        if self.eps == "auto":
            eps = max(float(np.quantile(dist, self.eps_quantile)) if dist.size else 0.0, floor)
        else:
            eps = float(self.eps)
        min_samples = self.min_samples or max(2, math.ceil(0.05 * rest.size))
        square = squareform(dist) if rest.size > 1 else np.zeros((1, 1))  # exact: identical rows are at 0
        found = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit(square).labels_
        labels[rest] = found
        for k in np.unique(found[found >= 0]):
            members = rest[found == k]
            mean_grad = g_np[members].mean(axis=0)
            smooth = gaussian_filter(mean_grad, sigma=self.sigma, mode="nearest") if self.sigma > 0 else mean_grad
            weights[members] = smooth.mean()
        return weights, labels


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
