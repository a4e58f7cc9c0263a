"""Shape outlines and their masks: the polygon of every shape in a unit square, and `_shape_mask`, which
rasterises a shape once per (shape, pixel size, rotation) and reports its tight box and pixel area.

It knows nothing of scenes or specs; `spec` (which shapes exist, how large an object is drawn),
`generate` (object sizes for the layout) and `render` (the pixels) build on it.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------------
# Shapes: polygon outlines in a unit square, rasterised once per (shape, pixel size)


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + k * math.pi / n
        pts.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return pts


def _regular(n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (0.5 + 0.5 * math.cos(phase + 2 * math.pi * k / n), 0.5 + 0.5 * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


_T = 1 / 3  # cross arm width
_SHAPE_POINTS: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,
    "ring": None,
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "star": _star(),
    "cross": [
        (_T, 0),
        (1 - _T, 0),
        (1 - _T, _T),
        (1, _T),
        (1, 1 - _T),
        (1 - _T, 1 - _T),
        (1 - _T, 1),
        (_T, 1),
        (_T, 1 - _T),
        (0, 1 - _T),
        (0, _T),
        (_T, _T),
    ],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "hexagon": _regular(6, 0.0),
}


@cache
def _shape_mask(shape: str, px: int, rotation: int = 0) -> tuple[Image.Image, int, int, int]:
    """Binary mask cropped to its tight bbox, with (width, height, pixel area); `rotation` in degrees.

    Boxes come from the rasterised mask itself, so ground truth is exact whatever PIL does at edges.
    """
    turn = math.radians(rotation)
    side = math.ceil(px * (abs(math.cos(turn)) + abs(math.sin(turn)))) if rotation else px
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    e, pad = px - 1, (side - px) / 2
    if shape == "circle":
        d.ellipse((pad, pad, pad + e, pad + e), fill=255)
    elif shape == "ring":
        d.ellipse((pad, pad, pad + e, pad + e), fill=255)
        t = max(1, round(px * 0.22))
        if px - 2 * t >= 2:
            d.ellipse((pad + t, pad + t, pad + e - t, pad + e - t), fill=0)
    else:
        pts = _SHAPE_POINTS[shape]
        assert pts is not None
        if rotation:
            cos, sin, c = math.cos(turn), math.sin(turn), (side - 1) / 2
            # Turn counter-clockwise on screen (y grows downwards) about the canvas centre.
            pts = [(c + (x - 0.5) * e * cos + (y - 0.5) * e * sin, c - (x - 0.5) * e * sin + (y - 0.5) * e * cos)
                   for x, y in pts]
        else:
            pts = [(x * e, y * e) for x, y in pts]
        d.polygon(pts, fill=255)
    bbox = m.getbbox()
    if bbox is None:  # px too small to rasterise anything: fall back to a filled square
        m = Image.new("L", (px, px), 255)
        bbox = (0, 0, px, px)
    m = m.crop(bbox)
    area = int(np.count_nonzero(np.asarray(m)))
    return m, m.width, m.height, area
