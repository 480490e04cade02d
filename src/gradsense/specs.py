"""Model specifications used by the CLI and scripts: ``zoo:NAME``, ``file.py:factory``, ``pkg.mod:factory``.

A factory is a callable with no required arguments that returns an ``nn.Module``. Weights can come
from a safetensors file (``weights=``) loaded with ``strict=True`` after the factory builds the model.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model"]


def _from_file(path: Path, factory: str) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (from model spec '{path}:{factory}').")
    mod_name = f"_gradsense_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise ValueError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def load_model(spec: str, *, weights: str | Path | None = None) -> nn.Module:
    """Build a model from a spec string.

    Args:
        spec: ``zoo:NAME`` (a bundled model), ``path/to/file.py:factory`` or ``package.module:factory``.
        weights: Optional safetensors file whose tensors are loaded into the model (``strict=True``).

    Returns:
        The model (zoo models in eval mode; user models as the factory returns them).

    Raises:
        ValueError: A malformed spec, unknown zoo name, missing or non-callable factory, a factory
            that does not return an nn.Module, or weights that do not fit.
        FileNotFoundError: A missing model or weights file.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("model spec must be a non-empty string like 'zoo:digits-cnn' or 'model.py:make_model'.")
    if spec.startswith("zoo:"):
        from gradsense import zoo

        model = zoo.load(spec[4:])
    else:
        if ":" not in spec:
            raise ValueError(
                f"model spec {spec!r} not understood; use 'zoo:NAME', 'path/to/file.py:factory' or "
                "'package.module:factory'."
            )
        target, factory_name = spec.rsplit(":", 1)
        if target.endswith(".py") or "/" in target or "\\" in target:
            module = _from_file(Path(target), factory_name)
        else:
            try:
                module = importlib.import_module(target)
            except ImportError as err:
                raise ValueError(f"cannot import module {target!r} from model spec {spec!r}: {err}") from err
        factory = getattr(module, factory_name, None)
        if factory is None:
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise ValueError(f"{target} has no attribute {factory_name!r}; callables there: {public[:12]}.")
        if not callable(factory):
            raise ValueError(f"{target}:{factory_name} is not callable.")
        if isinstance(factory, nn.Module):
            model = factory
        else:
            try:
                model = factory()
            except Exception as err:
                raise ValueError(
                    f"calling {target}:{factory_name}() failed ({type(err).__name__}: {err}); a factory must "
                    "build the model with no arguments."
                ) from err
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{target}:{factory_name}() returned {type(model).__name__}, expected a torch.nn.Module."
            )
    if weights is not None:
        from safetensors.torch import load_file

        wpath = Path(weights)
        if not wpath.is_file():
            raise FileNotFoundError(f"weights file {wpath} does not exist.")
        state = load_file(str(wpath))
        missing, unexpected = _diff_keys(model, state)
        if missing or unexpected:
            raise ValueError(
                f"weights {wpath} do not fit {type(model).__name__}: missing {missing[:6]}, unexpected {unexpected[:6]}."
            )
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
    return model


def _diff_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)
