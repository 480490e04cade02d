"""Masks or bit widths -> a pruned or fake-quantised *copy* of the model (the caller's model is not touched).

``apply(model, masks)`` multiplies each masked parameter of a deep copy by its mask; ``apply(model, bits)``
replaces each named tensor of the copy by :func:`gradsense.importance.bits.quantize` at its bit width. With
``compact=True`` a channel-pruned plain chain (an ``nn.Sequential`` of ``Linear``/``Conv``/``BatchNorm`` layers,
activations that map 0 to 0, pooling, ``Flatten``, ``Dropout``; nested ``nn.Sequential`` are flattened) is
rebuilt with the removed channels gone, so it is smaller and computes the same function as the masked copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gradsense.core.functional import check_model
from gradsense.importance.bits import check_bits, quantize

__all__ = ["apply", "as_change", "new_values"]

_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardtanh, nn.ELU, nn.Identity,
                    nn.Dropout, nn.modules.dropout._DropoutNd, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Hardswish,
                    nn.Mish, nn.Softsign)


def as_change(model: nn.Module, change: Any) -> tuple[str, dict[str, Any]]:
    """``("masks", {name: bool tensor})`` or ``("bits", {name: int})`` from a result or a plain dict.

    Raises:
        TypeError: Not a mapping of masks or of bit widths.
        ValueError: Unknown parameter names, masks of the wrong shape, bit widths outside 2..16.
    """
    if not isinstance(change, Mapping) or not change:
        raise TypeError(
            "expected masks ({name: bool tensor}, e.g. result.prune(...)) or bit widths ({name: int}, e.g. "
            f"result.allocate_bits(...)); got {type(change).__name__}{' (empty)' if isinstance(change, Mapping) else ''}."
        )
    params = dict(model.named_parameters())
    unknown = [k for k in change if k not in params]
    if unknown:
        raise ValueError(f"{unknown[:4]} are not parameters of {type(model).__name__} "
                         f"(it has e.g. {list(params)[:4]}).")
    values = list(change.values())
    if all(isinstance(v, Tensor) for v in values):
        out = {}
        for k, v in change.items():
            if v.dtype != torch.bool:
                raise TypeError(f"mask of {k!r} must be a bool tensor (True = keep), got dtype {v.dtype}.")
            if v.shape != params[k].shape:
                raise ValueError(f"mask of {k!r} has shape {tuple(v.shape)}, the parameter {tuple(params[k].shape)}.")
            out[k] = v
        return "masks", out
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "bits", {k: check_bits(v, f"bits of {k!r}") for k, v in change.items()}
    raise TypeError("expected masks (bool tensors) or bit widths (ints), not a mixture; got value types "
                    f"{sorted({type(v).__name__ for v in values})}.")


def new_values(kind: str, change: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The changed parameter values: ``w * mask`` or ``quantize(w, bits)``."""
    if kind == "masks":
        return {k: params[k].detach() * change[k].to(params[k].device) for k in change}
    return {k: quantize(params[k].detach(), int(change[k])) for k in change}


def apply(model: nn.Module, change: Any, *, compact: bool = False) -> nn.Module:
    """A pruned or fake-quantised copy of ``model``; ``model`` itself is left exactly as it is.

    Args:
        model: The module.
        change: Masks (``{name: bool tensor}``, ``True`` = keep; e.g. ``result.prune(0.5)``) or bit widths
            (``{name: int}``; e.g. ``result.allocate_bits(4)``).
        compact: Also remove pruned channels (masks whose whole output rows are off, with their bias and
            following BatchNorm entries) from a plain ``nn.Sequential`` chain, giving a smaller model.

    Returns:
        The new module (a deep copy; same mode, device and dtype).

    Raises:
        TypeError, ValueError: Bad ``change`` (see :func:`as_change`), or ``compact=True`` for bits or for a model
            that is not a plain chain.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> pruned = apply(net, {"0.weight": torch.tensor([[True] * 4, [False] * 4, [True] * 4]),
        ...                      "0.bias": torch.tensor([True, False, True])}, compact=True)
        >>> pruned[0].out_features, pruned[2].in_features, net[0].out_features
        (2, 2, 3)
    """
    check_model(model)
    kind, values = as_change(model, change)
    if compact and kind != "masks":
        raise ValueError("compact=True removes pruned channels; it needs masks, not bit widths.")
    if compact:
        _check_chain(model)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    new = new_values(kind, values, params)
    with torch.no_grad():
        for k, v in new.items():
            params[k].copy_(v)
    if compact:
        out = _compact(out, values)
    return out


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    items: list[tuple[str, nn.Module]] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            items.extend((f"{name}.{n}", c) for n, c in _chain(m))
        else:
            items.append((name, m))
    return items


