"""The analytic attack on a fully-connected first layer: inputs read off the weight and bias gradients.

For a first layer ``a = W x + b`` and a loss averaged over a batch, unit ``i`` has

    dL/dW_i = (1/B) sum_n delta_ni x_n^T,        dL/db_i = (1/B) sum_n delta_ni,

with ``delta_ni = dL_n/da_ni``. When a single example ``n`` activates unit ``i`` (ReLU: the others are cut
off), ``x_n = dL/dW_i / dL/db_i`` exactly (Phong et al. 2017; Geiping et al. 2020, Prop. 3.1; Fowl et al. 2022
build servers that make this happen on purpose). For one example every unit with a nonzero bias gradient
gives the input; the least-squares combination ``x = sum_i db_i dW_i / sum_i db_i^2`` is used. For a batch,
the ratios of units activated by one example coincide (up to rounding) while those of units activated by
several examples are mixtures that differ from unit to unit, so candidates are grouped and the groups that
several units agree on are returned, largest first.

The layer must receive the model's (flattened) input: this is assumed, not checked, beyond the widths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradsense.privacy.labels import pseudo_gradient
from gradsense.privacy.shared import Shared

__all__ = ["find_first_linear", "linear_layer_inputs"]


def find_first_linear(model: nn.Module, shared: Shared, layer: str | None, in_features: int) -> tuple[str, str]:
    """``(weight name, bias name)`` of the first ``nn.Linear`` (or ``layer``) with both gradients shared.

    Raises:
        ValueError: No such layer, no bias, or an input width that differs from the inputs' size.
    """
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if layer is not None and layer not in linears:
        raise ValueError(f"analytic attack: {layer!r} is not an nn.Linear of the model; its Linear layers: {linears}.")
    name = layer if layer is not None else (linears[0] if linears else None)
    if name is None:
        raise ValueError("the analytic attack needs a model whose first layer is nn.Linear; this model has none. "
                         "Use attack='inverting' or 'dlg'.")
    prefix = f"{name}." if name else ""
    w, b = f"{prefix}weight", f"{prefix}bias"
    if modules[name].bias is None or w not in shared.tensors or b not in shared.tensors:
        raise ValueError(f"the analytic attack needs the weight and bias gradients of {name!r} (a Linear layer "
                         "with a bias); they were not shared.")
    if int(modules[name].in_features) != in_features:
        raise ValueError(f"the analytic attack reads inputs of {in_features} values from {name!r}, whose input "
                         f"width is {modules[name].in_features}: it is not the model's first layer. Name the "
                         "first Linear layer with layer=, or use attack='inverting'.")
    return w, b


def linear_layer_inputs(model: nn.Module, shared: Shared, batch_size: int, input_shape: tuple[int, ...], *,
                        layer: str | None = None, rtol: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Inputs recovered from the first Linear layer's gradients.

    Args:
        model: The model (only its module structure is read).
        shared: The checked shared message.
        batch_size: Number of examples to return.
        input_shape: Shape of one input (its size must equal the layer's ``in_features``).
        layer: Module name of the Linear layer (default: the first ``nn.Linear``).
        rtol: Relative distance under which two units' candidates count as the same example (default
            ``1e3 * eps`` of the dtype, at least ``1e-6``).

    Returns:
        ``(inputs, info)``: ``(batch_size, *input_shape)`` reconstructions (groups found first, mixtures after)
        and ``{"units": active units, "groups": examples that several units agree on}``.

    Raises:
        ValueError: See :func:`find_first_linear`; or no unit has a nonzero bias gradient.
    """
    numel = math.prod(input_shape)
    w, b = find_first_linear(model, shared, layer, numel)
    gw = pseudo_gradient(shared, w).detach()
    gb = pseudo_gradient(shared, b).detach()
    eps = torch.finfo(gw.dtype).eps
    rtol = max(1e3 * eps, 1e-6) if rtol is None else rtol
    scale = gb.abs().max()
    active = torch.nonzero(gb.abs() > 1e3 * eps * scale).flatten()
    if scale == 0 or active.numel() == 0:
        raise ValueError("the analytic attack found no unit of the first layer with a nonzero bias gradient.")
    order = active[torch.argsort(gb[active].abs(), descending=True)]
    if batch_size == 1:  # every active unit sees the one example: least squares over all of them
        db = gb[order]
        x = (db[:, None] * gw[order]).sum(0) / db.pow(2).sum()
        return x.reshape(1, *input_shape), {"units": float(order.numel()), "groups": 1.0}
    cand = gw[order] / gb[order, None]
    groups: list[list[int]] = []
    reps: list[Tensor] = []
    for k in range(cand.shape[0]):
        for g, rep in zip(groups, reps):
            if (cand[k] - rep).norm() <= rtol * max(float(rep.norm()), float(eps)):
                g.append(k)
                break
        else:
            groups.append([k])
            reps.append(cand[k])
    solved = []
    for g in groups:
        units = order[g]
        db = gb[units]
        solved.append(((db[:, None] * gw[units]).sum(0) / db.pow(2).sum(), len(g)))
    solved.sort(key=lambda t: -t[1])
    out = torch.stack([s for s, _ in solved[:batch_size]])
    if out.shape[0] < batch_size:  # fewer distinct candidates than examples: repeat the best
        out = torch.cat([out, out[:1].expand(batch_size - out.shape[0], -1)])
    info = {"units": float(active.numel()), "groups": float(sum(1 for _, n in solved if n > 1))}
    return out.reshape(batch_size, *input_shape), info
