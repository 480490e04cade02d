"""A model as a pure function ``f(params, buffers, inputs)``, parameter selection, flat vectors.

Everything here is built on :func:`torch.func.functional_call`: the caller's module is used as a
template and is never changed. :func:`preserve_model` guards the few places that must touch module
state (switching ``eval()`` for a computation, or capturing activations with hooks): it restores
parameters' ``requires_grad``, every module's ``training`` flag and every hook dict on exit, also
when an exception escapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "FunctionalModel",
    "ModelState",
    "ParamSpec",
    "check_model",
    "copy_buffers",
    "flatten",
    "functional",
    "model_fingerprint",
    "preserve_model",
    "select_parameters",
    "unflatten",
]

ParamSpec = Union[
    None,
    str,
    Sequence[str],
    type,
    tuple,
    Callable[[str, nn.Parameter], bool],
]
"""Which parameters to take:

- ``None``: the parameters that train (``requires_grad=True``), as PyHessian and BackPACK take them; every
  parameter when none trains (a fully frozen model), so that its curvature can still be read;
- a ``str``: a regular expression matched (``re.search``) against the parameter's full name,
  e.g. ``"features\\.0\\."`` or ``"weight$"``;
- a sequence of ``str``: exact parameter names, or module names (all parameters below that module);
- an ``nn.Module`` subclass or tuple of them: the parameters owned directly by modules of that type;
- a callable ``(name, parameter) -> bool``.
"""

_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


#: Layers whose output in train mode depends on the batch (BatchNorm) or on randomness (Dropout).
STOCHASTIC_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def training_stochastic_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm/Dropout modules of ``model`` that are in train mode (``""`` is the root).

    Looks at every module, not only the root: ``model.eval(); model.bn.train()`` has one such layer.

    Args:
        model: Any module.

    Returns:
        The names, in ``named_modules()`` order; empty when the model's output depends on neither the
        batch nor randomness.
    """
    return [n for n, m in model.named_modules() if m.training and isinstance(m, STOCHASTIC_LAYERS)]


def describe_training(layers: list[str], limit: int = 3) -> str:
    """``"BatchNorm/Dropout in train mode (bn1, drop)"`` for the names from :func:`training_stochastic_layers`."""
    shown = ", ".join(n or "<root>" for n in layers[:limit])
    more = f" and {len(layers) - limit} more" if len(layers) > limit else ""
    return f"BatchNorm/Dropout in train mode ({shown}{more})"


def any_module_training(model: nn.Module) -> bool:
    """True when ``model`` or any submodule is in train mode (its forwards may then update buffers)."""
    return any(m.training for m in model.modules())


