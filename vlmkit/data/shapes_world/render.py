"""Rendering: `render_scene` draws a `Scene` as an RGB image, its background (plain, gradient, noise or
stripes, from the scene's background parameters) and then every object's mask in its exact palette
colour (no anti-aliasing), checking that each box matches the size the spec draws it at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from vlmkit.data.shapes_world.shapes import _SHAPE_POINTS
from vlmkit.data.shapes_world.spec import _PLAIN_RGB, BACKGROUND_KINDS, Scene, SceneSpec

# --------------------------------------------------------------------------------------------------
# Rendering


def _background_array(bg: Mapping[str, Any], width: int, height: int) -> np.ndarray:
    base = np.asarray(bg.get("rgb", _PLAIN_RGB), dtype=np.float32)
    kind = bg.get("kind", "plain")
    if kind == "plain":
        return np.broadcast_to(base.astype(np.uint8), (height, width, 3)).copy()
    if kind in ("gradient_v", "gradient_h"):
        n = height if kind == "gradient_v" else width
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32) * float(bg["delta"])
        ramp = ramp[:, None] if kind == "gradient_v" else ramp[None, :]
        shade = np.broadcast_to(ramp, (height, width))
    elif kind == "noise":
        g = np.random.default_rng(int(bg["noise_seed"]))
        shade = g.uniform(-1.0, 1.0, size=(height, width)).astype(np.float32) * float(bg["amplitude"])
    elif kind == "stripes":
        yy, xx = np.mgrid[0:height, 0:width]
        coord = {"vertical": xx, "horizontal": yy}.get(bg["orientation"], xx + yy)
        on = (coord // max(1, int(bg["period"]) // 2)) % 2
        shade = (on.astype(np.float32) - 0.5) * float(bg["amplitude"])
    else:
        raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUND_KINDS}")
    arr = base[None, None, :] + shade[:, :, None]
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, spec: SceneSpec | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image (no anti-aliasing, so object pixels are exactly the palette colour)."""
    # Rendering ignores layout limits, so the fallback spec must not reject small images.
    spec = spec or SceneSpec(image_size=scene.width, max_objects=1)
    img = Image.fromarray(_background_array(scene.background, scene.width, scene.height), "RGB")
    for o in scene.objects:
        if o.color not in spec.palette or o.size not in spec.sizes or o.shape not in _SHAPE_POINTS:
            raise ValueError(
                f"object {o.size} {o.name} is not drawable with this spec (palette/sizes/shapes)"
            )
        mask, w, h, _ = o.mask(spec)
        if (o.box[2] - o.box[0], o.box[3] - o.box[1]) != (w, h):
            raise ValueError(
                f"box of the {o.name} does not match size {o.size!r}; render with the generating spec"
            )
        img.paste(spec.palette[o.color], o.box, mask)
    return img
