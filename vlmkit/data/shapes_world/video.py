"""Moving shapes: short clips in which shapes-world objects appear, move and leave the picture, with
questions that only a sequence of frames answers.

A clip (`MovingClip`) has `num_frames` frames on the plain background; 2 or 3 small objects of
different colours (pairs the spec allows: held-out pairs are never drawn or named). All objects of a
clip move along one axis (horizontal or vertical), each in a lane of its own, so they never overlap.
An object *appears* (pops in, whole and inside the picture) at its frame, ``0`` for the first and
distinct even frames up to half the clip for the others, then moves a constant number of pixels per
frame (0 to 5). An object that *leaves* is wholly outside the picture from some frame in the second
half of the clip on.

Questions (`VIDEO_QUESTION_TYPES`, one record each, short exact answers):

* ``video_direction``: "Which way does the red circle move?" -> ``left`` / ``right`` / ``up`` / ``down``
  (the object asked about moves at least 2 px per frame; the answer cycles through a split);
* ``video_last``: "Which object appears last?" -> its name, e.g. ``blue square``;
* ``video_leave``: "How many objects leave the picture?" -> ``0`` / ``1`` / ``2`` (cycles through a split).

Each clip derives from ``(seed, index)`` and its place in its split only, through its own random stream.
`MovingClip.to_dict` holds every object's box at every frame (the trajectories the answers follow from).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlmkit.data.shapes_world.generate import _derive_seed
from vlmkit.data.shapes_world.shapes import _shape_mask
from vlmkit.data.shapes_world.spec import _PLAIN_RGB, QA, SceneSpec

VIDEO_QUESTION_TYPES: tuple[str, ...] = ("video_direction", "video_last", "video_leave")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
DEFAULT_FRAMES = 16
LANE_GAP = 3  # pixels between the lanes of two objects


@dataclass(frozen=True)
class Mover:
    """One object of a clip: it appears at frame `appear` with its box starting at `start` along the
    clip's axis and `lane` across it, and moves `velocity` pixels per frame along the axis."""

    color: str
    shape: str
    width: int  # its drawn mask's box
    height: int
    lane: int
    start: int
    velocity: int
    appear: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def box(self, t: int, horizontal: bool) -> tuple[int, int, int, int] | None:
        """Its box at frame `t` (x2/y2 exclusive; may reach outside the picture), None before it appears."""
        if t < self.appear:
            return None
        along = self.start + self.velocity * (t - self.appear)
        if horizontal:
            return along, self.lane, along + self.width, self.lane + self.height
        return self.lane, along, self.lane + self.width, along + self.height


def _visible(box: tuple[int, int, int, int] | None, size: int) -> bool:
    return box is not None and box[0] < size and box[1] < size and box[2] > 0 and box[3] > 0


@dataclass(frozen=True)
class MovingClip:
    index: int
    seed: int
    size: int
    num_frames: int
    horizontal: bool
    movers: tuple[Mover, ...]
    questions: tuple[QA, ...]

    def boxes(self, t: int) -> list[tuple[int, int, int, int] | None]:
        return [m.box(t, self.horizontal) for m in self.movers]

    def visible(self, t: int) -> list[bool]:
        return [_visible(box, self.size) for box in self.boxes(t)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "seed": self.seed, "size": self.size, "num_frames": self.num_frames,
            "axis": "horizontal" if self.horizontal else "vertical",
            "objects": [{"color": m.color, "shape": m.shape, "appear": m.appear, "velocity": m.velocity,
                         "boxes": [None if b is None else list(b) for b in
                                   (m.box(t, self.horizontal) for t in range(self.num_frames))]}
                        for m in self.movers],
            "questions": [q.to_dict() for q in self.questions],
        }


