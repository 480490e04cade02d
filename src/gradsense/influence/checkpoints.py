"""Checkpoints for TracIn-style sums and ensembles: state dicts or weight files, checked before any work.

A checkpoint is a ``state_dict`` (a mapping of names to tensors; a dict with a ``"state_dict"`` or ``"model"``
entry is unwrapped, and a ``"learning_rate"``/``"lr"`` entry is read as its TracIn weight) or a file:
``.safetensors`` or a ``torch.save`` state dict (``.pt``, ``.pth``, ``.bin``) read with
``torch.load(weights_only=True)``, so nothing is unpickled. The model at a checkpoint is a deep copy of the
caller's model with the checkpoint loaded (``strict=True``): the caller's model never changes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Checkpoint", "model_at", "resolve_checkpoints"]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: a label, its state (``None``: the model as it is) and its learning rate (or ``None``)."""

    label: str
    state: dict[str, Tensor] | None
    lr: float | None


def _unwrap(obj: Any, label: str) -> tuple[dict[str, Tensor], float | None]:
    lr = None
    if isinstance(obj, Mapping):
        for key in ("learning_rate", "lr"):
            if key in obj and isinstance(obj[key], (int, float, Tensor)):
                lr = float(obj[key])
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint {label}: expected a state dict (name -> tensor), got {type(obj).__name__}.")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"checkpoint {label} holds no tensors.")
    return state, lr


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects are refused by weights_only
            raise ValueError(
                f"checkpoint {path} could not be read as tensors with torch.load(weights_only=True) "
                f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); save a state_dict or use safetensors."
            ) from err
    raise ValueError(f"checkpoint {path}: unsupported file type {path.suffix!r}; use .safetensors or a .pt/.pth "
                     "state dict.")


def resolve_checkpoints(model: nn.Module, checkpoints: Sequence[Any] | None,
                        lrs: Sequence[float] | float | None = None) -> list[Checkpoint]:
    """Read and check every checkpoint against ``model`` (names and shapes) before any work.

    Args:
        model: The model the checkpoints belong to.
        checkpoints: ``None`` (the model as it is), or a sequence of state dicts / file paths.
        lrs: One learning rate per checkpoint, or one for all (overrides ``learning_rate`` entries).

    Returns:
        The checkpoints, in order.

    Raises:
        TypeError, ValueError, FileNotFoundError: An unreadable checkpoint, names or shapes that do not match
            the model, or learning rates that do not match the checkpoints.
    """
    items: list[Any] = [None] if checkpoints is None else list(checkpoints)
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        raise TypeError("checkpoints must be a list of state dicts or files (wrap a single one in a list).")
    if not items:
        raise ValueError("checkpoints is empty: give at least one state dict or file (or None for the model).")
    if lrs is None:
        rates: list[float | None] = [None] * len(items)
    elif isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
        rates = [float(lrs)] * len(items)
    else:
        rates = [float(v) for v in lrs]  # type: ignore[union-attr]
        if len(rates) != len(items):
            raise ValueError(f"lrs has {len(rates)} values for {len(items)} checkpoints; give one per checkpoint.")
    if any(r is not None and not math.isfinite(r) for r in rates):
        raise ValueError(f"lrs must be finite, got {rates}.")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    out = []
    for i, (item, rate) in enumerate(zip(items, rates)):
        if item is None:
            out.append(Checkpoint("model", None, rate))
            continue
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"state_dict[{i}]"
        raw = _load_file(Path(item)) if isinstance(item, (str, os.PathLike)) else item
        state, lr = _unwrap(raw, label)
        missing = [k for k in expected if k not in state]
        extra = [k for k in state if k not in expected]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
        if missing or extra or wrong:
            raise ValueError(
                f"checkpoint {label} does not fit {type(model).__name__}: missing {missing[:4]}, unexpected "
                f"{extra[:4]}, wrong shapes {wrong[:4]}."
            )
        out.append(Checkpoint(label, state, rate if rate is not None else lr))
    return out


def model_at(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """``model`` itself when the checkpoint has no state, else a deep copy with the checkpoint loaded."""
    if checkpoint.state is None:
        return model
    copied = copy.deepcopy(model)
    copied.load_state_dict(checkpoint.state, strict=True)  # copy_ casts to each tensor's own dtype and device
    return copied
