"""Reading weights and tensor files without ever unpickling: safetensors, ``.pt``/``.pth`` via ``weights_only``.

``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers (dict, list, tuple, str,
numbers); a file that needs any other class (a pickled ``nn.Module``, an optimizer, a custom object, or a
payload whose ``__reduce__`` would run code) is refused by torch's restricted unpickler before anything is
executed, and the refusal is turned into one clear error here.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WEIGHT_SUFFIXES", "load_into", "read_state_dict", "read_torch_file"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights")


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file.")


def read_torch_file(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True`` (tensors and plain containers only).

    Args:
        path: A ``.pt``/``.pth``/``.bin`` file.
        what: What the file is, for messages (e.g. ``"weights file"``).

    Returns:
        What was saved: a tensor, or dicts/lists/tuples of tensors, numbers and strings.

    Raises:
        FileNotFoundError: A missing file.
        ValueError: A file that is not a torch.save file, or one that holds pickled objects other than
            tensors and plain containers (nothing in it is executed).
    """
    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip().removeprefix("WeightsUnpickler error: ") for line in str(err).splitlines()
                 if "unsupported global" in line.lower() or "unsupported class" in line.lower()]
        if not found:  # the restricted unpickler met bytes that are no pickle at all
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{what} {path} is not a readable torch.save file ({first}).") from None
        raise ValueError(
            f"{what} {path} holds pickled Python objects, not only tensors ({found[0]}); gradsense never unpickles "
            "(that can run code), and nothing in the file was run. Save a state dict "
            "(torch.save(model.state_dict(), path)) or convert it to .safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what} {path} is not a readable torch.save file: {first}.") from None


def _state_from(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside what a ``.pt`` file held: the dict itself or a checkpoint's ``state_dict``/``model``."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return {str(k): v for k, v in inner.items()}
        keys = sorted(str(k) for k in obj)[:8]
        raise ValueError(
            f"weights file {path} is a dict without a state dict (keys {keys}); expected parameter names -> tensors, "
            f"or a checkpoint with one of the keys {list(CHECKPOINT_KEYS)} holding them."
        )
    raise ValueError(
        f"weights file {path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead."
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file (``weights_only=True``).

    A checkpoint dict whose ``state_dict``/``model_state_dict``/``model``/``module`` entry is the state dict is
    understood; a ``module.`` prefix left by ``DataParallel``/DDP is kept (see :func:`load_into`).

    Args:
        path: The weights file.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        FileNotFoundError: A missing file.
        ValueError: An unknown suffix, an unreadable file, pickled objects, or no state dict inside.
    """
    path = Path(path)
    _check_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights file {path} is not a readable safetensors file: {err}.") from None
    if suffix in (".pt", ".pth", ".bin"):
        return _state_from(read_torch_file(path, "weights file"), path)
    raise ValueError(
        f"weights file {path}: unknown format {suffix or '(no suffix)'!r}; give a .safetensors file or a "
        ".pt/.pth state dict (torch.save(model.state_dict(), path))."
    )


def load_into(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, after one clear check that every key and shape fits.

    A ``module.`` prefix on every key (``DataParallel``/DDP checkpoints) is removed when the model has no such
    prefix. Tensors are copied into the model's existing parameters (dtype and device follow the model).

    Raises:
        ValueError: Missing or unexpected keys, or shapes that differ (the message lists a few of each).
    """
    own = model.state_dict()
    state = dict(state)
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}" + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}" + (f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else ""))
        if shapes:
            parts.append("shapes differ: " + "; ".join(shapes[:4]))
        raise ValueError(f"weights {source} do not fit {type(model).__name__}: {', '.join(parts)}.")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
