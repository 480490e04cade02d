"""Neuron sensitivity: how much the network's output moves when one neuron's activation moves (SeReNe).

Tartaglione, Bragagnolo, Odierna, Fiandrotti & Grangetto 2021, "SeReNe: Sensitivity-based Regularization of
Neurons for Structured Sparsity in Neural Networks": the sensitivity of neuron ``c`` of a layer is the
magnitude of the derivative of the outputs ``y_1..y_K`` with respect to its activation ``a_c``, averaged over
the data:

    S_c = (1/N) sum_n (1/K) sum_k | d y_k(x_n) / d a_c(x_n) |

``a_c`` is output channel ``c`` of a ``Linear``/``Conv`` layer (before its nonlinearity); for a conv map or a
token sequence the derivative is that of a uniform shift of the whole channel, ``sum_positions dy/da_{c,p}``.
The derivatives come from ``K`` backward passes batched with ``is_grads_batched`` through a zero shift added to
each layer's output (forward hooks removed on exit); the loss and labels are not used.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from gradsense.core.distributed import all_reduce_sum
from gradsense.importance.engine import Context, MethodOutput
from gradsense.importance.structures import UnitGroup, layer_of

__all__ = ["serene"]


def serene(ctx: Context, granularity: str, groups: list[UnitGroup], **_: Any) -> MethodOutput:
    """SeReNe neuron sensitivity (see the module docstring); channel or layer granularity."""
    import torch.nn as nn

    modules = dict(ctx.model.named_modules())
    layer_names = [g.name for g in groups] if granularity == "channel" else list(
        dict.fromkeys(layer_of(n) for n in ctx.names if isinstance(modules.get(layer_of(n)), (nn.Linear, nn.modules.conv._ConvNd)))
    )
    if not layer_names:
        raise ValueError("method='serene' scores neurons of Linear/Conv layers; none is selected.")
    sums = {name: None for name in layer_names}
    seen = 0.0
    for x, _y in ctx.batches():
        n = x.shape[0]
        shifts: dict[str, Tensor] = {}
        handles = []

        def make_hook(name: str, mod: nn.Module, n: int = n, shifts: dict[str, Tensor] = shifts) -> Any:
            def hook(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
                c = out.shape[1] if isinstance(mod, nn.modules.conv._ConvNd) else out.shape[-1]
                s = torch.zeros(n, c, dtype=out.dtype, device=out.device, requires_grad=True)
                shifts[name] = s
                if isinstance(mod, nn.modules.conv._ConvNd):
                    return out + s.reshape(n, c, *([1] * (out.ndim - 2)))
                return out + s.reshape(n, *([1] * (out.ndim - 2)), c)

            return hook

        try:
            for name in layer_names:
                handles.append(modules[name].register_forward_hook(make_hook(name, modules[name])))
            with torch.enable_grad():
                y = ctx.fm(ctx.params, x)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(y, Tensor):
            raise TypeError(f"method='serene' needs a tensor model output, got {type(y).__name__}.")
        flat = y.reshape(n, -1)
        k = flat.shape[1]
        missing = [name for name in layer_names if name not in shifts]
        if missing:  # a layer that did not run has no effect on the output
            for name in missing:
                mod = modules[name]
                c = mod.weight.shape[0]
                shifts[name] = torch.zeros(n, c, dtype=flat.dtype, device=flat.device)
        live = [name for name in layer_names if shifts[name].requires_grad]
        total = {name: torch.zeros_like(shifts[name]) for name in layer_names}
        if live:
            eye = torch.eye(k, dtype=flat.dtype, device=flat.device)
            outs = eye.unsqueeze(1).expand(k, n, k)  # one-hot of output k for every example
            try:
                grads = torch.autograd.grad(flat, [shifts[s] for s in live], grad_outputs=outs, is_grads_batched=True,
                                            allow_unused=True)
                for name, g in zip(live, grads):
                    if g is not None:
                        total[name] = g.abs().sum(0)
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(f"batched backward passes failed ({type(err).__name__}: {str(err)[:100]}); "
                              "computing one output at a time.", RuntimeWarning, stacklevel=2)
                for j in range(k):
                    grads = torch.autograd.grad(flat[:, j].sum(), [shifts[s] for s in live], retain_graph=True,
                                                allow_unused=True)
                    for name, g in zip(live, grads):
                        if g is not None:
                            total[name] = total[name] + g.abs()
        for name in layer_names:
            contrib = (total[name] / k).sum(0).detach()
            sums[name] = contrib if sums[name] is None else sums[name] + contrib
        seen += n
        ctx.n_grad_batches += k
    total_seen = float(all_reduce_sum(torch.tensor(seen, dtype=torch.float64)))  # all ranks' examples
    sens = {name: all_reduce_sum(v) / total_seen for name, v in sums.items()}
    if granularity == "layer":
        return MethodOutput({name: v.sum() for name, v in sens.items()}, meta={"neurons": {n: int(v.numel()) for n, v in sens.items()}})
    return MethodOutput(sens)
