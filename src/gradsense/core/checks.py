"""Argument checks shared by every entry point: one clear error before any work starts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_inputs", "check_positive_int"]


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
