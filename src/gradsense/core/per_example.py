"""Per-example squared gradient norms from forward/backward hooks, without per-example gradients in memory
where a closed form exists.

The gradient of a batch's loss w.r.t. a layer's weight is a sum over the batch rows of per-row
contributions. For a Linear layer with input rows ``a_i`` and output gradients ``d_i`` (the gradient of the
loss w.r.t. the layer's output row ``i``) the contribution of row ``i`` is ``d_i a_i^T``, so
``||g_i||^2 = ||a_i||^2 ||d_i||^2`` (Goodfellow 2015, "Efficient per-example gradient computations").
For sequences, ``(B, T, p)`` inputs, the contribution is ``sum_t d_it a_it^T`` and

    ||g_i||^2 = sum_{t,s} (a_it . a_is)(d_it . d_is),

the sum of the elementwise product of two ``T x T`` Gram matrices (the trick of nanoGNS and of BackPACK's
``BatchL2Grad``), or the norm of the materialised ``(q, p)`` contribution when that takes fewer operations
(``T (p + q) > p q``). Per module and call:

- ``nn.Linear``: as above (any number of middle dimensions is a sequence);
- ``nn.Conv1d``/``nn.Conv2d``: a Linear on unfolded patches (``F.unfold``, one per group) when the patches'
  Gram matrices are the cheaper route, else the per-example weight gradients as the weight gradient of one
  convolution whose groups are the examples (``torch.nn.grad.conv2d_weight``);
- ``nn.Embedding``: the Gram trick with ``[id_it == id_is]`` in place of ``a_it . a_is`` (``padding_idx`` rows
  get no gradient);
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*d`` (affine): the contribution
  ``sum_t d_it * xhat_it`` with ``xhat`` recomputed from the captured input (batch statistics for train-mode
  BatchNorm, where the rows are coupled: see below);
- any other module with parameters of its own and no submodule with parameters: ``torch.func.vmap`` of the
  module's vector-Jacobian product over the rows, with copies of its buffers and the global RNG state restored (a module that draws random
  numbers, e.g. Dropout in train mode inside it, is excluded and named in :attr:`PerExampleNorms.excluded`).
  The module's ``forward`` is called directly, so its own hooks do not see this re-forward (hooks on its
  submodules do). Parameters of a module that also runs submodules with parameters (a model's root holding a class
  token) are left out and named: their per-example gradients would re-run the whole submodule tree.

**Which rows are examples.** Row ``i`` of dimension 0 is example ``i`` (``dim 1`` for the inputs of a
``nn.MultiheadAttention(batch_first=False)``). Calls of a module within one forward of the root model are the
same examples (a siamese model calling its encoder twice: the contributions of both calls are added before
the norm); each root forward is a new set of examples (gradient accumulation). A call whose leading dimension
is not the forward's batch size (a model that flattens ``(B, T)`` into rows) is excluded with its reason.

**Scale.** The contributions are those of the loss that was differentiated: with a loss averaged over ``B``
examples each contribution is ``1/B`` times the gradient of that example's own loss. Ratios such as the
gradient noise scale do not depend on this; absolute values do (see :mod:`gradsense.monitor`).

**Coupled rows.** With train-mode BatchNorm the loss of one example depends on the whole batch; the
contributions still sum to the batch gradient, but they are not gradients of independent per-example losses.
:attr:`PerExampleNorms.coupled` names such layers.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradsense.core.batching import chunk_size_for, chunks, default_budget

__all__ = ["PerExampleNorms", "pair_sq_norms"]


def pair_sq_norms(a: Tensor, d: Tensor, *, max_memory: int | None = None) -> Tensor:
    """``||sum_t d_it a_it^T||_F^2`` for every row ``i``.

    Args:
        a: ``(B, T, p)`` inputs.
        d: ``(B, T, q)`` output gradients.
        max_memory: Bytes one chunk of rows may use (default: the engine's budget).

    Returns:
        ``(B,)`` squared Frobenius norms, in ``a``'s dtype promoted to at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, d.dtype), torch.float32)
    a, d = a.to(dtype), d.to(dtype)
    b, t, p = a.shape
    q = d.shape[-1]
    if t == 1:
        return a.square().sum((1, 2)) * d.square().sum((1, 2))
    gram = t * (p + q) <= p * q
    per_row = (2 * t * t if gram else p * q) * a.element_size()
    size = chunk_size_for(per_row, max_memory=max_memory if max_memory is not None else default_budget(a.device),
                          total=b)
    out = torch.empty(b, dtype=dtype, device=a.device)
    for sl in chunks(b, size):
        ai, di = a[sl], d[sl]
        if gram:
            out[sl] = ((ai @ ai.transpose(1, 2)) * (di @ di.transpose(1, 2))).sum((1, 2))
        else:
            out[sl] = (di.transpose(1, 2) @ ai).square().sum((1, 2))
    return out


# --------------------------------------------------------------------------------------- per-module rules
def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _rows(t: Tensor, b: int, bdim: int = 0) -> Tensor:
    """``t`` with the example dimension first, as ``(b, -1, last)``."""
    if bdim:
        t = t.movedim(bdim, 0)
    return t.reshape(b, -1, t.shape[-1])


def _linear(module: nn.Linear, calls: list[_Call], b: int, budget: int | None) -> dict[str, Tensor]:
    a = _cat([_rows(c.args[0].detach(), b) for c in calls], dim=1)
    d = _cat([_rows(c.grads[0], b) for c in calls], dim=1)
    out = {}
    if module.weight.requires_grad:
        out["weight"] = pair_sq_norms(a, d, max_memory=budget)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = d.to(torch.promote_types(d.dtype, torch.float32)).sum(1).square().sum(1)
    return out


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``(B, L, C_in * prod(kernel))`` patches of the input, in the weight's layout."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        padding: Any = (0, *module.padding) if not isinstance(module.padding, str) else module.padding
    else:
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        pad = list(module._reversed_padding_repeated_twice)
        if isinstance(module, nn.Conv1d):
            pad = [*pad, 0, 0]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C k, L)
    return cols.transpose(1, 2)


