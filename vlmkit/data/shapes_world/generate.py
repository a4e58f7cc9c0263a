"""Scene generation: `generate_scene` samples scene ``index`` of dataset ``seed`` from a `SceneSpec` (objects
under the pair co-occurrence prior of `cooccurrence_score`, their sizes and turns, a layout without
overlap or with bounded occlusion, a background). Every random draw derives from ``(seed, index)``
through `_derive_seed`, so a scene never depends on the order scenes are generated in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from functools import cache
from typing import Any

from vlmkit.data.shapes_world.shapes import _shape_mask
from vlmkit.data.shapes_world.spec import _PLAIN_RGB, VERSION, Scene, SceneObject, SceneSpec, drawn_px

# --------------------------------------------------------------------------------------------------
# Scene generation


def _derive_seed(seed: int, index: int, salt: str) -> int:
    # Hash-based so scenes are independent of generation order and of PYTHONHASHSEED.
    h = hashlib.blake2b(f"{VERSION}|{seed}|{index}|{salt}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


@cache
def _ring_neighbours(names: tuple[str, ...]) -> dict[str, frozenset[str]]:
    # Cyclic neighbours in the given order; a list of one or two names has no / one neighbour.
    n = len(names)
    return {
        x: frozenset(names[(i + d) % n] for d in (-1, 1) if n > 1 and (i + d) % n != i)
        for i, x in enumerate(names)
    }


def _score(
    pair: tuple[str, str],
    present: Iterable[tuple[str, str]],
    colors: tuple[str, ...],
    shapes: tuple[str, ...],
) -> float:
    # Neighbours on the colour wheel and neighbouring shapes in the shape list "go together".
    cn = _ring_neighbours(colors).get(pair[0], frozenset())
    sn = _ring_neighbours(shapes).get(pair[1], frozenset())
    return float(sum((p[0] in cn) + (p[1] in sn) for p in present))


def cooccurrence_score(pair: tuple[str, str], present: Iterable[tuple[str, str]], spec: SceneSpec) -> float:
    """How strongly the generator's prior associates ``pair`` with the ``present`` (colour, shape) pairs.

    A pair scores 1 per present object whose colour is its neighbour in ``spec.palette`` order (the
    colour wheel by default) plus 1 per present object whose shape is its neighbour in ``spec.shapes``
    (cyclic). Sampling weight of a new object is ``1 + spec.cooccurrence * score``; the "popular"
    negatives of exists questions are absent pairs with the highest score.
    """
    return _score(pair, present, spec.colors, spec.shapes)


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _occluded_fraction(under: tuple[int, int, int, int], over: tuple[int, int, int, int]) -> float:
    iw = min(under[2], over[2]) - max(under[0], over[0])
    ih = min(under[3], over[3]) - max(under[1], over[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((under[2] - under[0]) * (under[3] - under[1]))


def _layout(
    dims: list[tuple[int, int]], spec: SceneSpec, rng: random.Random
) -> list[tuple[int, int, int, int]] | None:
    """Rejection-sample positions (objects in the given order); None if no layout was found."""
    s, gap = spec.image_size, spec.min_gap
    for _restart in range(30):
        boxes: list[tuple[int, int, int, int]] = []
        for w, h in dims:
            for _try in range(60):
                x, y = rng.randint(0, s - w), rng.randint(0, s - h)
                box = (x, y, x + w, y + h)
                if spec.allow_overlap:
                    ok = all(_occluded_fraction(b, box) <= spec.max_occlusion for b in boxes)
                else:
                    ok = all(_separated(box, b, gap) for b in boxes)
                if ok:
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(dims):
            return boxes
    return None


def _grid_layout(
    dims: list[tuple[int, int]], spec: SceneSpec, rng: random.Random
) -> list[tuple[int, int, int, int]] | None:
    # Fallback: one object per grid cell, jittered inside it; cells are >= largest object + gap (always
    # enough cells for plainly drawn objects, see SceneSpec._validate).
    s, gap = spec.image_size, spec.min_gap
    g = spec._grid_cells(s, max(max(d) for d in dims))
    if g * g < len(dims):
        return None
    edges = [k * (s + gap) // g for k in range(g + 1)]
    boxes = []
    for (w, h), cell in zip(dims, rng.sample(range(g * g), len(dims))):
        cx, cy = cell % g, cell // g
        x = rng.randint(edges[cx], edges[cx + 1] - gap - w)
        y = rng.randint(edges[cy], edges[cy + 1] - gap - h)
        boxes.append((x, y, x + w, y + h))
    return boxes


def _sample_background(spec: SceneSpec, rng: random.Random) -> dict[str, Any]:
    if not spec.backgrounds:
        return {"kind": "plain", "rgb": list(_PLAIN_RGB)}
    kind = rng.choice(spec.background_kinds)
    level = rng.randint(*spec.background_levels)
    rgb = [min(250, level + rng.randint(-6, 6)) for _ in range(3)]  # light neutral, faint tint
    bg: dict[str, Any] = {"kind": kind, "rgb": rgb}
    k = spec.background_contrast
    if kind.startswith("gradient"):
        bg["delta"] = round(rng.choice((-1, 1)) * rng.uniform(12, 28) * k, 2)
    elif kind == "noise":
        bg["amplitude"] = round(rng.uniform(4, 9) * k, 2)
        bg["noise_seed"] = rng.getrandbits(32)
    elif kind == "stripes":
        bg["period"] = rng.randint(4, 9)
        bg["amplitude"] = round(rng.uniform(6, 12) * k, 2)
        bg["orientation"] = rng.choice(("vertical", "horizontal", "diagonal"))
    return bg


def generate_scene(index: int, seed: int = 0, spec: SceneSpec | None = None) -> Scene:
    """Sample scene ``index`` of dataset ``seed``; depends only on (seed, index, spec)."""
    spec = spec or SceneSpec()
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(_derive_seed(seed, index, "scene"))
    allowed = spec.allowed_pairs()
    n_obj = rng.randint(spec.min_objects, spec.max_objects)
    chosen: list[tuple[str, str]] = []
    if spec.require_pairs:
        chosen.append(rng.choice(sorted(spec.require_pairs - spec.exclude_pairs)))
    while len(chosen) < n_obj:
        cands = [p for p in allowed if p not in chosen]
        weights = [1.0 + spec.cooccurrence * cooccurrence_score(p, chosen, spec) for p in cands]
        chosen.append(rng.choices(cands, weights)[0])
    rng.shuffle(chosen)
    size_names = list(spec.sizes)
    sizes = [rng.choice(size_names) for _ in chosen]
    # Drawing variation draws from the generator only when asked for, so plain specs keep their scenes.
    scales = [round(rng.uniform(1 - spec.size_jitter, 1 + spec.size_jitter), 2) if spec.size_jitter else 1.0
              for _ in chosen]
    turns = [rng.randint(-spec.max_rotation, spec.max_rotation) if spec.max_rotation else 0 for _ in chosen]
    dims = [_shape_mask(p[1], drawn_px(spec, z, k), r)[1:3] for p, z, k, r in zip(chosen, sizes, scales, turns)]
    # Place (and draw) big objects first: easier packing, and small ones stay visible under occlusion.
    order = sorted(range(len(chosen)), key=lambda i: -dims[i][0] * dims[i][1])
    dims_sorted = [dims[i] for i in order]
    boxes = _layout(dims_sorted, spec, rng) or _grid_layout(dims_sorted, spec, rng)
    if boxes is None and (spec.size_jitter or spec.max_rotation):
        # Rarely, grown or turned objects do not fit: this scene draws them plainly.
        scales, turns = [1.0] * len(chosen), [0] * len(chosen)
        dims_sorted = [_shape_mask(chosen[i][1], spec.size_px(sizes[i]))[1:3] for i in order]
        boxes = _layout(dims_sorted, spec, rng) or _grid_layout(dims_sorted, spec, rng)
    if boxes is None:
        raise RuntimeError(
            f"could not place {len(chosen)} objects in a {spec.image_size} px image; "
            "raise max_occlusion, lower max_objects or use smaller sizes"
        )
    objects = tuple(SceneObject(chosen[i][1], chosen[i][0], sizes[i], b, scales[i], turns[i])
                    for i, b in zip(order, boxes))
    bg = _sample_background(spec, rng)
    return Scene(index, seed, spec.image_size, spec.image_size, objects, bg)
