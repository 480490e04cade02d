"""Capture layer activations and gradients in a context manager that always cleans up.

Forward hooks record a layer's output; when gradients are wanted, ``tensor.register_hook`` on that
output records its gradient during backward (module backward hooks are avoided: they misbehave with
in-place ops and multiple outputs). Every handle is removed on exit, also when the forward or the
backward raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Capture", "capture", "replace_output", "resolve_layers"]


@dataclass
class Capture:
    """What :func:`capture` recorded, by layer name.

    Attributes:
        activations: Layer outputs of the last forward pass (detached unless ``keep_graph=True``).
        gradients: Gradients of those outputs from the last backward pass.
    """

    activations: dict[str, Tensor] = field(default_factory=dict)
    gradients: dict[str, Tensor] = field(default_factory=dict)


def resolve_layers(model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]) -> dict[str, nn.Module]:
    """Turn layer names and/or module objects into ``{name: module}``.

    Raises:
        ValueError: A name that is not a submodule, or a module that is not part of ``model``.
    """
    items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    if not items:
        raise ValueError("no layer given: name at least one submodule.")
    by_name = dict(model.named_modules())
    by_id = {id(m): n for n, m in by_name.items()}
    out: dict[str, nn.Module] = {}
    for item in items:
        if isinstance(item, str):
            if item not in by_name:
                names = [n for n in by_name if n][:12]
                raise ValueError(f"layer {item!r} is not a submodule of {type(model).__name__}; some names: {names}.")
            out[item] = by_name[item]
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"layer {type(item).__name__} is not a submodule of this model.")
            out[by_id[id(item)] or "<root>"] = item
        else:
            raise TypeError(f"layers must be names or nn.Modules, got {type(item).__name__}.")
    return out


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor):
                return o
    return None


@contextmanager
def capture(
    model: nn.Module,
    layers: str | nn.Module | Sequence[str | nn.Module],
    *,
    gradients: bool = True,
    keep_graph: bool = False,
) -> Iterator[Capture]:
    """Record the outputs (and their gradients) of ``layers`` while the block runs.

    Args:
        model: The module.
        layers: Layer name(s) (as in ``model.named_modules()``) or submodule object(s).
        gradients: Also record the gradient of each output during backward.
        keep_graph: Keep activations attached to the autograd graph (to differentiate through them).

    Yields:
        A :class:`Capture` filled during forward/backward passes inside the block.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> with capture(net, "0") as cap:
        ...     net(torch.randn(2, 3)).sum().backward()
        >>> cap.activations["0"].shape, cap.gradients["0"].shape
        (torch.Size([2, 4]), torch.Size([2, 4]))
    """
    targets = resolve_layers(model, layers)
    cap = Capture()
    handles: list[Any] = []

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            # keep_graph: the graph tensor itself, so callers can differentiate w.r.t. it; otherwise a
            # copy, since an in-place op after the layer (ReLU(inplace=True)) would overwrite a view
            cap.activations[name] = t if keep_graph else t.detach().clone()
            if gradients and t.requires_grad:

                def store(g: Tensor) -> None:
                    cap.gradients[name] = g.detach()

                handles.append(t.register_hook(store))

        return hook

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield cap
    finally:
        for h in handles:
            h.remove()


@contextmanager
def replace_output(module: nn.Module, fn: Any) -> Iterator[None]:
    """Inside the block, ``module``'s output is replaced by ``fn(output)`` (a forward hook).

    Used to feed chosen embeddings into a model at its embedding layer. The hook is removed on exit,
    also when the block raises.
    """
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()