def _padded(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, Any]:
    """The input padded as the module pads it when that is not plain zero padding, and the padding left to apply."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, list(module._reversed_padding_repeated_twice), mode=mode), 0
    return x, module.padding


def _conv_weight_grouped(module: nn.Conv1d | nn.Conv2d, x: Tensor, d: Tensor, budget: int | None) -> Tensor:
    """``||g_i||^2`` of the weight from the per-example weight gradients, computed as the weight gradient of one
    convolution whose groups are the examples (``torch.nn.grad.conv*d_weight``; no unfolded patches)."""
    x, padding = _padded(module, x)
    b = x.shape[0]
    g = module.groups
    w_shape = module.weight.shape
    conv_weight = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    dtype = torch.promote_types(x.dtype, torch.float32)
    per = 3 * math.prod(w_shape) * torch.finfo(dtype).bits // 8
    size = chunk_size_for(per, max_memory=budget if budget is not None else default_budget(x.device), total=b)
    out = torch.empty(b, dtype=dtype, device=x.device)
    for sl in chunks(b, size):
        n = sl.stop - sl.start
        xi = x[sl].to(dtype).reshape(1, n * x.shape[1], *x.shape[2:])
        di = d[sl].to(dtype).reshape(1, n * d.shape[1], *d.shape[2:])
        gw = conv_weight(xi, (n * w_shape[0], *w_shape[1:]), di, stride=module.stride, padding=padding,
                         dilation=module.dilation, groups=n * g)
        out[sl] = gw.reshape(n, -1).square().sum(1)
    return out


def _conv(module: nn.Conv1d | nn.Conv2d, calls: list[_Call], b: int, budget: int | None) -> dict[str, Tensor]:
    out = {}
    if module.weight.requires_grad:
        g = module.groups
        cin, cout = module.in_channels // g, module.out_channels // g
        k = math.prod(module.kernel_size)
        positions = sum(math.prod(c.grads[0].shape[2:]) for c in calls)
        if len(calls) == 1 and positions * (cin * k + cout) > cin * k * cout:
            # the per-example gradients take fewer operations than the Gram matrices of the patches
            out["weight"] = _conv_weight_grouped(module, calls[0].args[0].detach(), calls[0].grads[0], budget)
        else:
            a = _cat([_conv_patches(module, c.args[0].detach()) for c in calls], dim=1)  # (B, L, C_in k)
            d = _cat([c.grads[0].reshape(b, module.out_channels, -1).transpose(1, 2) for c in calls], dim=1)
            total = None
            for j in range(g):
                part = pair_sq_norms(a[..., j * cin * k:(j + 1) * cin * k], d[..., j * cout:(j + 1) * cout],
                                     max_memory=budget)
                total = part if total is None else total + part
            out["weight"] = total
    if module.bias is not None and module.bias.requires_grad:
        d_sum = sum(c.grads[0].reshape(b, module.out_channels, -1).sum(2) for c in calls)
        out["bias"] = d_sum.to(torch.promote_types(d_sum.dtype, torch.float32)).square().sum(1)
    return out


def _embedding(module: nn.Embedding, calls: list[_Call], b: int, budget: int | None) -> dict[str, Tensor]:
    if not module.weight.requires_grad:
        return {}
    ids = _cat([c.args[0].reshape(b, -1) for c in calls], dim=1)
    d = _cat([_rows(c.grads[0], b) for c in calls], dim=1)
    dtype = torch.promote_types(d.dtype, torch.float32)
    d = d.to(dtype)
    if module.padding_idx is not None:
        d = d * (ids != module.padding_idx).unsqueeze(-1).to(dtype)
    t = ids.shape[1]
    size = chunk_size_for(3 * t * t * d.element_size(),
                          max_memory=budget if budget is not None else default_budget(d.device), total=b)
    out = torch.empty(b, dtype=dtype, device=d.device)
    for sl in chunks(b, size):
        same = (ids[sl].unsqueeze(2) == ids[sl].unsqueeze(1)).to(dtype)
        out[sl] = (same * (d[sl] @ d[sl].transpose(1, 2))).sum((1, 2))
    return {"weight": out}


def _normalized(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``xhat`` as the module computes it (fused torch kernels without affine parameters), and the channel
    dimension (``-1`` for the norms over trailing dimensions)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), -1
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        batch_stats = module.training or module.running_mean is None
        mean = None if batch_stats else module.running_mean.to(x.dtype)
        var = None if batch_stats else module.running_var.to(x.dtype)
        return F.batch_norm(x, mean, var, None, None, batch_stats, 0.0, module.eps), 1
    return F.rms_norm(x, module.normalized_shape, None, module.eps), -1


def _norm(module: nn.Module, calls: list[_Call], b: int, budget: int | None) -> dict[str, Tensor]:
    w_sum: Tensor | None = None
    b_sum: Tensor | None = None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    want_w = weight is not None and weight.requires_grad
    want_b = bias is not None and bias.requires_grad
    for c in calls:
        xhat, cdim = _normalized(module, c.args[0].detach())
        d = c.grads[0].to(xhat.dtype)
        if cdim == 1:  # (B, C, *): per-channel sums over the other dimensions (none for (B, C))
            red = tuple(range(2, d.ndim))
            xw = ((d * xhat).sum(red) if red else d * xhat) if want_w else None
            xb = (d.sum(red) if red else d) if want_b else None
        else:  # (B, ..., *normalized_shape)
            n_feat = math.prod(module.normalized_shape)
            xw = (d * xhat).reshape(b, -1, n_feat).sum(1) if want_w else None
            xb = d.reshape(b, -1, n_feat).sum(1) if want_b else None
        if xw is not None:
            w_sum = xw if w_sum is None else w_sum + xw
        if xb is not None:
            b_sum = xb if b_sum is None else b_sum + xb
    out = {}
    if w_sum is not None:
        out["weight"] = w_sum.reshape(b, -1).square().sum(1)
    if b_sum is not None:
        out["bias"] = b_sum.reshape(b, -1).square().sum(1)
    return out


def _batch_dim(module: nn.Module, what: str, position: int = 0) -> int:
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 0 if (what == "output" and position == 1) else 1
    return 0


def _fallback(module: nn.Module, calls: list[_Call], b: int, budget: int | None,
              names: Iterable[str] = ()) -> dict[str, Tensor]:
    """Per-row contributions by ``vmap`` of the module's vector-Jacobian product (materialised, in chunks).

    ``names``: the (possibly dotted) parameter names, relative to ``module``, to differentiate.
    """
    wanted = set(names)
    params = {n: p.detach() for n, p in module.named_parameters() if n in wanted and p.requires_grad}
    if not params:
        return {}
    buffers = {n: t.detach().clone() for n, t in module.named_buffers()}
    bare = _Bare(module)
    total: dict[str, Tensor] | None = None
    numel = sum(p.numel() for p in params.values())
    for c in calls:
        bdims_args = [(_batch_dim(module, "input") if isinstance(a, Tensor) and a.ndim > _batch_dim(module, "input")
                       and a.shape[_batch_dim(module, "input")] == b else None) for a in c.args]
        kw_names = [k for k, v in c.kwargs.items() if isinstance(v, Tensor)]
        kw_static = {k: v for k, v in c.kwargs.items() if not isinstance(v, Tensor)}
        bdims_kw = [(_batch_dim(module, "input") if c.kwargs[k].ndim > _batch_dim(module, "input")
                     and c.kwargs[k].shape[_batch_dim(module, "input")] == b else None) for k in kw_names]
        grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(c.grads, c.outputs)]
        gdims = [_batch_dim(module, "output", j) for j in range(len(grads))]
        n_args = len(c.args)

        def dot(p: dict[str, Tensor], *flat: Any, n_args: int = n_args, kw_names: list[str] = kw_names,
                kw_static: dict[str, Any] = kw_static, c: _Call = c) -> Tensor:
            args = [_unsqueeze(v, module) for v in flat[:n_args]]
            kwargs = {k: _unsqueeze(v, module) for k, v in zip(kw_names, flat[n_args:n_args + len(kw_names)])}
            gs = flat[n_args + len(kw_names):]
            state = {f"inner.{k}": v for k, v in {**buffers, **p}.items()}
            out = functional_call(bare, state, tuple(args), {**kwargs, **kw_static})
            outs = [o for o in _flat_tensors(out)][: len(gs)]
            return sum((o * _unsqueeze_out(gi, module, j)).sum() for j, (o, gi) in enumerate(zip(outs, gs)))

        fn = vmap(grad(dot), in_dims=(None, *bdims_args, *bdims_kw, *gdims), randomness="error")
        flat_in = [*[a.detach() if isinstance(a, Tensor) else a for a in c.args],
                   *[c.kwargs[k].detach() for k in kw_names], *grads]
        per_row = 4 * numel * 2
        size = chunk_size_for(per_row, max_memory=budget if budget is not None else default_budget(), total=b)
        parts: dict[str, list[Tensor]] = {n: [] for n in params}
        for sl in chunks(b, size):
            sliced = [_take(v, d, sl) for v, d in zip(flat_in, [*bdims_args, *bdims_kw, *gdims])]
            g = fn(params, *sliced)
            for n in params:
                parts[n].append(g[n].detach())
        contrib = {n: torch.cat(v) for n, v in parts.items()}
        total = contrib if total is None else {n: total[n] + contrib[n] for n in total}
    assert total is not None
    return {n: v.to(torch.promote_types(v.dtype, torch.float32)).reshape(b, -1).square().sum(1) for n, v in total.items()}


class _Bare(nn.Module):
    """Calls ``inner.forward`` directly: the module's own hooks do not see the fallback's re-forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.inner).forward(self.inner, *args, **kwargs)


