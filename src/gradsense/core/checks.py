"""Argument checks shared by every entry point: one clear error before any work starts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "check_inputs",
    "check_positive_int",
    "check_scalar_loss",
    "draw_seed",
    "explain_model_errors",
]


def check_inputs(inputs: Any, *, name: str = "inputs", min_ndim: int = 2, needs_grad: bool = True) -> Tensor:
    """Check that ``inputs`` is a finite floating-point tensor with a batch dimension.

    Args:
        inputs: What the caller passed.
        name: Argument name used in messages.
        min_ndim: Minimum rank (batch dimension included).
        needs_grad: Whether gradients w.r.t. the inputs are needed (then integer dtypes are refused).

    Returns:
        The tensor.

    Raises:
        TypeError: Not a tensor, or an integer/bool tensor where gradients are needed.
        ValueError: Wrong rank, empty batch, NaN or Inf values.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with a batch dimension first, got {type(inputs).__name__}."
        )
    if inputs.ndim < min_ndim:
        raise ValueError(
            f"{name} must have a batch dimension first: expected at least {min_ndim} dimensions, got shape "
            f"{tuple(inputs.shape)}. For one example use x.unsqueeze(0)."
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0).")
    if needs_grad and not (inputs.is_floating_point() or inputs.is_complex()):
        raise TypeError(
            f"{name} has dtype {inputs.dtype}, but gradients need floating-point inputs. Convert with "
            ".float(), or for token ids attribute at the embedding layer (gradsense.attribution tokens)."
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        n_bad = int((~torch.isfinite(inputs)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN/Inf values; clean or impute them first.")
    return inputs


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _mismatch(model: nn.Module | None, inputs: Tensor) -> str | None:
    """Why floating-point ``inputs`` do not fit the model's parameters (dtype or device), or ``None``."""
    if model is None or not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        return None
    kinds = {(p.dtype, p.device) for p in model.parameters() if p.is_floating_point()}
    if len(kinds) != 1:
        return None
    ((dtype, device),) = kinds
    if inputs.dtype != dtype:
        return (
            f"inputs are {inputs.dtype} but the model's parameters are {dtype}; convert them with "
            f"inputs.to({dtype}) (or analyse a copy of the model converted with .to({inputs.dtype}))."
        )
    if inputs.device != device:
        return f"inputs are on {inputs.device} but the model's parameters are on {device}; move them with inputs.to('{device}')."
    return None


@contextmanager
def explain_model_errors(inputs: Tensor, what: str, model: nn.Module | None = None) -> Iterator[None]:
    """Turn a ``RuntimeError`` of the model's first forward into one clear error that names the inputs.

    Use it around the first forward an analysis runs (to check the target or the loss), so that inputs of
    the wrong shape give "the model failed on inputs of shape (16, 64)" and float64 inputs to a float32
    model give "inputs are torch.float64 but the model's parameters are torch.float32", rather than a
    traceback from inside a convolution. Nothing is checked before the forward: a model may cast its
    inputs itself. Out-of-memory errors pass through unchanged.

    Args:
        inputs: The inputs of that forward.
        what: The analysis, for the message.
        model: The module, to say when the inputs' dtype or device differs from its parameters'.

    Raises:
        TypeError: The forward failed and the inputs' dtype or device differs from the parameters'.
        ValueError: The forward failed otherwise (the original error is chained).
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        mismatch = _mismatch(model, inputs)
        if mismatch is not None:
            raise TypeError(f"{what}: {mismatch}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what}: the model failed on inputs of shape {tuple(inputs.shape)} ({inputs.dtype}): {first}. "
            "Check that the inputs have the shape and dtype the model expects."
        ) from err


def check_scalar_loss(value: Any) -> None:
    """Check that a loss function returned a floating-point 0-d tensor (the batch mean).

    Raises:
        ValueError: Anything else, with what to do.
    """
    if not isinstance(value, Tensor) or value.ndim != 0:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn must return a scalar (a 0-d tensor, the batch mean), got {got}. "
            "Use reduction='mean' or call .mean() on a per-example loss."
        )
    if not value.is_floating_point():
        raise ValueError(f"loss_fn must return a floating-point scalar, got dtype {value.dtype}.")


def draw_seed(seed: int | None) -> int:
    """The seed to use: ``seed`` itself, or one drawn from torch's global RNG when ``None``.

    Drawing from the global RNG keeps ``torch.manual_seed`` reproducibility, and the drawn seed is recorded
    in the result so that the run can be repeated exactly.

    Raises:
        TypeError: If ``seed`` is not an int or None.
    """
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}.")
    return seed
