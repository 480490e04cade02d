"""Figures (matplotlib) and the self-contained HTML report.

- :mod:`gradsense.viz.figures`: ``attribution_grid``, ``token_heatmap``, ``bar_chart``,
  ``line_chart`` return :class:`matplotlib.figure.Figure` objects without touching pyplot state;
  ``fig_to_png`` renders one to PNG bytes.
- :mod:`gradsense.viz.report`: :class:`Report`, one HTML file with inline CSS and embedded PNGs,
  every user string escaped.
- :mod:`gradsense.viz.text`: how numbers are recognised so that tables never break them.

Names are imported on first use, so ``gradsense.viz.text`` does not import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Report",
    "attribution_grid",
    "bar_chart",
    "close_figure",
    "fig_to_png",
    "line_chart",
    "slugify",
    "token_heatmap",
]

_WHERE = {"Report": "report", "slugify": "report"}

if TYPE_CHECKING:
    from gradsense.viz.figures import (
        attribution_grid,
        bar_chart,
        close_figure,
        fig_to_png,
        line_chart,
        token_heatmap,
    )
    from gradsense.viz.report import Report, slugify


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(f"gradsense.viz.{_WHERE.get(name, 'figures')}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradsense.viz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