def _place_leaver(rng: random.Random, size: int, length: int, appear: int, frames: int) -> tuple[int, int]:
    """(start, speed) of an object moving forward (+) that is whole inside at `appear` and wholly out
    (start + speed * (t - appear) >= size) from an exit frame in the second half of the clip on."""
    for _ in range(200):
        speed = rng.randint(3, 5)
        exit_frame = rng.randint(max(appear + 3, frames // 2), frames - 1)
        start = size - speed * (exit_frame - appear) + rng.randrange(speed)
        if 0 <= start <= size - length:
            return start, speed
    raise ValueError(f"no trajectory leaves a {size} px picture within {frames} frames; use more frames")


def _place_stayer(rng: random.Random, size: int, length: int, appear: int, frames: int,
                  speeds: tuple[int, ...]) -> tuple[int, int]:
    """(start, speed) of an object moving forward (+) that stays whole inside until the last frame."""
    speed = rng.choice([s for s in speeds if s * (frames - 1 - appear) <= size - length] or [0])
    return rng.randint(0, size - length - speed * (frames - 1 - appear)), speed


def moving_clip(index: int, seed: int, spec: SceneSpec, position: int,
                num_frames: int = DEFAULT_FRAMES) -> MovingClip:
    """Clip ``index`` of dataset ``seed``; `position` (its place in its split) sets the answer of its
    direction and leave questions, so that those answers cycle through a split."""
    if num_frames < 8:
        raise ValueError(f"moving-shapes clips need at least 8 frames, got {num_frames}")
    rng = random.Random(_derive_seed(seed, index, "video"))
    size = spec.image_size
    direction = DIRECTIONS[position % 4]
    leaving = position % 3
    horizontal = direction in ("left", "right")
    n = max(rng.choice((2, 3)), leaving)
    small = min(spec.sizes, key=spec.sizes.__getitem__)
    side = spec.size_px(small)
    lanes = list(range(1, size - side + 1, side + LANE_GAP))
    if len(lanes) < n:
        raise ValueError(f"a {size} px picture has {len(lanes)} lanes for {side} px objects; {n} are needed")
    allowed = spec.allowed_pairs()
    colors = rng.sample(sorted({c for c, _ in allowed}), n)
    pairs = [(c, rng.choice(sorted(s for cc, s in allowed if cc == c))) for c in colors]
    appears = [0, *rng.sample(range(2, num_frames // 2 + 1, 2), n - 1)]
    rng.shuffle(appears)
    subject = rng.randrange(n)
    leavers = set(rng.sample(range(n), leaving))
    movers = []
    for i, ((color, shape), lane, appear) in enumerate(zip(pairs, rng.sample(lanes, n), appears)):
        _, width, height, _ = _shape_mask(shape, side)
        length = width if horizontal else height
        if i == subject:
            sign = 1 if direction in ("right", "down") else -1
        else:
            sign = rng.choice((-1, 1))
        if i in leavers:
            start, speed = _place_leaver(rng, size, length, appear, num_frames)
        else:
            speeds = (2, 3) if i == subject else (0, 1, 2)
            start, speed = _place_stayer(rng, size, length, appear, num_frames, speeds)
        if i == subject and speed == 0:
            raise ValueError(f"the object asked about cannot move 2 px a frame for {num_frames} frames inside a "
                             f"{size} px picture; use fewer frames or a larger image")
        if sign < 0:  # mirrored: the same path the other way
            start = size - length - start
        movers.append(Mover(color, shape, width, height, lane, start, sign * speed, appear))
    clip = MovingClip(index, seed, size, num_frames, horizontal, tuple(movers), ())
    return MovingClip(index, seed, size, num_frames, horizontal, tuple(movers), tuple(_questions(clip, subject, rng)))


def _questions(clip: MovingClip, subject: int, rng: random.Random) -> list[QA]:
    """The three questions, answered from the trajectories (what is visible at which frame)."""
    movers, last = clip.movers, clip.num_frames - 1
    first_seen = [next(t for t in range(clip.num_frames) if clip.visible(t)[i]) for i in range(len(movers))]
    latest = max(range(len(movers)), key=first_seen.__getitem__)
    left = sum(1 for i in range(len(movers)) if not clip.visible(last)[i])
    m = movers[subject]
    word = (("left", "right") if clip.horizontal else ("up", "down"))[m.velocity > 0]
    direction = rng.choice(("Which way does the {n} move?", "In which direction does the {n} move?"))
    return [
        QA(direction.format(n=m.name), word, "video_direction", targets=(m.name,)),
        QA(rng.choice(("Which object appears last?", "Which object is the last to appear?")), movers[latest].name,
           "video_last", targets=(movers[latest].name,)),
        QA(rng.choice(("How many objects leave the picture?", "How many objects move out of the picture?")),
           str(left), "video_leave"),
    ]


def render_clip(clip: MovingClip, spec: SceneSpec) -> list[Image.Image]:
    """The clip's frames: its objects in their palette colours (no anti-aliasing) on the plain background,
    cut off at the picture's edges."""
    small = min(spec.sizes, key=spec.sizes.__getitem__)
    masks = [_shape_mask(m.shape, spec.size_px(small))[0] for m in clip.movers]
    frames = []
    for t in range(clip.num_frames):
        image = Image.new("RGB", (clip.size, clip.size), _PLAIN_RGB)
        for m, mask, box in zip(clip.movers, masks, clip.boxes(t)):
            if _visible(box, clip.size):
                image.paste(spec.palette[m.color], box, mask)
        frames.append(image)
    return frames


def clip_records(clip: MovingClip, video: str) -> list[dict[str, Any]]:
    """One LLaVA record per question of `clip` (frames in the directory `video`): the clip, then the question."""
    return [{"id": f"video_{clip.index:06d}_q{j}", "video": video,
             "conversations": [{"from": "human", "value": f"<video>\n{q.question}"},
                               {"from": "gpt", "value": q.answer}]}
            for j, q in enumerate(clip.questions)]
