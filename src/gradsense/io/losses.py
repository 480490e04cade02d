"""Naming a loss: ``cross_entropy``, ``mse``, ``bce`` or a function in a file or module (``file.py:fn``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gradsense.core.losses import bce, cross_entropy, mse

__all__ = ["LOSSES", "bce", "load_loss"]


LOSSES: dict[str, Callable[..., Tensor]] = {"cross_entropy": cross_entropy, "mse": mse, "bce": bce}


def load_loss(spec: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The loss ``(output, labels) -> scalar`` named by ``spec``.

    Args:
        spec: ``"cross_entropy"``, ``"mse"``, ``"bce"`` (on logits), ``"path/to/file.py:fn"`` or
            ``"package.module:fn"`` (a function ``(output, labels) -> batch-mean scalar``), or a callable.

    Returns:
        The loss function.

    Raises:
        ValueError: An unknown name, or a spec whose function cannot be found.
        FileNotFoundError: A missing file.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or 'file.py:function'; got {spec!r}.")
    name = spec.strip()
    key = name.lower().replace("-", "_")
    aliases = {"ce": "cross_entropy", "crossentropy": "cross_entropy", "bce_with_logits": "bce",
               "binary_cross_entropy": "bce", "l2": "mse"}
    key = aliases.get(key, key)
    if key in LOSSES:
        return LOSSES[key]
    if ":" not in name:
        raise ValueError(f"unknown loss {spec!r}; use one of {sorted(LOSSES)} or 'path/to/file.py:function'.")
    from gradsense.io.models import load_callable

    return load_callable(name, "loss")
