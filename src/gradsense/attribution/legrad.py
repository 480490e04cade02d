"""LeGrad: which patches the formation of a vision transformer's features is sensitive to.

LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, "LeGrad: An Explainability Method
for Vision Transformers via Feature Formation Sensitivity", arXiv:2404.03214, ICCV 2025) reads the
gradient of a class score with respect to the attention maps, layer by layer (the paper's method
section; step names here, symbols as in the paper):

1. **Per-layer score** ("feature formation" at block ``l``): the block's output tokens ``Z^l`` are
   pooled into one feature, mapped to class scores by the model's final norm and head,
   ``y^l = head(norm(pool(Z^l)))``, and the target picks ``s^l`` from ``y^l``.
2. **Per-layer map**: ``grad A^l = d s^l / d A^l`` for the softmaxed attention maps ``A^l`` of block
   ``l`` (``heads x T x T``); negative entries are dropped (ReLU) and the rest averaged over heads
   and over all query rows, ``E^l_j = mean_{h,i} ReLU(grad A^l)_{h,i,j}``, one value per key token.
3. **Merged map**: ``E = mean_l E^l`` over the chosen layers; the [CLS] column is dropped, the rest
   laid out on the patch grid, min-max normalised per example and upsampled (bilinear,
   ``align_corners=False``) to the input's size.

Steps 2-3 are the authors' reference code (github.com/WalBouss/LeGrad, ``legrad/wrapper.py``,
``compute_legrad_clip``): ``clamp(grad, min=0).mean(heads).mean(queries)[:, 1:]`` per layer,
``F.interpolate(..., mode='bilinear')``, summed over layers, min-max per map. Documented choices:

- **Pooling.** The paper and the reference code pool the mean of all ``n + 1`` tokens (CLS
  included; ``ln_post(feat.mean(0)) @ proj``) at every layer. For a CLS classifier (the zoo TinyViT,
  Hugging Face ``ViTForImageClassification``) the head was trained on the [CLS] token, so the default
  here is ``pool="cls"``: then ``s^L`` is exactly the model's explained score (checked at run time).
  ``pool="mean"`` gives the paper's pooling. With CLS pooling only the CLS query row of
  ``grad A^l`` is non-zero (MLP and norms act per token), so the mean over query rows is that row
  divided by ``T``; the normalised map is the same either way.
- Layers are averaged, not summed, and upsampling follows the layer average; upsampling is linear
  and min-max normalisation removes scale, so the result equals the reference's order.
- A constant map (every gradient zero) becomes zeros instead of the reference's 0/0 = NaN.
- ``layers="all"`` (the paper's aggregation) is the default; the reference OpenCLIP wrapper's
  default ``layer_index=-2`` (the last two blocks) is ``layers=[-2, -1]``.

Supported models (found from the structure alone, before any forward pass):

- **gradsense zoo layout** (:class:`gradsense.zoo.models.TinyViT`): ``model.blocks`` (a
  ``ModuleList``/``Sequential``), each block holding exactly one submodule named ``*attn_map`` whose
  output is the softmaxed attention ``(B, heads, T, T)``; ``model.norm`` and ``model.head`` applied
  to the [CLS] token. Block outputs and attention maps are read with
  :func:`gradsense.core.hooks.capture` (``keep_graph=True``), hooks removed on exit.
- **Hugging Face** ``ViTForImageClassification`` with ``attn_implementation="eager"``: attention
  probabilities from ``output_attentions=True``, block outputs from ``output_hidden_states=True``,
  ``vit.layernorm`` + ``classifier`` as the head. transformers >= 5 installs output-capturing forward
  hooks on first use of those flags and marks the model; both are undone after every call.

Any other model raises ``ValueError`` in the constructor, naming the methods that apply instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradsense.attribution.base import Attribution, register
from gradsense.core.batching import chunks, progress
from gradsense.core.functional import ModelState
from gradsense.core.hooks import capture
from gradsense.core.targets import Batch, Target, _output_tensor

__all__ = ["NON_VIT_METHODS", "LeGrad", "ViTStructure", "find_vit_structure"]

#: Registered methods that need no attention maps (named in the error for models LeGrad cannot read).
NON_VIT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam")

Pool = Literal["cls", "mean"]
_HF_FLAG = "_output_capturing_hooks_installed"  # transformers >= 5 marks a model whose capture hooks exist
_MISSING = object()


# ---------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class ViTStructure:
    """What LeGrad reads from a vision transformer.

    Attributes:
        kind: ``"zoo"`` (``blocks``/``norm``/``head`` with ``*attn_map`` modules) or ``"hf-vit"``.
        n_layers: Number of transformer blocks.
        norm: The final norm applied to the pooled token.
        head: The classification head.
        block_names: ``named_modules`` names of the blocks (zoo layout; empty for Hugging Face).
        attn_names: Names of the ``*attn_map`` modules, one per block (zoo layout).
        patch_size: ``(ph, pw)`` when the model declares it, else ``None`` (square grid assumed).
    """

    kind: Literal["zoo", "hf-vit"]
    n_layers: int
    norm: nn.Module
    head: nn.Module
    block_names: tuple[str, ...] = ()
    attn_names: tuple[str, ...] = ()
    patch_size: tuple[int, int] | None = None


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _not_a_vit(model: nn.Module, method: str, why: str) -> ValueError:
    return ValueError(
        f"{method}: {type(model).__name__} is not a vision transformer LeGrad can read ({why}). LeGrad "
        "needs either the gradsense zoo layout - `blocks` (ModuleList of blocks, each with one submodule "
        "named '*attn_map' that outputs the softmaxed attention (B, heads, T, T)), `norm` and `head` on the "
        "[CLS] token - or a Hugging Face ViTForImageClassification loaded with attn_implementation='eager'. "
        f"Methods that need no attention maps: {', '.join(NON_VIT_METHODS)}."
    )


def _hf_structure(model: nn.Module, method: str) -> ViTStructure:
    config = model.config  # type: ignore[union-attr]
    vit = getattr(model, "vit", None)
    norm = getattr(vit, "layernorm", None)
    head = getattr(model, "classifier", None)
    if not (isinstance(vit, nn.Module) and isinstance(norm, nn.Module) and isinstance(head, nn.Module)):
        raise _not_a_vit(
            model,
            method,
            "a Hugging Face 'vit' model without a classification head: LeGrad needs vit.layernorm and "
            "classifier, as in ViTForImageClassification",
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        raise ValueError(
            f"{method}: this Hugging Face ViT uses attn_implementation={impl!r}, which does not return "
            "attention probabilities. Load it with attn_implementation='eager' (e.g. "
            "ViTForImageClassification.from_pretrained(name, attn_implementation='eager')) or call "
            "model.set_attn_implementation('eager') first."
        )
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise _not_a_vit(model, method, "its config has no positive num_hidden_layers")
    return ViTStructure("hf-vit", n_layers, norm, head, patch_size=_pair(getattr(config, "patch_size", None)))


def find_vit_structure(model: nn.Module, method: str = "legrad") -> ViTStructure:
    """Find the blocks, attention maps, final norm and head of a vision transformer, without running it.

    Args:
        model: The module.
        method: Method name used in error messages.

    Returns:
        A :class:`ViTStructure`.

    Raises:
        ValueError: Not a supported vision transformer (the message says why and names the methods
            that need no attention maps), or a Hugging Face ViT whose attention implementation does not
            return attention probabilities.

    Example:
        >>> from gradsense.zoo.models import TinyViT
        >>> s = find_vit_structure(TinyViT(depth=2))
        >>> s.kind, s.n_layers, s.attn_names
        ('zoo', 2, ('blocks.0.attn.attn_map', 'blocks.1.attn.attn_map'))
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "vit":
        return _hf_structure(model, method)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise _not_a_vit(model, method, "it has no `blocks` ModuleList of transformer blocks")
    norm, head = getattr(model, "norm", None), getattr(model, "head", None)
    if not (isinstance(norm, nn.Module) and isinstance(head, nn.Module)):
        raise _not_a_vit(model, method, "it has `blocks` but no `norm` and `head` modules")
    names = {id(m): n for n, m in model.named_modules()}
    block_names, attn_names = [], []
    for i, block in enumerate(blocks):
        maps = [n for n, _ in block.named_modules() if n.split(".")[-1].endswith("attn_map")]
        if len(maps) != 1:
            raise _not_a_vit(
                model,
                method,
                f"block {i} has {len(maps)} submodules named '*attn_map' ({maps[:4]}), expected exactly one "
                "whose output is the softmaxed attention",
            )
        block_names.append(names[id(block)])
        attn_names.append(f"{names[id(block)]}.{maps[0]}")
    patch = _pair(getattr(model, "patch_size", None))
    if patch is None and isinstance(getattr(model, "patch_embed", None), nn.Conv2d):
        patch = _pair(tuple(model.patch_embed.stride))  # type: ignore[union-attr]
    return ViTStructure("zoo", len(blocks), norm, head, tuple(block_names), tuple(attn_names), patch)


