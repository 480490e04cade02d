"""Kept for old imports: image and tensor reading moved to :mod:`gradsense.io`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from gradsense.io.data import IMAGE_SUFFIXES, TENSOR_SUFFIXES
from gradsense.io.data import load_images as _load_images

__all__ = ["IMAGE_SUFFIXES", "TENSOR_SUFFIXES", "load_images"]


def load_images(paths: Sequence[str | Path], shape: Sequence[int], *, invert: bool | None = None) -> Tensor:
    """:func:`gradsense.io.load_images` with the single-file default: dark-on-light grayscale is inverted."""
    return _load_images(paths, shape, invert=invert)
