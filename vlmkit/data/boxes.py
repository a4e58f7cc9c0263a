"""Boxes in text: pixel boxes to and from the ``[0, 1000]`` ``<box>x1,y1,x2,y2</box>`` form, and IoU.

Pixel boxes are ``(x1, y1, x2, y2)`` ints with exclusive ``x2``/``y2`` (PIL ``getbbox`` convention): the
object covers columns ``x1..x2-1`` and rows ``y1..y2-1``. In text, boxes are normalised to ``[0, 1000]``
as ``round(v / size * 1000)`` and written ``<box>x1,y1,x2,y2</box>``. The shapes-world generator writes
boxes this way (`vlmkit.data.shapes_world`) and evaluation parses and scores them (`vlmkit.eval.metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["box_iou", "denormalize_box", "format_box", "normalize_box", "parse_box"]


def normalize_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box -> ints in [0, 1000]."""
    x1, y1, x2, y2 = box
    return (
        round(x1 / width * 1000),
        round(y1 / height * 1000),
        round(x2 / width * 1000),
        round(y2 / height * 1000),
    )


def denormalize_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """[0, 1000] box -> pixel coordinates (floats)."""
    x1, y1, x2, y2 = box
    return (x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000)


def format_box(box: Sequence[int]) -> str:
    return "<box>" + ",".join(str(int(v)) for v in box) + "</box>"


_BOX_RE = re.compile(r"<box>\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*</box>")


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """First ``<box>x1,y1,x2,y2</box>`` in ``text`` as ints (spaces tolerated), else None."""
    m = _BOX_RE.search(text or "")
    if m is None:
        return None
    x1, y1, x2, y2 = (int(g) for g in m.groups())
    return (x1, y1, x2, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes (any common unit); 0.0 for empty or disjoint boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = max(0, a[2] - a[0]) * max(0, a[3] - a[1]) + max(0, b[2] - b[0]) * max(0, b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
