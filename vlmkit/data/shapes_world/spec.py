"""What a shapes-world scene is made of: the vocabularies and constants (palette, shapes, sizes,
backgrounds, held-out pairs, question types), `SceneSpec` (everything that controls how scenes look,
validated on construction), the ground-truth containers `SceneObject`, `Scene` and `QA`, and
`drawn_px` (the side an object is drawn at under a spec).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from vlmkit.data.shapes_world.shapes import _SHAPE_POINTS, _shape_mask

VERSION = "shapes-world/1"

# Ordered around the colour wheel: neighbours in this order are the "co-occurring" colours of the prior.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (235, 205, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
}
# Extra colours for distribution-shift experiments ("unseen colours"); none is close to the backgrounds.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 185, 200),
    "pink": (250, 100, 175),
    "brown": (130, 75, 30),
    "black": (25, 25, 25),
}
ALL_COLORS: dict[str, tuple[int, int, int]] = {**PALETTE, **EXTRA_COLORS}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
ALL_SHAPES: tuple[str, ...] = SHAPES + ("diamond", "hexagon", "ring")

# Side of each size class as a fraction of the image side (64 px -> 10 px and 19 px).
SIZES: dict[str, float] = {"small": 0.16, "large": 0.30}

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient_v", "gradient_h", "noise", "stripes")
_BACKGROUND_WORDS = {
    "plain": "plain",
    "gradient_v": "gradient",
    "gradient_h": "gradient",
    "noise": "grainy",
    "stripes": "striped",
}
_PLAIN_RGB = (238, 238, 238)

# Every colour and every shape keeps other partners in training, so only the combination is novel.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("green", "cross"),
    ("yellow", "circle"),
)

QUESTION_TYPES: tuple[str, ...] = (
    "color",
    "shape",
    "count",
    "exists",
    "spatial",
    "size",
    "grounding",
    "identify",
)
SPATIAL_MARGIN = 0.08  # fraction of the image side a centre offset must exceed to count as a relation

_MIN_IMAGE_SIZE = 16
_MIN_SIZE_PX = 3


# --------------------------------------------------------------------------------------------------
# Spec and scene containers


def _as_pairs(pairs: Iterable[Sequence[str]] | None, what: str) -> frozenset[tuple[str, str]]:
    out = set()
    for p in pairs or ():
        if isinstance(p, str) or len(p) != 2:
            raise ValueError(f"{what}: each pair must be (colour, shape), got {p!r}")
        out.add((str(p[0]), str(p[1])))
    return frozenset(out)


@dataclass(frozen=True, eq=False)
class SceneSpec:
    """Everything that controls how scenes look.

    Distribution-shift experiments pass a modified copy (``dataclasses.replace``): other palettes or
    shapes (see `ALL_COLORS`, `ALL_SHAPES`), other ``sizes`` fractions, ``allow_overlap`` for
    occlusion, more objects or a different ``image_size``. Invalid combinations raise ``ValueError``.

    With ``allow_overlap`` boxes stay amodal (the full extent of the drawn shape); objects are drawn
    largest first, so a later (smaller) one may hide part of an earlier one but at most
    ``max_occlusion`` of its box. Keep ``background_contrast`` moderate (<= ~3): backgrounds are light
    greys and must never reproduce a palette colour exactly.
    """

    image_size: int = 64
    palette: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: dict(PALETTE))
    shapes: tuple[str, ...] = SHAPES
    sizes: Mapping[str, float] = field(default_factory=lambda: dict(SIZES))
    min_objects: int = 1
    max_objects: int = 5
    allow_overlap: bool = False
    max_occlusion: float = 0.5  # with allow_overlap: max fraction of an earlier object's box covered
    min_gap: int = 2  # empty pixels required between boxes when overlap is not allowed
    backgrounds: bool = True  # False -> every scene on the same plain light grey
    background_kinds: tuple[str, ...] = BACKGROUND_KINDS
    background_contrast: float = 1.0  # scales gradient / noise / stripe amplitude
    cooccurrence: float = 1.0  # strength of the pair co-occurrence prior; 0 = uniform
    exclude_pairs: frozenset[tuple[str, str]] = frozenset()  # (colour, shape) pairs never drawn
    require_pairs: frozenset[tuple[str, str]] = frozenset()  # each scene contains one of these
    # Drawing variation (0 = every shape of a size class drawn identically): each object's side is
    # scaled by a factor in [1 - size_jitter, 1 + size_jitter] and it is turned by up to
    # max_rotation degrees either way; background greys are drawn from background_levels.
    size_jitter: float = 0.0
    max_rotation: int = 0
    background_levels: tuple[int, int] = (218, 242)

    def __post_init__(self) -> None:
        # Normalise containers so callers may pass lists/dicts and the spec stays effectively immutable.
        object.__setattr__(
            self, "palette", {str(k): tuple(int(c) for c in v) for k, v in self.palette.items()}
        )
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "sizes", {str(k): float(v) for k, v in self.sizes.items()})
        object.__setattr__(self, "background_kinds", tuple(self.background_kinds))
        object.__setattr__(self, "background_levels", tuple(int(v) for v in self.background_levels))
        object.__setattr__(self, "exclude_pairs", _as_pairs(self.exclude_pairs, "exclude_pairs"))
        object.__setattr__(self, "require_pairs", _as_pairs(self.require_pairs, "require_pairs"))
        self._validate()

    def _validate(self) -> None:
        s = self.image_size
        if not isinstance(s, int) or s < _MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be an int >= {_MIN_IMAGE_SIZE}, got {s!r}")
        if not self.palette:
            raise ValueError("palette is empty; pass at least one colour, e.g. PALETTE")
        for name, rgb in self.palette.items():
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(f"palette[{name!r}] must be an (r, g, b) triple in 0..255, got {rgb!r}")
        if len(set(self.palette.values())) != len(self.palette):
            raise ValueError("palette has two colours with the same RGB value; colours must be distinct")
        if not self.shapes:
            raise ValueError("shapes is empty; pass at least one of " + ", ".join(ALL_SHAPES))
        unknown = [x for x in self.shapes if x not in _SHAPE_POINTS]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; known shapes: {', '.join(ALL_SHAPES)}")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes has duplicates: {self.shapes}")
        if not self.sizes:
            raise ValueError("sizes is empty; pass e.g. {'small': 0.16, 'large': 0.3}")
        for name, frac in self.sizes.items():
            if not 0 < frac <= 1:
                raise ValueError(f"sizes[{name!r}]={frac} must be a fraction of the image side in (0, 1]")
            if self.size_px(name) < _MIN_SIZE_PX:
                raise ValueError(
                    f"size {name!r} is {self.size_px(name)} px at image_size={s}; "
                    f"increase image_size or sizes[{name!r}] (>= {_MIN_SIZE_PX} px needed)"
                )
        if len({self.size_px(k) for k in self.sizes}) != len(self.sizes):
            raise ValueError(f"sizes {self.sizes} give equal pixel sizes at image_size={s}; make them differ")
        if self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap}")
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")
        if self.cooccurrence < 0:
            raise ValueError(f"cooccurrence must be >= 0, got {self.cooccurrence}")
        if self.background_contrast < 0:
            raise ValueError(f"background_contrast must be >= 0, got {self.background_contrast}")
        if not 0 <= self.size_jitter < 1:
            raise ValueError(f"size_jitter must be in [0, 1), got {self.size_jitter}")
        if not 0 <= self.max_rotation <= 45:
            raise ValueError(f"max_rotation must be in [0, 45] degrees, got {self.max_rotation}")
        low, high = self.background_levels if len(self.background_levels) == 2 else (1, 0)
        if not 0 <= low <= high <= 255:
            raise ValueError(f"background_levels must be (low, high) greys with 0 <= low <= high <= 255, "
                             f"got {self.background_levels}")
        bad = [k for k in self.background_kinds if k not in BACKGROUND_KINDS]
        if bad or not self.background_kinds:
            raise ValueError(f"background_kinds must be a non-empty subset of {BACKGROUND_KINDS}, got {bad}")
        every = set(self.all_pairs())
        for what, pairs in (("exclude_pairs", self.exclude_pairs), ("require_pairs", self.require_pairs)):
            unknown_pairs = sorted(pairs - every)
            if unknown_pairs:
                raise ValueError(f"{what} {unknown_pairs} are not (palette colour, shape) pairs of this spec")
        if self.require_pairs and not self.require_pairs - self.exclude_pairs:
            raise ValueError("every pair in require_pairs is also in exclude_pairs; nothing can be drawn")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects, got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}"
            )
        n_allowed = len(self.allowed_pairs())
        if self.max_objects > n_allowed:
            raise ValueError(
                f"max_objects={self.max_objects} but only {n_allowed} distinct (colour, shape) pairs are "
                "allowed; lower max_objects or add colours/shapes (each pair appears at most once per scene)"
            )
        if not self.allow_overlap:
            g = self._grid_cells(s)
            if g * g < self.max_objects:
                need = next((t for t in range(s, 4097) if self._grid_cells(t) ** 2 >= self.max_objects), None)
                largest = max(self.sizes, key=self.sizes.__getitem__)
                hint = f"image_size >= {need}, " if need else ""
                raise ValueError(
                    f"image_size={s} is too small for max_objects={self.max_objects} non-overlapping "
                    f"objects of size {largest!r} ({self.size_px(largest)} px, gap {self.min_gap} px); "
                    f"use {hint}max_objects <= {max(g * g, 1)}, smaller sizes, a smaller min_gap "
                    "or allow_overlap=True"
                )

    def _grid_cells(self, image_size: int, largest: int | None = None) -> int:
        """Cells per side of the fallback layout grid: each holds the largest object (`largest` px, by
        default the largest size class drawn plainly) plus the gap."""
        big = largest or max(max(1, round(f * image_size)) for f in self.sizes.values())
        return (image_size + self.min_gap) // (big + self.min_gap)

    def size_px(self, name: str) -> int:
        """Nominal side in pixels of size class ``name`` (the shape is drawn inside this square)."""
        return max(1, round(self.sizes[name] * self.image_size))

    @property
    def colors(self) -> tuple[str, ...]:
        return tuple(self.palette)

    def all_pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.palette for s in self.shapes]

    def allowed_pairs(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs that may be drawn, in a fixed order."""
        return [p for p in self.all_pairs() if p not in self.exclude_pairs]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SceneSpec:
        """The inverse of `to_dict` (e.g. the ``spec`` of a dataset's ``meta.json``)."""
        return cls(**{k: v for k, v in d.items() if k != "sizes_px"})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["palette"] = {k: list(v) for k, v in self.palette.items()}
        d["shapes"] = list(self.shapes)
        d["background_kinds"] = list(self.background_kinds)
        d["background_levels"] = list(self.background_levels)
        d["exclude_pairs"] = sorted([list(p) for p in self.exclude_pairs])
        d["require_pairs"] = sorted([list(p) for p in self.require_pairs])
        d["sizes_px"] = {k: self.size_px(k) for k in self.sizes}
        return d


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # pixels, x2/y2 exclusive
    scale: float = 1.0  # drawn side / the size class's side (SceneSpec.size_jitter)
    rotation: int = 0  # degrees, counter-clockwise (SceneSpec.max_rotation)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}
        if self.scale != 1.0:
            d["scale"] = self.scale
        if self.rotation:
            d["rotation"] = self.rotation
        return d

    def mask(self, spec: SceneSpec) -> tuple[Image.Image, int, int, int]:
        """The object's drawn mask under `spec` (see `_shape_mask`)."""
        return _shape_mask(self.shape, drawn_px(spec, self.size, self.scale), self.rotation)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``objects`` are in drawing order (later ones on top)."""

    index: int
    seed: int
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    background: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "objects": [o.to_dict() for o in self.objects],
            "background": self.background,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        objs = tuple(
            SceneObject(o["shape"], o["color"], o["size"], tuple(int(v) for v in o["box"]),
                        float(o.get("scale", 1.0)), int(o.get("rotation", 0)))
            for o in d["objects"]
        )
        bg = d.get("background") or {"kind": "plain", "rgb": list(_PLAIN_RGB)}
        return cls(
            int(d.get("index", 0)), int(d.get("seed", 0)), int(d["width"]), int(d["height"]), objs, dict(bg)
        )


@dataclass(frozen=True)
class QA:
    """One question with a short canonical answer (exact-match scorable)."""

    question: str
    answer: str
    type: str
    negative: str | None = None  # "random" | "popular" for absent-object exists questions
    box: tuple[int, int, int, int] | None = None  # normalised [0, 1000] box for grounding / identify
    targets: tuple[str, ...] = ()  # "colour shape" names the question is about

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"question": self.question, "answer": self.answer, "type": self.type}
        if self.negative is not None:
            d["negative"] = self.negative
        if self.box is not None:
            d["box"] = list(self.box)
        d["targets"] = list(self.targets)
        return d


HIRES_IMAGE_SIZE = 256


def hires_spec(image_size: int = HIRES_IMAGE_SIZE, backgrounds: bool = True) -> SceneSpec:
    """Scenes where resolution matters: the default 64 px scenes' objects (10 and 19 px) on a larger canvas.

    At 256 px, resizing the image to 64 px shrinks every object to 2-5 px, too small to tell a star from
    a cross; tiles of 64 px at full resolution show them as the default scenes do.
    """
    sizes = {name: SceneSpec().size_px(name) / image_size for name in SIZES}
    return SceneSpec(image_size=image_size, sizes=sizes, backgrounds=backgrounds)


def drawn_px(spec: SceneSpec, size: str, scale: float = 1.0) -> int:
    """Side in pixels an object of size class `size` is drawn at, with its jitter `scale`."""
    return max(_MIN_SIZE_PX, round(spec.size_px(size) * scale)) if scale != 1.0 else spec.size_px(size)
