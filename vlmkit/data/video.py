"""Video clips: where their frames come from, which frames a token budget keeps, and how the LM sees them.

A record (or question) holds a clip in ``"video"``:

* a list of image paths, the frames in order (``"video": ["f0.png", "f1.png", ...]``);
* a directory of frames (``"video": "clips/0001/"``): its image files, in natural name order
  (``frame_2`` before ``frame_10``);
* a video file (``"video": "clip.mp4"``): decoded with PyAV (the ``[video]`` extra, ``pip install
  'vlmkit[video]'``), or, for an animated ``.gif``, with PIL; every frame is decoded and resized.

Which frames (`VideoSampler`, from `vlmkit.config.VideoConfig`): as many as the budget allows, ``frames x
image tokens per frame <= budget`` (with temporal pooling a pooled group costs one frame's tokens), and
all of them when the clip is shorter; ``uniform``: spread evenly from the first frame to the last;
``change``: the first frame, then, one at a time, the frame whose picture differs most (mean absolute
pixel difference, at the model's image size) from the kept frame before it, until the budget is used.

How the LM sees them: the clip's ``<video>`` tag (one per record; without a tag the clip goes first in
the first user turn) becomes one line per kept frame, a text marker and an image: ``"Frame 1: <image>\\n
Frame 2: <image>"``, or with ``temporal_pool: 2`` ``"Frames 1-2: <image>"`` for a pooled pair, whose
image tokens the model averages (see `VisionLanguageModel.fuse`, ``image_frames``). Markers are text:
they need no new weights and tell the order (and, with pooling, which frames an image stands for).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from vlmkit.config import ConfigError, VideoConfig
from vlmkit.data.chat import ROLE_ALIASES
from vlmkit.data.images import ImageError, ImageProcessor, to_rgb

VIDEO_TAG = "<video>"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INSTALL_VIDEO = "pip install 'vlmkit[video]'"
# Frames are resized to the tower's square size here, so an AnyRes model (which tiles each image from its
# original size) gets no sampler; this is why.
NO_CLIPS_ANYRES = ("this model cuts images into AnyRes tiles (model.image.anyres) and takes no clips: clip frames "
                   "are resized squares, not tiles; use a model without model.image.anyres for video")


class VideoError(ImageError):
    """A clip cannot be read: a missing or empty directory or file, an undecodable video. Names the path."""


class VideoDecoderMissing(RuntimeError):
    """A video file needs PyAV, which is not installed (a set-up problem, not a bad record)."""


@dataclass(frozen=True)
class DecodedFrame:
    """Frame `index` of the video file `path`, decoded and resized (uint8 [size, size, 3])."""

    path: Path
    index: int
    pixels: np.ndarray

    @property
    def key(self) -> Path:
        return Path(f"{self.path}#{self.index}")


Frame = Path | DecodedFrame


@dataclass(frozen=True)
class Clip:
    """The kept frames of a clip (in order), how many frames each image averages, and its text."""

    frames: list[Frame]
    groups: list[int]  # frames per image shown to the LM (all 1 without temporal pooling)
    text: str  # "Frame 1: <image>\nFrame 2: <image>": replaces the clip's <video> tag


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def read_video(path: str | Path, size: int) -> np.ndarray:
    """Every frame of a video file, resized to `size` x `size` (bicubic): uint8 [N, size, size, 3].

    Animated GIFs are read with PIL; other formats with PyAV (``pip install 'vlmkit[video]'``).
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"cannot read video {path}: file not found", path=path, kind="missing")

    def resized(image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        return np.array(image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC))

    try:
        if path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                frames = [resized(frame.copy()) for frame in ImageSequence.Iterator(gif)]
        else:
            try:
                import av
            except ImportError:
                raise VideoDecoderMissing(f"reading the video file {path} needs PyAV: {INSTALL_VIDEO} (or give the "
                                          "clip as a directory or a list of frame images)") from None
            with av.open(str(path)) as container:
                frames = [resized(frame.to_image()) for frame in container.decode(video=0)]
    except (VideoDecoderMissing, MemoryError):
        raise
    except Exception as err:  # PIL and FFmpeg raise many kinds
        raise VideoError(f"cannot read video {path}: {type(err).__name__}: {err}", path=path) from err
    if not frames:
        raise VideoError(f"cannot read video {path}: no frames", path=path)
    return np.stack(frames)


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first frame to the last (the middle one for count 1)."""
    if count >= num_frames:
        return list(range(num_frames))
    if count == 1:
        return [(num_frames - 1) // 2]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def change_indices(pixels: np.ndarray, count: int) -> list[int]:
    """`count` frames of `pixels` [N, H, W, 3] where the picture changes most: the first frame, then, one
    at a time, the frame with the largest mean absolute difference to the kept frame before it (ties:
    the earlier frame). Returned in order."""
    n = len(pixels)
    if count >= n:
        return list(range(n))
    frames = pixels.astype(np.int16)
    diff: dict[tuple[int, int], float] = {}

    def distance(a: int, b: int) -> float:
        if (a, b) not in diff:
            diff[a, b] = float(np.abs(frames[a] - frames[b]).mean())
        return diff[a, b]

    kept = [0]
    while len(kept) < count:
        best, best_score = -1, -1.0
        previous = 0
        for j in range(1, n):
            if j in kept:
                previous = j
                continue
            score = distance(previous, j)
            if score > best_score:
                best, best_score = j, score
        kept = sorted([*kept, best])
    return kept


def frame_groups(num_frames: int, pool: int) -> list[int]:
    """Frames per shown image: `pool` adjacent frames each (the last group may be shorter)."""
    return [min(pool, num_frames - start) for start in range(0, num_frames, pool)]


def frame_markers(groups: Sequence[int], image_tag: str = "<image>") -> str:
    """One line per shown image: ``Frame 3: <image>``, or ``Frames 5-6: <image>`` for a pooled group."""
    lines, first = [], 1
    for n in groups:
        label = f"Frame {first}" if n == 1 else f"Frames {first}-{first + n - 1}"
        lines.append(f"{label}: {image_tag}")
        first += n
    return "\n".join(lines)


def insert_clip(data: dict[str, Any], text: str, video_tag: str = VIDEO_TAG) -> dict[str, Any]:
    """The record with its ``<video>`` tag replaced by `text` (the clip's markers and images); without a
    tag, `text` and a newline go first in the first user turn. Raises ValueError for more than one tag
    or a tag in an assistant turn."""
    turns = data.get("conversations")
    if not isinstance(turns, list):
        return data  # the conversation check reports it
    found = [(k, str(t.get("value", "")).count(video_tag)) for k, t in enumerate(turns) if isinstance(t, dict)]
    total = sum(n for _, n in found)
    if total > 1:
        raise ValueError(f"the text has {total} {video_tag} tags; a record holds one clip (one tag, or none to "
                         "put the clip first)")
    turns = list(turns)  # copy: the caller's record stays as it was read
    for k, n in found:
        role = ROLE_ALIASES.get(str(turns[k].get("from")).lower())
        if n and role == "assistant":
            raise ValueError(f"conversations[{k}] (assistant) holds {video_tag}; clips go in user or system turns")
        if n:
            turns[k] = {**turns[k], "value": str(turns[k]["value"]).replace(video_tag, text)}
            return {**data, "conversations": turns}
    for k, turn in enumerate(turns):
        if isinstance(turn, dict) and "value" in turn and ROLE_ALIASES.get(str(turn.get("from")).lower()) == "user":
            turns[k] = {**turn, "value": f"{text}\n{turn['value']}"}
            return {**data, "conversations": turns}
    return data


class VideoSampler:
    """Turns a ``"video"`` value into a `Clip` for one model: its `VideoConfig`, the image tokens one frame
    costs (`tokens_per_frame`) and its image preprocessing (frames are compared at the model's size)."""

    def __init__(self, config: VideoConfig, tokens_per_frame: int, processor: ImageProcessor,
                 image_tag: str = "<image>"):
        self.config, self.tokens_per_frame, self.processor = config, tokens_per_frame, processor
        self.image_tag = image_tag
        self.max_frames: int | None = None
        if config.budget is not None:
            images = config.budget // tokens_per_frame
            if images < 1:
                raise ConfigError(f"model.video.budget {config.budget} is less than one frame's {tokens_per_frame} "
                                  f"image tokens; set it to at least {tokens_per_frame}")
            self.max_frames = images * config.temporal_pool
        self._decoded: dict[Path, np.ndarray] = {}  # the last video file read (its questions come together)
        self._chosen: dict[tuple, list[int]] = {}  # change sampling of frame files, per clip

    def __repr__(self) -> str:
        c = self.config
        return (f"VideoSampler(budget={c.budget}, {self.tokens_per_frame} tokens/frame -> at most {self.max_frames} "
                f"frames, sampling={c.sampling}, temporal_pool={c.temporal_pool})")

    def frames(self, value: Any, root: str | Path) -> list[Frame]:
        """Every frame of a clip (`value` as in the module doc; paths relative to `root` unless absolute)."""
        root = Path(root)
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"'video' as a list must hold frame image paths, got {value!r:.80}")
            return [root / v for v in value]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"'video' must be a directory, a video file or a list of frames, got {value!r:.80}")
        path = root / value
        if path.is_dir():
            frames = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
            if not frames:
                raise VideoError(f"cannot read clip {path}: no frame images ({', '.join(FRAME_SUFFIXES)}) in the "
                                 "directory", path=path, kind="missing")
            return frames
        if value.endswith("/"):
            raise VideoError(f"cannot read clip {path}: directory not found", path=path, kind="missing")
        if path not in self._decoded:
            self._decoded = {path: read_video(path, self.processor.size)}
        return [DecodedFrame(path, i, pixels) for i, pixels in enumerate(self._decoded[path])]

    def pixels(self, frame: Frame) -> np.ndarray:
        """A frame at the model's size, uint8 [size, size, 3]."""
        return frame.pixels if isinstance(frame, DecodedFrame) else self.processor.to_uint8(frame)

    def select(self, frames: Sequence[Frame]) -> list[int]:
        """Indices of the frames the budget keeps (see the module doc), in order."""
        count = len(frames) if self.max_frames is None else min(len(frames), self.max_frames)
        if self.config.sampling == "uniform" or count == len(frames):
            return uniform_indices(len(frames), count)
        key = (tuple(str(f.key if isinstance(f, DecodedFrame) else f) for f in frames), count)
        if key not in self._chosen:
            self._chosen[key] = change_indices(np.stack([self.pixels(f) for f in frames]), count)
        return self._chosen[key]

    def clip(self, value: Any, root: str | Path) -> Clip:
        """The kept frames of a clip, their grouping and the text that shows them."""
        frames = self.frames(value, root)
        kept = [frames[i] for i in self.select(frames)]
        groups = frame_groups(len(kept), self.config.temporal_pool)
        return Clip(kept, groups, frame_markers(groups, self.image_tag))
