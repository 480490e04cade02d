"""Kept for old imports: model specs moved to :mod:`gradsense.io` (``gs.load_model``)."""

from gradsense.io.models import load_model

__all__ = ["load_model"]
