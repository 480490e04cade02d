"""Figures (matplotlib) and the self-contained HTML report.

- :mod:`gradsense.viz.figures`: ``attribution_grid``, ``token_heatmap``, ``bar_chart``,
  ``line_chart`` return :class:`matplotlib.figure.Figure` objects without touching pyplot state;
  ``fig_to_png`` renders one to PNG bytes.
- :mod:`gradsense.viz.report`: :class:`Report`, one HTML file with inline CSS and embedded PNGs,
  every user string escaped.
"""

from gradsense.viz.figures import (
    attribution_grid,
    bar_chart,
    close_figure,
    fig_to_png,
    line_chart,
    token_heatmap,
)
from gradsense.viz.report import Report, slugify

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
