"""Shapes-world distribution shifts with levels 0-5, built from fresh scenes with exact ground truth.

Each shift turns ``(base spec, level, index, seed)`` into a `ShiftedScene`: the scene (ground truth),
its rendered image and the `SceneSpec` to ask questions with. Level 0 is always the plain scene of
the base spec, so every shift shares one baseline; higher levels move further from training data:

- ``unseen_colors``: a growing share of objects (each with probability level/5) is recoloured with
  colours never seen in training (`EXTRA_COLORS`); level 5 recolours every object.
- ``crowded``: objects are generated in a corner square of shrinking side (100% down to 45% of the
  image) and may overlap ("stacked"), each earlier object at most half covered by any later one.
- ``occlusion``: neutral grey bars (not a palette colour, never asked about) cover a growing band of
  every object's box (up to 60% of its height or width).
- ``tiny_objects`` / ``huge_objects``: object sizes scaled by 0.3-0.8x / 1.25-2.5x; with huge objects
  fewer fit, so ``max_objects`` is lowered to what a non-overlapping layout can hold.

All randomness derives from ``(seed, index)``, so a shifted scene can be regenerated exactly.
`SCENE_SHIFTS` is the registry, keyed by the name that appears in reports.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.data.shapes_world import (
    EXTRA_COLORS,
    QA,
    Scene,
    SceneSpec,
    generate_scene,
    questions_for_scene,
    render_scene,
)

MAX_LEVEL = 5
OCCLUDER_RGB = (128, 128, 128)
_RETRY_STRIDE = 1_000_003  # scene-index offset between layout attempts (keeps attempts independent)
_MIN_VISIBLE = 0.3  # crowded scenes: every object keeps at least this share of its pixels visible

__all__ = ["MAX_LEVEL", "OCCLUDER_RGB", "SCENE_SHIFTS", "ShiftedScene", "shifted_scene", "visible_fractions"]


@dataclass(frozen=True)
class ShiftedScene:
    scene: Scene
    image: Image.Image
    spec: SceneSpec  # draws the scene and supplies the question vocabulary

    def questions(self, negative_pairs: list[tuple[str, str]], first_negative: str) -> list[QA]:
        """One question per type (two for ``exists``: a present and an absent object), as in the
        dataset files; absent objects are drawn from ``negative_pairs``."""
        rng = random.Random(f"stress-qa|{self.scene.seed}|{self.scene.index}")
        return questions_for_scene(self.scene, rng, self.spec, max_per_type=1, negative_pairs=negative_pairs,
                                   first_negative=first_negative)


def _rng(seed: int, index: int, salt: str) -> random.Random:
    return random.Random(f"{salt}|{seed}|{index}")  # str seeds hash with SHA-512: stable across runs


def _plain(base: SceneSpec, index: int, seed: int) -> ShiftedScene:
    scene = generate_scene(index, seed, base)
    return ShiftedScene(scene, render_scene(scene, base), base)


def unseen_colors(base: SceneSpec, level: int, index: int, seed: int) -> ShiftedScene:
    plain = _plain(base, index, seed)
    if level == 0:  # also the question vocabulary of the plain scene (no unseen colour words)
        return plain
    spec = replace(base, palette={**base.palette, **{k: v for k, v in EXTRA_COLORS.items() if k not in base.palette}})
    new_colors = [c for c in EXTRA_COLORS if c not in base.palette]
    if not new_colors:
        raise ValueError("unseen_colors needs a base palette without the EXTRA_COLORS; all of them are in it")
    rng = _rng(seed, index, "recolor")
    # Draw every object's coin and colour whatever the level, so levels are nested (k+1 recolours a superset).
    draws = [(rng.random(), rng.choice(new_colors)) for _ in plain.scene.objects]
    taken = {o.pair for o in plain.scene.objects}
    objects = []
    for obj, (coin, color) in zip(plain.scene.objects, draws):
        if coin < level / MAX_LEVEL:
            # Each (colour, shape) pair appears at most once per scene: step to the next free new colour.
            options = new_colors[new_colors.index(color):] + new_colors[: new_colors.index(color)]
            color = next((c for c in options if (c, obj.shape) not in taken), obj.color)
            taken.add((color, obj.shape))
            obj = replace(obj, color=color)
        objects.append(obj)
    scene = replace(plain.scene, objects=tuple(objects))
    return ShiftedScene(scene, render_scene(scene, spec), spec)


def crowded(base: SceneSpec, level: int, index: int, seed: int) -> ShiftedScene:
    if level == 0:
        return _plain(base, index, seed)
    side = base.image_size
    largest = max(base.size_px(k) for k in base.sizes)
    region = max(16, largest + 1, round(side * (1.0, 0.8, 0.68, 0.6, 0.52, 0.45)[level]))
    # Same pixel sizes on a smaller canvas, overlap allowed: the generator packs (stacks) them in it.
    small = replace(base, image_size=region, allow_overlap=True, max_occlusion=0.5,
                    sizes={k: base.size_px(k) / region for k in base.sizes})
    rng = _rng(seed, index, "corner")
    dx, dy = rng.choice([(0, 0), (side - region, 0), (0, side - region), (side - region, side - region)])
    for attempt in range(50):
        try:
            packed = generate_scene(index + attempt * _RETRY_STRIDE, seed, small)
        except RuntimeError:  # no layout found in the small square: try the next candidate scene
            continue
        objects = tuple(replace(o, box=(o.box[0] + dx, o.box[1] + dy, o.box[2] + dx, o.box[3] + dy))
                        for o in packed.objects)
        scene = Scene(index, seed, side, side, objects, packed.background)
        if min(visible_fractions(scene, base)) >= _MIN_VISIBLE:
            return ShiftedScene(scene, render_scene(scene, base), base)
    raise RuntimeError(f"crowded level {level}: no scene with visible objects found for index {index}")


def occlusion(base: SceneSpec, level: int, index: int, seed: int) -> ShiftedScene:
    plain = _plain(base, index, seed)
    cover = (0.0, 0.12, 0.24, 0.36, 0.48, 0.6)[level]
    rng = _rng(seed, index, "occluders")
    # Orientation and centre per object are drawn at every level, so bars only thicken with the level.
    bars = [(rng.random() < 0.5, rng.uniform(0.3, 0.7)) for _ in plain.scene.objects]
    image = plain.image.copy()
    draw = ImageDraw.Draw(image)
    for obj, (horizontal, centre) in zip(plain.scene.objects, bars):
        x1, y1, x2, y2 = obj.box
        extent = (y2 - y1) if horizontal else (x2 - x1)
        thickness = round(cover * extent)
        if thickness == 0:
            continue
        start = round(centre * extent - thickness / 2)
        start = min(max(start, 0), extent - thickness)
        if horizontal:
            draw.rectangle((x1, y1 + start, x2 - 1, y1 + start + thickness - 1), fill=OCCLUDER_RGB)
        else:
            draw.rectangle((x1 + start, y1, x1 + start + thickness - 1, y2 - 1), fill=OCCLUDER_RGB)
    return ShiftedScene(plain.scene, image, base)


def _scaled(base: SceneSpec, factor: float) -> SceneSpec:
    side = base.image_size
    by_size = sorted(base.sizes, key=base.sizes.get)
    # Pixel sizes scaled, but at least 3, 4, ... px in size order so the classes stay drawable and distinct.
    px = {k: min(side, max(3 + rank, round(base.size_px(k) * factor))) for rank, k in enumerate(by_size)}
    most = base.max_objects
    if not base.allow_overlap:  # no more objects than a non-overlapping grid of the largest size holds
        cells = (side + base.min_gap) // (max(px.values()) + base.min_gap)
        most = max(1, min(most, cells * cells))
    return replace(base, sizes={k: v / side for k, v in px.items()}, max_objects=most,
                   min_objects=min(base.min_objects, most))


def tiny_objects(base: SceneSpec, level: int, index: int, seed: int) -> ShiftedScene:
    spec = base if level == 0 else _scaled(base, (1.0, 0.8, 0.65, 0.5, 0.4, 0.3)[level])
    return _plain(spec, index, seed)


def huge_objects(base: SceneSpec, level: int, index: int, seed: int) -> ShiftedScene:
    spec = base if level == 0 else _scaled(base, (1.0, 1.25, 1.5, 1.75, 2.0, 2.5)[level])
    return _plain(spec, index, seed)


SceneShift = Callable[[SceneSpec, int, int, int], ShiftedScene]
SCENE_SHIFTS: dict[str, SceneShift] = {
    "unseen_colors": unseen_colors,
    "crowded": crowded,
    "occlusion": occlusion,
    "tiny_objects": tiny_objects,
    "huge_objects": huge_objects,
}


def shifted_scene(name: str, level: int, index: int, seed: int = 0, base: SceneSpec | None = None) -> ShiftedScene:
    """Scene ``index`` of dataset ``seed`` under shift ``name`` at ``level`` (0 = the plain ``base`` scene)."""
    if name not in SCENE_SHIFTS:
        raise KeyError(f"unknown scene shift {name!r}; known: {', '.join(SCENE_SHIFTS)}")
    if not isinstance(level, (int, np.integer)) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"shift level must be an int in 0..{MAX_LEVEL}, got {level!r}")
    return SCENE_SHIFTS[name](base or SceneSpec(), int(level), index, seed)


def visible_fractions(scene: Scene, spec: SceneSpec) -> list[float]:
    """Share of each object's drawn pixels left visible by the objects drawn after it."""
    # Render a label image: object i in a unique colour on black, then count each colour.
    labels = {f"object{i}": (1 + i, 0, 0) for i in range(len(scene.objects))}
    label_spec = replace(spec, palette=labels, max_objects=1, min_objects=1, exclude_pairs=frozenset(),
                         require_pairs=frozenset())
    black = {"kind": "plain", "rgb": [0, 0, 0]}
    relabel = [replace(o, color=f"object{i}") for i, o in enumerate(scene.objects)]
    stacked = np.asarray(render_scene(replace(scene, objects=tuple(relabel), background=black), label_spec))[..., 0]
    out = []
    for i, obj in enumerate(relabel):
        alone = replace(scene, objects=(obj,), background=black)
        drawn = np.count_nonzero(np.asarray(render_scene(alone, label_spec))[..., 0])
        out.append(float(np.count_nonzero(stacked == 1 + i) / drawn))
    return out
