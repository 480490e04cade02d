"""Loss functions with the ``(output, labels) -> scalar`` signature analyses expect.

They accept ``reduction=`` like torch's, so :class:`gradsense.targets.Loss` can ask for one value per
example.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "mse"]


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def cross_entropy(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits ``(N, C)`` against class indices ``(N,)``."""
    return F.cross_entropy(_logits(output), labels, reduction=reduction)


def mse(output: Any, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error (labels cast to the output's dtype and shape)."""
    out = _logits(output)
    target = labels.to(out.dtype).reshape(out.shape)
    if reduction == "mean":  # sum / numel: F.mse_loss's mean breaks forward-over-reverse AD (pytorch#123996)
        return F.mse_loss(out, target, reduction="sum") / out.numel()
    return F.mse_loss(out, target, reduction=reduction)