def _check_chain(model: nn.Module) -> None:
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"compact=True rebuilds plain nn.Sequential chains of Conv/Linear layers; {type(model).__name__} is not "
            "one. Use compact=False (the masked copy computes the same function)."
        )
    for name, m in _chain(model):
        ok = isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.modules.batchnorm._BatchNorm, *_ZERO_PRESERVING))
        if not ok or (isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1):
            raise ValueError(
                f"compact=True: layer {name!r} ({type(m).__name__}) is not supported in a chain (Linear, Conv1d/2d "
                "without groups, BatchNorm, activations with f(0) = 0, pooling, Flatten, Dropout)."
            )


def _kept_rows(name: str, m: nn.Module, masks: Mapping[str, Any], bn: tuple[str, nn.Module] | None) -> Tensor:
    out = m.weight.shape[0]
    keep = torch.ones(out, dtype=torch.bool)
    w = masks.get(f"{name}.weight")
    if w is None:
        return keep
    dead = ~w.reshape(out, -1).any(1).cpu()
    b = masks.get(f"{name}.bias")
    if m.bias is not None:
        dead &= (~b.cpu()) if b is not None else torch.zeros(out, dtype=torch.bool)
    if bn is not None:
        bw, bb = masks.get(f"{bn[0]}.weight"), masks.get(f"{bn[0]}.bias")
        bn_dead = torch.ones(out, dtype=torch.bool)
        if bn[1].weight is not None:
            bn_dead &= (~bw.cpu()) if bw is not None else torch.zeros(out, dtype=torch.bool)
        if bn[1].bias is not None:
            bn_dead &= (~bb.cpu()) if bb is not None else torch.zeros(out, dtype=torch.bool)
        dead &= bn_dead
    keep = ~dead
    if not keep.any():
        keep[0] = True
    return keep


def _compact(model: nn.Sequential, masks: Mapping[str, Any]) -> nn.Sequential:
    chain = _chain(model)
    layers = [i for i, (_, m) in enumerate(chain) if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    new_modules = [copy.deepcopy(m) for _, m in chain]
    in_keep: Tensor | None = None  # kept channels of the previous layer's output
    prev_channels = None
    for idx, (name, m) in enumerate(chain):
        mod = new_modules[idx]
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = m.weight.detach()
            if in_keep is not None:
                cols = in_keep
                if isinstance(m, nn.Linear) and prev_channels is not None and m.in_features != prev_channels:
                    spatial = m.in_features // prev_channels
                    cols = in_keep.repeat_interleave(spatial)
                w = w[:, cols.to(w.device)]
            is_last = idx == layers[-1]
            bn = None
            if not is_last and idx + 1 < len(chain) and isinstance(chain[idx + 1][1], nn.modules.batchnorm._BatchNorm):
                bn = chain[idx + 1]
            rows = torch.ones(w.shape[0], dtype=torch.bool) if is_last else _kept_rows(name, m, masks, bn)
            w = w[rows.to(w.device)]
            bias = None if m.bias is None else m.bias.detach()[rows.to(w.device)]
            if isinstance(m, nn.Linear):
                mod = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
            else:
                conv_cls = type(m)
                mod = conv_cls(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, 1,
                               bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                mod.weight.copy_(w)
                if bias is not None:
                    mod.bias.copy_(bias)
            mod.train(m.training)
            new_modules[idx] = mod
            in_keep, prev_channels = rows, int(m.weight.shape[0])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and in_keep is not None:
            ref = m.weight if m.affine else m.running_mean
            keep = in_keep.to(ref.device) if ref is not None else in_keep
            bn = type(m)(int(keep.sum()), eps=m.eps, momentum=m.momentum, affine=m.affine,
                         track_running_stats=m.track_running_stats,
                         device=keep.device, dtype=ref.dtype if ref is not None else None)
            with torch.no_grad():
                if m.affine:
                    bn.weight.copy_(m.weight.detach()[keep])
                    bn.bias.copy_(m.bias.detach()[keep])
                if m.track_running_stats:
                    bn.running_mean.copy_(m.running_mean[keep])
                    bn.running_var.copy_(m.running_var[keep])
                    bn.num_batches_tracked.copy_(m.num_batches_tracked)
            bn.train(m.training)
            new_modules[idx] = bn
    out = nn.Sequential(*new_modules)
    out.train(model.training)
    return out