def check_model(model: Any) -> nn.Module:
    """Raise a clear ``TypeError`` unless ``model`` is an ``nn.Module``; return it."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Wrap plain functions in an nn.Module, or load one with gradsense.zoo.load(...)."
        )
    return model


def select_parameters(model: nn.Module, spec: ParamSpec = None) -> dict[str, Tensor]:
    """Select named parameters of ``model``.

    Args:
        model: The module.
        spec: Which parameters (see :data:`ParamSpec`).

    Returns:
        An ordered ``{name: parameter}`` dict (the module's own Parameter objects, not copies).

    Raises:
        ValueError: If ``spec`` selects nothing, or names a parameter/module that does not exist.
        TypeError: If ``spec`` has an unsupported type.
    """
    check_model(model)
    named = dict(model.named_parameters())
    if spec is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad} or named
    elif isinstance(spec, str):
        pattern = re.compile(spec)
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    elif isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(t, type) for t in spec)):
        types = spec if isinstance(spec, tuple) else (spec,)
        chosen = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, types):
                for pn, p in mod.named_parameters(recurse=False):
                    chosen[f"{mod_name}.{pn}" if mod_name else pn] = p
    elif callable(spec):
        chosen = {n: p for n, p in named.items() if spec(n, p)}
    elif isinstance(spec, Sequence):
        modules = dict(model.named_modules())
        chosen = {}
        for item in spec:
            if not isinstance(item, str):
                raise TypeError(f"params entries must be names (str), got {type(item).__name__}")
            if item in named:
                chosen[item] = named[item]
            elif item in modules:
                prefix = f"{item}." if item else ""
                chosen.update({n: p for n, p in named.items() if n.startswith(prefix)})
            else:
                close = [n for n in list(named) + list(modules) if item.split(".")[0] in n][:5]
                raise ValueError(
                    f"params: no parameter or module named {item!r}. "
                    f"Similar names: {close or list(named)[:5]}."
                )
    else:
        raise TypeError(
            "params must be None, a regex string, a list of names, an nn.Module type, or a callable "
            f"(name, param) -> bool; got {type(spec).__name__}."
        )
    if not chosen:
        raise ValueError(f"params={spec!r} selects no parameter of {type(model).__name__}.")
    # keep the model's own order
    return {n: named[n] for n in named if n in chosen}


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (dict values in order, or a sequence) into one flat vector."""
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not values:
        raise ValueError("flatten: nothing to flatten (empty dict/sequence).")
    return torch.cat([v.reshape(-1) for v in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into a dict shaped like ``like`` (inverse of :func:`flatten`).

    Raises:
        ValueError: If the vector's length differs from the total size of ``like``.
    """
    total = sum(t.numel() for t in like.values())
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(
            f"unflatten: expected a 1-D vector of {total} elements, got shape {tuple(vector.shape)}."
        )
    out, offset = {}, 0
    for name, t in like.items():
        n = t.numel()
        out[name] = vector[offset : offset + n].view_as(t)
        offset += n
    return out


@dataclass(frozen=True)
class FunctionalModel:
    """``model`` as a pure function of (selected parameters, inputs).

    Call it as ``fm(params, *inputs)`` where ``params`` maps the selected names to tensors; the other
    parameters are taken from the module as they are, the buffers from copies made when the functional
    model was built. Nothing on the module changes: a train-mode BatchNorm updates the copies of its
    running statistics, never the caller's (a detached buffer would share the caller's storage).

    Attributes:
        module: The template module (not modified).
        params: The selected parameters (the module's own tensors, detached), in order.
        frozen: The parameters that are not selected, detached.
        buffers: Copies of the module's buffers (taken when the functional model was built).
    """

    module: nn.Module
    params: dict[str, Tensor]
    frozen: dict[str, Tensor]
    buffers: dict[str, Tensor]

    def __call__(self, params: Mapping[str, Tensor], *inputs: Any, **kwargs: Any) -> Any:
        state = {**self.frozen, **self.buffers, **params}
        return functional_call(self.module, state, inputs, kwargs, tie_weights=True, strict=False)

    @property
    def names(self) -> list[str]:
        """Names of the selected parameters."""
        return list(self.params)

    @property
    def numel(self) -> int:
        """Total number of selected scalars."""
        return sum(p.numel() for p in self.params.values())


def functional(model: nn.Module, params: ParamSpec = None) -> FunctionalModel:
    """Turn ``model`` into a :class:`FunctionalModel` over the parameters selected by ``params``.

    Args:
        model: The module (used as a template, never modified).
        params: Which parameters become arguments (see :data:`ParamSpec`); the rest stay fixed.

    Returns:
        The functional model. ``fm(fm.params, x)`` equals ``model(x)``.

    Example:
        >>> lin = torch.nn.Linear(3, 1)
        >>> fm = functional(lin)
        >>> x = torch.randn(2, 3)
        >>> torch.allclose(fm(fm.params, x), lin(x))
        True
    """
    check_model(model)
    selected = select_parameters(model, params)
    all_named = dict(model.named_parameters())
    return FunctionalModel(
        module=model,
        params={n: p.detach() for n, p in selected.items()},
        frozen={n: p.detach() for n, p in all_named.items() if n not in selected},
        buffers=copy_buffers(model),
    )


def copy_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: copy}`` of every buffer: what a functional call may be given without touching the caller.

    Never hand ``buffer.detach()`` to a functional call: it shares the caller's storage, and a train-mode
    BatchNorm updates its running statistics in place.
    """
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def model_fingerprint(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """A short description of a model for result metadata: class, size, and a hash of the weights."""
    h = hashlib.sha256()
    for pname, p in model.state_dict().items():
        h.update(pname.encode())
        t = p.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():  # hashed in place through the buffer protocol: no copy of the weights
            h.update(memoryview(t.view(torch.uint8).numpy()))
    fp: dict[str, Any] = {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": h.hexdigest()[:16],
    }
    fp["name"] = name or getattr(model, "zoo_name", None) or type(model).__name__
    return fp


_PLAIN = (bool, int, float, str, type(None))
_MODULE_INTERNALS = frozenset({"training", "_parameters", "_buffers", "_modules"})
_MISSING = object()


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in module.__dict__.items() if isinstance(v, _PLAIN) and k not in _MODULE_INTERNALS}


@dataclass
class ModelState:
    """A snapshot of everything gradsense promises not to change on a module.

    ``capture(model)`` records parameter values (by identity and a copy), ``requires_grad``, every
    module's ``training`` flag and the keys of every hook dict; :meth:`restore` puts back flags and
    removes hooks added since; :meth:`diff` lists what differs (used by the test helper).
    """

    model: nn.Module
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: dict[str, dict[str, tuple]]
    values: dict[str, Tensor] | None
    attrs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module, values: bool = False) -> ModelState:
        """Snapshot ``model``; with ``values=True`` also copy parameter and buffer values."""
        training, hooks, attrs = {}, {}, {}
        for n, m in model.named_modules():  # one walk over the modules (this runs on every call)
            d = m.__dict__
            training[n] = m.training
            hooks[n] = {a: tuple(d[a].keys()) for a in _HOOK_ATTRS if a in d}
            attrs[n] = _plain_attrs(m)
        return cls(
            model=model,
            requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
            training=training,
            hooks=hooks,
            values={k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
            if values
            else None,
            attrs=attrs,
        )

    def restore(self) -> None:
        """Restore flags, plain attributes and hooks: remove what was added after the snapshot.

        Plain attributes are a module's own ``bool/int/float/str/None`` entries (libraries such as
        transformers set flags like "capture hooks installed" on first use): changed ones are put back,
        added ones deleted.
        """
        for n, m in self.model.named_modules():
            d = m.__dict__
            before = self.attrs.get(n)
            if before is not None:
                for key in [k for k in d if k not in before and k not in _MODULE_INTERNALS]:
                    if isinstance(d[key], _PLAIN):
                        del d[key]
                for key, value in before.items():
                    if d.get(key, _MISSING) is not value and d.get(key, _MISSING) != value:
                        d[key] = value
            if n in self.training:
                m.training = self.training[n]
            kept = self.hooks.get(n, {})
            for attr in _HOOK_ATTRS:
                h = d.get(attr)
                if not h:  # absent or empty: nothing was added
                    continue
                keep = set(kept.get(attr, ()))
                for key in [k for k in h if k not in keep]:
                    del h[key]
        for n, p in self.model.named_parameters():
            if n in self.requires_grad and p.requires_grad != self.requires_grad[n]:
                p.requires_grad_(self.requires_grad[n])

    def diff(self, other: ModelState) -> list[str]:
        """Differences between this snapshot and a later one, as readable strings."""
        out = []
        for n, rg in self.requires_grad.items():
            if other.requires_grad.get(n) != rg:
                out.append(f"requires_grad of {n}: {rg} -> {other.requires_grad.get(n)}")
        for n, t in self.training.items():
            if other.training.get(n) != t:
                out.append(f"training of module {n or '<root>'}: {t} -> {other.training.get(n)}")
        for n, hooks in self.hooks.items():
            if other.hooks.get(n) != hooks:
                out.append(f"hooks of module {n or '<root>'}: {hooks} -> {other.hooks.get(n)}")
        if self.values is not None and other.values is not None:
            for k, v in self.values.items():
                w = other.values.get(k)
                if w is None or w.shape != v.shape or not torch.equal(v, w):
                    out.append(f"value of {k} changed")
        for n, attrs in self.attrs.items():
            later = other.attrs.get(n, {})
            if attrs != later:
                changed = sorted(set(attrs) ^ set(later) | {k for k in attrs if k in later and attrs[k] != later[k]})
                out.append(f"attributes of module {n or '<root>'} changed: {changed}")
        if set(self.requires_grad) != set(other.requires_grad):
            out.append("the set of parameters changed")
        return out


@contextmanager
def preserve_model(model: nn.Module, *, eval_mode: bool = False) -> Iterator[nn.Module]:
    """Use ``model`` inside the block and leave its flags, hooks and buffers exactly as they were.

    Buffers are copied back only when some module is in train mode (where forwards update BatchNorm
    statistics); an eval-mode forward does not change them.

    Args:
        model: The caller's module.
        eval_mode: Switch the module to ``eval()`` for the duration of the block.

    Yields:
        The same module.
    """
    state = ModelState.capture(model)
    # in train mode, forwards update BatchNorm running statistics: keep a copy to put back
    saved = {n: b.detach().clone() for n, b in model.named_buffers()} if any_module_training(model) else None
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        state.restore()
        if saved is not None:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in saved and b.shape == saved[n].shape:
                        b.copy_(saved[n])


def iter_modules_of_type(model: nn.Module, types: type | tuple[type, ...]) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule of the given type(s), in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (CPU/float32 if it has none)."""
    for p in model.parameters():
        return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.get_default_dtype()
