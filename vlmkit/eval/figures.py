"""PNG figures for reports, drawn with matplotlib's Agg canvas (no pyplot global state, no display)."""

from __future__ import annotations

import io
from typing import Any


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of `width` x `height` inches; a clear error if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'vlmkit[report]'") from err
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def to_png(figure: Any, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