@contextmanager
def _undo_hf_capture_hooks(model: nn.Module) -> Iterator[None]:
    """Remove the forward hooks transformers (>= 5) installs lazily for ``output_attentions`` /
    ``output_hidden_states``, and its "hooks installed" mark, when the block exits (also on error).

    Removing the hooks without the mark would leave a model that silently stops returning attentions.
    """
    marks = {name: m.__dict__.get(_HF_FLAG, _MISSING) for name, m in model.named_modules()}
    state = ModelState.capture(model)
    try:
        yield
    finally:
        state.restore()
        for name, m in model.named_modules():
            before = marks.get(name, _MISSING)
            if before is _MISSING:
                m.__dict__.pop(_HF_FLAG, None)
            else:
                m.__dict__[_HF_FLAG] = before


def _minmax(maps: Tensor) -> Tensor:
    """Per-row min-max normalisation over all but the first dim; constant rows become 0."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    ok = span > 0
    out = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(maps.shape)


# ---------------------------------------------------------------------------------- the method
@register("legrad", "le_grad")
class LeGrad(Attribution):
    """LeGrad (Bousselham et al. 2024): layer-wise gradients w.r.t. a ViT's attention maps.

    For each chosen block ``l``: the pooled token after the block through the model's final norm and
    head gives the score ``s^l`` (the target applied to those intermediate logits); the map of the
    layer is ``mean over heads and query rows of ReLU(d s^l / d A^l)`` over the patch (key) tokens.
    The maps are averaged over layers, min-max normalised per example on the patch grid (extra tensor
    ``raw``, ``(N, gh, gw)``) and upsampled bilinearly to the input's ``(H, W)`` (``attributions``,
    min-max normalised again, which the linear upsampling leaves as the upsampled ``raw``). The
    un-normalised per-layer maps are returned as ``per_layer`` ``(N, L, gh, gw)``. Unsigned, in [0, 1].

    Args:
        model: A vision transformer (see :func:`find_vit_structure`; the module docstring lists the
            supported layouts).
        layers: Block indices whose maps are merged (negative counts from the end), one int, or
            ``"all"`` (the paper's default).
        upsample: Upsample to the input's spatial size (False: ``attributions`` is the ``(N, gh, gw)``
            grid map, equal to ``raw``).
        pool: Which feature is scored after each block: ``"cls"`` (the [CLS] token, as the model's own
            classifier reads it; the default) or ``"mean"`` (the mean over all tokens, CLS included:
            the paper's and the reference code's pooling).
        **kwargs: See :class:`~gradsense.attribution.base.Attribution` (``chunk_size``, ``max_memory``,
            ``forward`` - the last not for Hugging Face models, which are called with extra flags).

    Raises:
        ValueError: Not a supported ViT (before any forward pass; the message names the methods that
            apply instead), bad ``layers``/``pool``, or a Hugging Face ViT without eager attention.

    Example:
        >>> vit = gs.zoo.load("digits-vit")  # doctest: +SKIP
        >>> x, y = gs.zoo.dataset("digits", split="test")[:4]  # doctest: +SKIP
        >>> a = LeGrad(vit).attribute(x, y)  # doctest: +SKIP
        >>> a.attributions.shape, a.tensors["raw"].shape  # doctest: +SKIP
        (torch.Size([4, 8, 8]), torch.Size([4, 4, 4]))
    """

    signed = False

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: int | Sequence[int] | str = "all",
        upsample: bool = True,
        pool: Pool = "cls",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.structure = find_vit_structure(self.model, self.name)
        if self.structure.kind == "hf-vit" and self.forward is not None:
            raise ValueError(
                f"{self.name}: forward= is not supported for Hugging Face models; LeGrad calls the model "
                "itself with output_attentions=True and output_hidden_states=True."
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}.")
        if not isinstance(upsample, bool):
            raise TypeError(f"upsample must be a bool, got {type(upsample).__name__}.")
        self.layer_ids = self._resolve_layers(layers)
        self.upsample, self.pool = upsample, pool

    def _resolve_layers(self, layers: int | Sequence[int] | str) -> list[int]:
        n = self.structure.n_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be 'all', an int or a sequence of ints, got {layers!r}.")
            return list(range(n))
        items = [layers] if isinstance(layers, int) else list(layers) if isinstance(layers, Sequence) else None
        if items is None or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
            raise TypeError(f"layers must be 'all', an int or a sequence of ints, got {layers!r}.")
        if not items:
            raise ValueError("layers is empty: give at least one block index, or 'all'.")
        bad = [i for i in items if not -n <= i < n]
        if bad:
            raise ValueError(f"layer indices {bad} out of range for a model with {n} blocks (valid: {-n}..{n - 1}).")
        resolved = [i % n for i in items]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"layers {items} name the same block twice (as indices {resolved}).")
        return sorted(resolved)

    def settings(self) -> dict[str, Any]:
        return {
            "layers": "all" if len(self.layer_ids) == self.structure.n_layers else self.layer_ids,
            "upsample": self.upsample,
            "pool": self.pool,
            "architecture": self.structure.kind,
        }

    def _check(self, inputs: Tensor) -> None:
        """Images ``(N, C, H, W)`` whose sides are multiples of the patch size, before any forward."""
        if inputs.ndim != 4:
            raise ValueError(
                f"{self.name}: expected images (N, C, H, W) for a vision transformer, got shape {tuple(inputs.shape)}."
            )
        patch = self.structure.patch_size
        if patch is not None and (inputs.shape[-2] % patch[0] or inputs.shape[-1] % patch[1]):
            raise ValueError(
                f"{self.name}: image size {tuple(inputs.shape[-2:])} is not a multiple of the patch size {patch}."
            )

    # ------------------------------------------------------------------------------ model adapters
    def _forward_layers(self, x: Tensor) -> tuple[Any, list[Tensor], list[Tensor]]:
        """One forward pass: ``(model output, block outputs (n, T, D), attention maps (n, h, T, T))``,
        all attached to the autograd graph."""
        s = self.structure
        if s.kind == "hf-vit":
            out = self.model(x, output_attentions=True, output_hidden_states=True, return_dict=True)
            hidden, attns = getattr(out, "hidden_states", None), getattr(out, "attentions", None)
            if hidden is None or attns is None or len(attns) != s.n_layers or len(hidden) != s.n_layers + 1:
                raise ValueError(
                    f"{self.name}: the Hugging Face model returned {0 if attns is None else len(attns)} attention "
                    f"maps and {0 if hidden is None else len(hidden)} hidden states for {s.n_layers} layers "
                    f"(expected {s.n_layers} and {s.n_layers + 1}); load it with attn_implementation='eager'."
                )
            return out, list(hidden[1:]), list(attns)
        with capture(self.model, list(s.block_names + s.attn_names), gradients=False, keep_graph=True) as cap:
            out = self._run(x)
        missing = [n for n in s.block_names + s.attn_names if n not in cap.activations]
        if missing:
            raise ValueError(f"{self.name}: modules {missing[:4]} were not called in the forward pass.")
        return out, [cap.activations[n] for n in s.block_names], [cap.activations[n] for n in s.attn_names]

    def _scores(self, tokens: Tensor) -> Tensor:
        """Intermediate logits ``head(norm(pooled token))`` of one block's output ``(n, T, D)``."""
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(1)
        return self.structure.head(self.structure.norm(pooled))

    def _grid(self, inputs: Tensor, n_tokens: int) -> tuple[int, int, int]:
        """``(prefix tokens, gh, gw)`` for ``n_tokens`` tokens of an input batch."""
        patch = self.structure.patch_size
        if patch is not None and inputs.ndim == 4:
            gh, gw = inputs.shape[-2] // patch[0], inputs.shape[-1] // patch[1]
            if 1 <= n_tokens - gh * gw:
                return n_tokens - gh * gw, gh, gw
        g = math.isqrt(n_tokens - 1)
        if g * g != n_tokens - 1 or g == 0:
            raise ValueError(
                f"{self.name}: cannot lay {n_tokens} tokens out as [CLS] + a patch grid for inputs of shape "
                f"{tuple(inputs.shape)}."
            )
        return 1, g, g

    def _check_attention(self, attn: Tensor, tokens: Tensor, layer: int) -> None:
        n, t = tokens.shape[0], tokens.shape[1]
        if attn.ndim != 4 or attn.shape[0] != n or attn.shape[2:] != (t, t):
            raise ValueError(
                f"{self.name}: the attention map of block {layer} has shape {tuple(attn.shape)}; expected "
                f"(batch={n}, heads, {t}, {t}), the softmaxed attention over the block's {t} tokens."
            )
        if not attn.requires_grad:
            raise ValueError(
                f"{self.name}: the attention map of block {layer} is not part of the autograd graph (computed "
                "under no_grad or detached), so its gradient cannot be taken."
            )

    def _check_head(self, out: Any, tokens: Tensor) -> None:
        """With CLS pooling, ``head(norm(CLS of the last block))`` must be the model's output."""
        try:
            logits = _output_tensor(out)
        except TypeError:
            return
        with torch.no_grad():
            ours = self._scores(tokens)
            if ours.shape != logits.shape:
                return
            scale = float(logits.abs().max()) + 1.0
            if torch.allclose(ours, logits, rtol=1e-4, atol=1e-5 * scale):
                return
            pooled = self.structure.head(self.structure.norm(tokens.mean(1)))
        hint = " The output matches mean pooling: pass pool='mean'." if torch.allclose(
            pooled, logits, rtol=1e-4, atol=1e-5 * scale
        ) else ""
        raise ValueError(
            f"{self.name}: the model's output is not head(norm([CLS] token of the last block)), so the "
            f"per-layer scores would not be the scores the model computes.{hint}"
        )

    # ------------------------------------------------------------------------------ computation
    def _layer_maps(self, x: Tensor, target: Target, index: Tensor) -> tuple[Tensor, int]:
        """``(per-layer maps over all T key tokens (n, L, T), number of tokens T)`` for one chunk."""
        x = x.detach().requires_grad_(True)  # keeps the graph when the caller froze the parameters
        out, tokens, attns = self._forward_layers(x)
        for layer in self.layer_ids:
            self._check_attention(attns[layer], tokens[layer], layer)
        if self.pool == "cls":
            self._check_head(out, tokens[-1])
        maps = []
        for layer in self.layer_ids:
            s = target(self._scores(tokens[layer]), Batch(inputs=x, index=index))
            if s.shape != (x.shape[0],):
                raise ValueError(f"target returned shape {tuple(s.shape)}, expected ({x.shape[0]},).")
            (g,) = torch.autograd.grad(s.sum(), attns[layer], retain_graph=True, allow_unused=True)
            g = torch.zeros_like(attns[layer]) if g is None else g.detach()
            maps.append(g.clamp_min(0).mean(dim=(1, 2)))  # ReLU, mean over heads and query rows -> (n, T)
        return torch.stack(maps, dim=1), tokens[0].shape[1]

    def _compute(
        self, inputs: Tensor, target: Target, index: Tensor, n_examples: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts = list(chunks(inputs.shape[0], self._chunk(inputs)))
        scope = _undo_hf_capture_hooks(self.model) if self.structure.kind == "hf-vit" else nullcontext()
        outs: list[Tensor] = []
        n_tokens = 0
        with scope, torch.enable_grad():
            for sl in progress(parts, total=len(parts), desc=f"{self.name}: layer gradients", enabled=self.show_progress):
                maps, n_tokens = self._layer_maps(inputs[sl], target, index[sl])
                outs.append(maps)
        per_layer_tokens = torch.cat(outs)  # (N, L, T)
        prefix, gh, gw = self._grid(inputs, n_tokens)
        per_layer = per_layer_tokens[:, :, prefix:].reshape(inputs.shape[0], len(self.layer_ids), gh, gw)
        merged = per_layer.mean(1)
        raw = _minmax(merged)
        if self.upsample and inputs.ndim == 4 and tuple(inputs.shape[-2:]) != (gh, gw):
            up = F.interpolate(merged.unsqueeze(1), size=tuple(inputs.shape[-2:]), mode="bilinear", align_corners=False)
            attributions = _minmax(up.squeeze(1))
        else:
            attributions = raw
        return attributions, {"raw": raw, "per_layer": per_layer}