def _take(v: Any, dim: int | None, sl: slice) -> Any:
    if dim is None or not isinstance(v, Tensor):
        return v
    return v.narrow(dim, sl.start, sl.stop - sl.start)


def _unsqueeze(v: Any, module: nn.Module) -> Any:
    if not isinstance(v, Tensor):
        return v
    return v.unsqueeze(_batch_dim(module, "input"))


def _unsqueeze_out(v: Tensor, module: nn.Module, position: int) -> Tensor:
    return v.unsqueeze(_batch_dim(module, "output", position))


def _flat_tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return []


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` whose class does not override ``forward``."""
    return isinstance(module, base) and type(module).forward is base.forward


def rule_for(module: nn.Module) -> str:
    """The per-example rule used for a module's own parameters: linear, conv, embedding, norm or vmap."""
    if _plain(module, nn.Linear):
        return "linear"
    if _plain(module, nn.Conv1d) or _plain(module, nn.Conv2d):
        return "conv"
    if _plain(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq \
            and not module.sparse:
        return "embedding"
    bases: list[type[nn.Module]] = [nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm]
    if hasattr(nn, "RMSNorm"):
        bases.append(nn.RMSNorm)
    if any(_plain(module, b) for b in bases):
        return "norm"
    return "vmap"


_RULES = {"linear": _linear, "conv": _conv, "embedding": _embedding, "norm": _norm, "vmap": _fallback}


# --------------------------------------------------------------------------------------- capture
@dataclasses.dataclass
class _Call:
    args: tuple
    kwargs: dict
    outputs: list[Tensor]
    grads: list[Tensor | None]
    done: bool = False


@dataclasses.dataclass
class _Group:
    """The calls of one module within one root forward (the same examples)."""

    size: int
    calls: list[_Call] = dataclasses.field(default_factory=list)
    pending: int = 0


class PerExampleNorms:
    """Squared norms of every example's gradient contribution, per parameter, from hooks.

    Use it around forward and backward passes; each root forward of ``model`` is a new set of examples::

        with PerExampleNorms(model) as pe:
            loss_fn(model(x), y).backward()
        pe.squared_norms["0.weight"]   # (B,)

    Args:
        model: The root module (its forward marks a new set of examples).
        params: ``{name: parameter}`` to cover (default: every parameter that requires grad).
        max_memory: Bytes a chunk of per-example work may use (default: the engine's budget).

    Attributes:
        squared_norms: After the backward: ``{parameter name: (N,) tensor}`` over all examples seen (float32 or
            wider), rows in the order the forwards saw them.
        excluded: ``{parameter name: reason}`` for parameters whose contributions could not be computed.
        coupled: Names of modules whose rows are coupled (train-mode BatchNorm).
        rules: ``{module name: rule}`` used for each module owning covered parameters.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor] | None = None, *,
                 max_memory: int | None = None) -> None:
        self.model = model
        named = dict(model.named_parameters())
        chosen = {n: p for n, p in named.items() if p.requires_grad} if params is None else dict(params)
        ids = {id(p): n for n, p in chosen.items()}
        self.modules: dict[str, nn.Module] = {}
        self.param_names: dict[str, dict[str, str]] = {}  # module -> {local (dotted) name: full name}
        inside: set[int] = set()  # modules whose parameters belong to an enclosing nn.MultiheadAttention
        for mname, module in model.named_modules():
            if id(module) in inside:
                continue
            # nn.MultiheadAttention uses out_proj's weight in its own code (out_proj's forward never runs)
            recurse = isinstance(module, nn.MultiheadAttention)
            if recurse:
                inside.update(id(m) for m in module.modules() if m is not module)
            own = {ln: ids[id(p)] for ln, p in module.named_parameters(recurse=recurse) if id(p) in ids}
            if own:
                self.modules[mname] = module
                self.param_names[mname] = own
        self.rules = {m: ("vmap" if isinstance(mod, nn.MultiheadAttention) else rule_for(mod))
                      for m, mod in self.modules.items()}
        self.excluded: dict[str, str] = {}
        for m, mod in self.modules.items():
            # the fallback re-runs the module's forward per example: not for a module whose forward runs submodules
            # with parameters (a model's root holding a class token would be re-run whole)
            if self.rules[m] == "vmap" and not isinstance(mod, nn.MultiheadAttention) and any(
                    any(True for _ in c.parameters()) for c in mod.children()):
                for full in self.param_names[m].values():
                    self.excluded[full] = (f"{m or '<root>'} runs submodules with parameters: per-example gradients of "
                                           "its own parameters would re-run all of them")
        first = next(iter(chosen.values()), None)
        # read once: the default budget looks at the free memory, too slow to ask at every layer of every step
        self.max_memory = max_memory if max_memory is not None else default_budget(
            first.device if first is not None else None)
        self.coupled: list[str] = []
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []
        self._forward_id = -1
        self._sizes: list[int] = []
        self._groups: dict[tuple[str, int], _Group] = {}
        self._parts: dict[str, dict[int, Tensor]] = {n: {} for own in self.param_names.values() for n in own.values()}
        self._warned: set[str] = set()
        self._root_seen = False
        self._busy = False  # our own re-forwards (vmap fallback) must not be recorded

    # ----------------------------------------------------------------------------- life cycle
    def __enter__(self) -> PerExampleNorms:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (forward hooks on the root and on each covered module)."""
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        for name, module in self.modules.items():
            if all(full in self.excluded for full in self.param_names[name].values()):
                continue
            self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook; pending groups are finished first."""
        self.finish()
        for h in self._handles + self._grad_handles:
            h.remove()
        self._handles, self._grad_handles = [], []

    def end_backward(self) -> None:
        """Mark the end of a backward pass: the next forward is new examples even if the root is not called."""
        self.finish()
        self._root_seen = False

    def reset(self) -> None:
        """Forget what was recorded (the hooks stay)."""
        for h in self._grad_handles:
            h.remove()
        self._grad_handles = []
        self._forward_id = -1
        self._sizes = []
        self._groups = {}
        self._parts = {n: {} for n in self._parts}
        self._root_seen = False

    # ----------------------------------------------------------------------------- results
    @property
    def n_examples(self) -> int:
        """Examples seen (rows of every root forward)."""
        return sum(self._sizes)

    def sums(self, names: list[str]) -> Tensor:
        """``(len(names),)`` float64: each parameter's ``sum_i ||g_i||^2`` over the examples seen (0 for parameters
        without contributions or excluded)."""
        self.finish()
        out = []
        for n in names:
            parts = self._parts.get(n)
            if not parts or n in self.excluded:
                out.append(None)
                continue
            vals = list(parts.values())
            out.append(vals[0].sum() if len(vals) == 1 else torch.stack([v.sum() for v in vals]).sum())
        ref = next((v for v in out if v is not None), None)
        if ref is None:
            return torch.zeros(len(names), dtype=torch.float64)
        zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return torch.stack([zero if v is None else v.to(ref.dtype) for v in out]).to(torch.float64)

    @property
    def squared_norms(self) -> dict[str, Tensor]:
        """``{parameter: (N,)}`` squared norms of each example's contribution (zeros where a forward did not reach
        the parameter); excluded parameters are left out."""
        self.finish()
        out: dict[str, Tensor] = {}
        for name, parts in self._parts.items():
            if name in self.excluded or not parts:
                continue
            ref = next(iter(parts.values()))
            rows = [parts.get(f, torch.zeros(s, dtype=ref.dtype, device=ref.device)) for f, s in enumerate(self._sizes)]
            out[name] = torch.cat(rows)
        return out

    def finish(self) -> None:
        """Compute the groups whose gradients arrived only in part (outputs the loss did not depend on)."""
        for key, group in list(self._groups.items()):
            if any(c.done for c in group.calls):
                self._compute(key, group)
        self._groups = {}

    def missing(self) -> list[str]:
        """Covered, not excluded parameters for which no contribution was recorded (their module never ran)."""
        self.finish()
        return [n for n, parts in self._parts.items() if not parts and n not in self.excluded]

    def exclude(self, names: Iterable[str], reason: str) -> None:
        """Leave parameters out, with the reason (e.g. they received gradients no hook saw)."""
        for n in names:
            self.excluded.setdefault(n, reason)

    # ----------------------------------------------------------------------------- hooks
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy or not torch.is_grad_enabled():
            return
        size = _leading_size(args, kwargs)
        if size is None:
            return
        self._forward_id += 1
        self._sizes.append(size)
        self._root_seen = True

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._busy or not torch.is_grad_enabled():
                return
            outs = [o for o in _flat_tensors(output) if o.requires_grad]
            if not outs:
                return
            if not self._root_seen:
                size = _leading_size(args, kwargs, _batch_dim(module, "input"))
                if size is None:
                    return
                self._forward_id += 1
                self._sizes.append(size)
                self._root_seen = True
            fid = self._forward_id
            size = self._sizes[fid]
            bdim = _batch_dim(module, "input")
            first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if not isinstance(first, Tensor) or first.ndim <= bdim or first.shape[bdim] != size:
                if isinstance(first, Tensor) and first.ndim > bdim and first.shape[bdim] == 1:
                    why = (f"its input (shape {tuple(first.shape)}) is shared by the {size} examples, so its gradient "
                           "is already summed over them (e.g. position embeddings broadcast over the batch)")
                else:
                    got = "no tensor input" if not isinstance(first, Tensor) else f"shape {tuple(first.shape)}"
                    why = f"its input ({got}) does not have the batch of {size} examples in dimension {bdim}"
                self._exclude(name, why)
                return
            key = (name, fid)
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(size)
            call = _Call(args=args, kwargs=kwargs, outputs=outs, grads=[None] * len(outs))
            group.calls.append(call)
            group.pending += 1

            def on_grads(grads: Any, call: _Call = call, key: tuple[str, int] = key) -> None:
                if self._busy:  # a backward of our own caller's measurements (e.g. torch.autograd.grad), not the step's
                    return
                call.grads = [None if g is None else g.detach() for g in grads]
                call.done = True
                grp = self._groups.get(key)
                if grp is None:
                    return
                grp.pending -= 1
                if grp.pending == 0:
                    self._compute(key, grp)
                    del self._groups[key]

            if len(outs) == 1:  # a tensor hook is ~10x cheaper to register than a multi-grad hook
                self._grad_handles.append(outs[0].register_hook(lambda g, on_grads=on_grads: on_grads((g,))))
            else:
                self._grad_handles.append(torch.autograd.graph.register_multi_grad_hook(outs, on_grads, mode="all"))

        return hook

    def _exclude(self, module_name: str, reason: str) -> None:
        for full in self.param_names[module_name].values():
            self.excluded.setdefault(full, reason)
        if module_name not in self._warned:
            self._warned.add(module_name)
            warnings.warn(f"per-example gradient norms: {module_name or '<root>'} left out: {reason}.", RuntimeWarning,
                          stacklevel=3)

    def _compute(self, key: tuple[str, int], group: _Group) -> None:
        name, fid = key
        if any(full in self.excluded for full in self.param_names[name].values()):
            return
        module = self.modules[name]
        calls = [c for c in group.calls if c.done]
        for c in calls:
            c.grads = [g if g is not None else torch.zeros_like(o) for g, o in zip(c.grads, c.outputs)]
        if not calls:
            return
        rule = self.rules[name]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and name not in self.coupled:
            self.coupled.append(name)
        self._busy = True
        try:
            if rule == "vmap":
                with torch.random.fork_rng(devices=_cuda_devices(module)):
                    res = _fallback(module, calls, group.size, self.max_memory, self.param_names[name])
            else:
                with torch.no_grad():
                    res = _RULES[rule](module, calls, group.size, self.max_memory)  # type: ignore[operator]
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._exclude(name, f"{rule} rule failed ({type(err).__name__}: {first[:160]})")
            return
        finally:
            self._busy = False
        for local, value in res.items():
            full = self.param_names[name].get(local)
            if full is None:
                continue
            prev = self._parts[full].get(fid)
            self._parts[full][fid] = value.detach() if prev is None else prev + value.detach()
        for c in calls:  # drop references to activations and gradients
            c.args, c.kwargs, c.outputs, c.grads = (), {}, [], []


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def _leading_size(args: Iterable[Any], kwargs: Mapping[str, Any], dim: int = 0) -> int | None:
    for v in [*args, *kwargs.values()]:
        if isinstance(v, Tensor) and v.ndim > dim:
            return int(v.shape[dim])
        if isinstance(v, Mapping):
            size = _leading_size((), v, dim)
            if size is not None:
                return size
    return None
