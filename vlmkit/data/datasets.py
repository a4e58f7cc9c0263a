"""Robust datasets of user data: LLaVA-format conversations and image-caption pairs.

Records come from `vlmkit.data.records`; batches are made by `vlmkit.data.collate`.
Every record is checked when a dataset is built. A bad record is skipped, counted by reason in a
`LoadReport` and named by ``file:line`` in a warning on the ``vlmkit.data`` logger; with
``strict=True`` the first bad record found raises `DataError` instead (problems are found in
stages: JSON syntax while reading, then the conversation text, then the image files).

Skip reasons: ``malformed_json``, ``not_a_dict``, ``bad_image_field``, ``bad_video_field``, ``bad_caption``,
``bad_conversation`` (also unknown roles and conversations without an assistant answer),
``image_count_mismatch``, ``video_count_mismatch``, ``too_long``, ``missing_image``, ``unreadable_image``,
``missing_video``, ``unreadable_video``.

Images of a record: ``"image"`` is one path or a list of paths (several images, e.g. two scenes to
compare). Each ``<image>`` tag in the text stands for the next image of that list, in reading order
(turn by turn, left to right); tags may be in any human (user) or system turn, never in an assistant
(gpt) turn: the model reads images, it does not write them (such a record is a ``bad_conversation``).
The number of tags must equal the number of images, else the record is an ``image_count_mismatch``
whose message names the record's index in the file and both counts. The files may differ in size:
every image is resized to the processor's size.

LLaVA convention: a record that has images but no ``<image>`` tag anywhere in its text gets one
``<image>\\n`` per image prepended to its first human turn (LLaVA datasets often omit the tag).

Clips: a record may hold a ``"video"`` instead of images (a directory of frames, a list of frame
paths or a video file; see `vlmkit.data.video`). The dataset's `VideoSampler` keeps the frames the
model's token budget allows and replaces the record's ``<video>`` tag with one marked ``<image>`` line
per kept frame (or pooled group of frames), so from there on a clip is a record with several images;
samples then say how many frames each image averages (``image_frames``).
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.chat import ROLE_ALIASES, ChatFormat, ConversationError
from vlmkit.data.images import ImageError, ImageProcessor, load_image
from vlmkit.data.records import (
    DataError,
    LoadReport,
    Record,
    RecordSkipped,
    caption_fields,
    read_record_file,
    reject,
)
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.video import DecodedFrame, VideoError, VideoSampler, insert_clip

logger = logging.getLogger("vlmkit.data")

# -- images -----------------------------------------------------------------------------------


class _ImageStore:
    """The distinct image files of a dataset, each decoded once at load time.

    With `cache`, the resized images are kept in one uint8 array [N, size, size, 3] (one block of
    memory is cheap to share with DataLoader workers); otherwise they are decoded on every read.
    """

    def __init__(self, root: str | Path, processor: ImageProcessor, cache: bool):
        self.root = Path(root)
        self.processor = processor
        self.cache = cache
        self.paths: list[Path] = []
        self._index: dict[Path, int] = {}
        self._pixels: np.ndarray | None = None
        self._decoded: dict[int, np.ndarray] = {}  # frames of video files, already resized

    def add(self, name: str | Path | DecodedFrame) -> int:
        # An absolute `name` replaces the root; normpath makes "a/./b.png" and "a/b.png" one image.
        decoded = name if isinstance(name, DecodedFrame) else None
        path = decoded.key if decoded is not None else Path(os.path.normpath(self.root / name))
        if path not in self._index:
            self._index[path] = len(self.paths)
            self.paths.append(path)
            if decoded is not None:
                self._decoded[self._index[path]] = decoded.pixels
        return self._index[path]

    def _load(self, index: int) -> np.ndarray:
        if index in self._decoded:
            return self._decoded[index]
        return self.processor.to_uint8(load_image(self.paths[index]))

    def check(self, workers: int | None) -> dict[int, RecordSkipped]:
        """Decode every image once (in threads: PIL releases the GIL); returns failures by index."""
        if self.cache:
            size = self.processor.size
            self._pixels = np.empty((len(self.paths), size, size, 3), dtype=np.uint8)

        def visit(index: int) -> RecordSkipped | None:
            try:
                pixels = self._load(index)
                if self._pixels is not None:
                    self._pixels[index] = pixels
            except ImageError as err:
                return RecordSkipped("missing_image" if err.kind == "missing" else "unreadable_image", str(err))
            return None

        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(visit, range(len(self.paths))))
        if self._pixels is not None:
            self._decoded.clear()  # the cache holds them now
        return {index: skip for index, skip in enumerate(results) if skip is not None}

    def pixels(self, index: int) -> np.ndarray:
        """Resized uint8 [size, size, 3]; raises ImageError if an uncached file went bad since loading."""
        if self._pixels is not None:
            return self._pixels[index]
        return self._load(index)


def _validate(
    records: Sequence[Record],
    report: LoadReport,
    strict: bool,
    parse: Callable[[Record], tuple[Any, list[str]]],
    store: _ImageStore,
    workers: int | None,
) -> list[tuple[str, Any, list[int]]]:
    """The one validation path: `parse` checks a record's content, then its images are decoded.

    `parse(record)` returns (item, image names) or raises `RecordSkipped`. Returns (source, item, image
    indices) for the records that pass, and sets `report.kept`.
    """
    staged = []
    for record in records:
        try:
            item, names = parse(record)
        except RecordSkipped as skip:
            reject(report, record.source, skip, strict)
            continue
        staged.append((record.source, item, [store.add(name) for name in names]))
    failures = store.check(workers)
    kept = []
    for source, item, indices in staged:
        failure = next((failures[i] for i in indices if i in failures), None)
        if failure is not None:
            reject(report, source, failure, strict)
        else:
            kept.append((source, item, indices))
    report.kept = len(kept)
    if not kept:
        raise DataError(f"no usable records: {report.summary()}")
    return kept


class _SkippingDataset(Dataset):
    """Serves sample i, or, if its image went bad after loading, the next readable one (i+1, i+2, ...).

    `runtime_skips` counts failed reads; it lives in shared memory so DataLoader workers add to it
    (increments from concurrent workers may rarely race; it is a diagnostic, not an exact tally).
    """

    sources: list[str]

    def _init_runtime(self) -> None:
        self._runtime_skips = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    @property
    def runtime_skips(self) -> int:
        return int(self._runtime_skips.item())

    def __len__(self) -> int:
        return len(self.sources)

    def _sample(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        for step in range(n):
            current = (index + step) % n
            try:
                return self._sample(current)
            except ImageError as err:
                self._runtime_skips += 1
                if str(err.path) not in self._warned:  # once per file, not once per sample
                    self._warned.add(str(err.path))
                    logger.warning("%s: %s; serving the next sample instead", self.sources[current], err)
        raise DataError(f"none of the {n} samples could be read (images missing or unreadable since loading)")


# -- datasets ---------------------------------------------------------------------------------


def _image_names(data: dict[str, Any]) -> list[str]:
    value = data.get("image")
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise RecordSkipped("bad_image_field", f"'image' must be a path or a list of paths, got {value!r:.80}")
    return names


def _with_image_tags(data: dict[str, Any], num_images: int, tag: str) -> dict[str, Any]:
    """Prepend one tag per image to the first human turn when the text has no tag at all."""
    turns = data.get("conversations")
    if not num_images or not isinstance(turns, list):
        return data
    if any(isinstance(turn, dict) and tag in str(turn.get("value", "")) for turn in turns):
        return data
    for k, turn in enumerate(turns):
        if isinstance(turn, dict) and "value" in turn and ROLE_ALIASES.get(str(turn.get("from")).lower()) == "user":
            turns = list(turns)  # copy: the caller's record stays as it was read
            turns[k] = {**turn, "value": f"{tag}\n" * num_images + str(turn["value"])}
            return {**data, "conversations": turns}
    return data


class ConversationDataset(_SkippingDataset):
    """LLaVA-format conversations with their images or clip, validated at load time (see the module doc).

    A sample is ``{"input_ids": [L], "labels": [L], "pixel_values": [n, 3, H, W], "num_images": n}``, plus
    ``"image_frames"`` (frames averaged into each of its images, summing to n) for a clip with temporal
    pooling; batch samples with `collate`. Image paths are relative to `image_root` unless absolute.
    Records with a ``"video"`` need `video` (the model's `VideoSampler`, `VLMProcessor.video`).
    """

    def __init__(
        self,
        path: str | Path | None,
        image_root: str | Path,
        chat: ChatFormat,
        processor: ImageProcessor,
        max_length: int,
        strict: bool = False,
        cache_images: bool = True,
        *,
        records: Sequence[Record] | None = None,
        report: LoadReport | None = None,
        decode_workers: int | None = None,
        video: VideoSampler | None = None,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if records is None:
            if path is None:
                raise ValueError("give a data file path or already-read records")
            records, report = read_record_file(path, strict)
        elif report is None:
            report = LoadReport(str(path or "<records>"), total=len(records), kept=len(records))
        self.chat, self.processor, self.max_length, self.video = chat, processor, max_length, video
        self.report = report
        self._store = _ImageStore(image_root, processor, cache_images)
        kept = _validate(records, report, strict, self._parse, self._store, decode_workers)
        report.log_summary()
        self.sources = [source for source, _, _ in kept]
        self._images = [tuple(indices) for _, _, indices in kept]
        self._frames = {i: groups for i, (_, (_, _, groups), _) in enumerate(kept) if groups is not None}
        # Token ids of all samples in two flat int32 arrays: far smaller than per-sample Python lists.
        lengths = [len(ids) for _, (ids, _, _), _ in kept]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._ids = np.concatenate([ids for _, (ids, _, _), _ in kept])
        self._labels = np.concatenate([labels for _, (_, labels, _), _ in kept])
        self._features: torch.Tensor | None = None
        self._init_runtime()

    @property
    def lengths(self) -> np.ndarray:
        """Token length of every sample (image placeholders included), for length-grouped batching."""
        return np.diff(self._offsets)

    @classmethod
    def from_records(
        cls,
        records: Sequence[Record],
        report: LoadReport | None,
        image_root: str | Path,
        chat: ChatFormat,
        processor: ImageProcessor,
        max_length: int,
        strict: bool = False,
        cache_images: bool = True,
        decode_workers: int | None = None,
        video: VideoSampler | None = None,
    ) -> ConversationDataset:
        """Build from already-read records (e.g. `caption_records`), continuing their report."""
        path = report.path if report is not None else None
        return cls(path, image_root, chat, processor, max_length, strict, cache_images,
                   records=records, report=report, decode_workers=decode_workers, video=video)

    def _clip(self, data: dict[str, Any]) -> tuple[dict[str, Any], list, tuple[int, ...] | None]:
        """A clip record as a record of images: its text with the frames' lines, the kept frames, and
        the frames per image (None when every image is one frame)."""
        if "image" in data:
            raise RecordSkipped("bad_video_field", "a record holds 'image' or 'video', not both")
        if self.video is None:
            raise RecordSkipped("bad_video_field", "this dataset was built without a video sampler "
                                                   "(VLMProcessor.video): it cannot read clips")
        try:
            clip = self.video.clip(data["video"], self._store.root)
        except VideoError as err:
            raise RecordSkipped("missing_video" if err.kind == "missing" else "unreadable_video", str(err)) from None
        except ImageError as err:  # a frame file, read to compare frames
            raise RecordSkipped("missing_image" if err.kind == "missing" else "unreadable_image", str(err)) from None
        except ValueError as err:
            raise RecordSkipped("bad_video_field", str(err)) from None
        try:
            data = insert_clip(data, clip.text)
        except ValueError as err:
            raise RecordSkipped("video_count_mismatch", str(err)) from None
        groups = None if all(n == 1 for n in clip.groups) else tuple(clip.groups)
        return data, clip.frames, groups

    def _parse(self, record: Record) -> tuple[tuple[np.ndarray, np.ndarray, tuple[int, ...] | None], list]:
        data = record.data
        groups = None
        if "video" in data:
            data, names, groups = self._clip(data)
        else:
            names = _image_names(data)
        data = _with_image_tags(data, len(names), self.chat.tok.image_token)
        try:
            encoded = self.chat.encode(data)
        except ConversationError as err:
            raise RecordSkipped("bad_conversation", str(err)) from None
        if all(label == IGNORE_INDEX for label in encoded.labels):
            raise RecordSkipped("bad_conversation", "no assistant answer to learn from")
        which = "the record" if record.index is None else f"record {record.index} (counting from 0)"
        if "video" in data:
            shown = len(names) if groups is None else len(groups)
            if encoded.num_images != shown:
                raise RecordSkipped("image_count_mismatch",
                                    f"{which} holds a clip shown as {shown} image(s) and {encoded.num_images - shown} "
                                    f"more {self.chat.tok.image_token} tag(s) in its text; a clip record has no "
                                    "images of its own")
        elif encoded.num_images != len(names):
            raise RecordSkipped("image_count_mismatch",
                                f"{which} has {encoded.num_images} {self.chat.tok.image_token} placeholder(s) in "
                                f"its text but {len(names)} image(s) in its 'image' field; give one placeholder "
                                "per image, in the order of the list")
        if len(encoded.input_ids) > self.max_length:
            raise RecordSkipped("too_long", f"{len(encoded.input_ids)} tokens > max_length {self.max_length}")
        ids = np.asarray(encoded.input_ids, dtype=np.int32)
        return (ids, np.asarray(encoded.labels, dtype=np.int32), groups), names

    @property
    def image_pixels(self) -> np.ndarray:
        """The resized uint8 images [N, size, size, 3] of the dataset's distinct image files (cached)."""
        if self._store._pixels is None:
            raise ValueError("image_pixels needs a dataset built with cache_images=True")
        return self._store._pixels

    def use_features(self, features: torch.Tensor) -> None:
        """Serve ``image_features`` (rows of `features` [N, P, D], one per `image_pixels` row) instead of
        pixels, e.g. a frozen tower's output computed once (see `vlmkit.train.features`)."""
        if features.shape[0] != len(self._store.paths):
            raise ValueError(f"{features.shape[0]} feature rows for {len(self._store.paths)} images")
        self._features = features

    def _sample(self, index: int) -> dict[str, Any]:
        start, end = self._offsets[index], self._offsets[index + 1]
        frames = self._frames.get(index)
        pooled = {} if frames is None else {"image_frames": list(frames)}
        if self._features is not None:
            rows = list(self._images[index])
            return {
                "input_ids": torch.from_numpy(self._ids[start:end]).long(),
                "labels": torch.from_numpy(self._labels[start:end]).long(),
                "image_features": self._features[rows],
                "num_images": len(rows) if frames is None else len(frames),
                **pooled,
            }
        pixels = [self._store.pixels(k) for k in self._images[index]]  # first: this may raise ImageError
        if pixels:
            pixel_values = self.processor.normalize(np.stack(pixels))
        else:
            pixel_values = torch.zeros(0, 3, self.processor.size, self.processor.size)
        return {
            "input_ids": torch.from_numpy(self._ids[start:end]).long(),
            "labels": torch.from_numpy(self._labels[start:end]).long(),
            "pixel_values": pixel_values,
            "num_images": len(pixels) if frames is None else len(frames),
            **pooled,
        }


class ImageTextDataset(_SkippingDataset):
    """Image-caption pairs for contrastive (CLIP-style) pretraining, from a caption ``.jsonl``/``.json``.

    A sample is ``{"pixel_values": [3, H, W], "text_ids": [T], "image_id": int}`` with the caption's
    tokens cut to `max_text_length` (`image_id` is equal for captions of one image file); batch with
    `collate_image_text`. For retrieval evaluation, `captions[i]` lists the distinct captions of item
    i's image (file order) and `image_paths[i]` is that image.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path,
        tokenizer: Tokenizer,
        processor: ImageProcessor,
        max_text_length: int,
        strict: bool = False,
        cache_images: bool = True,
        *,
        decode_workers: int | None = None,
    ):
        if max_text_length < 1:
            raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
        self.tokenizer, self.processor, self.max_text_length = tokenizer, processor, max_text_length
        records, self.report = read_record_file(path, strict)
        self._store = _ImageStore(image_root, processor, cache_images)
        kept = _validate(records, self.report, strict, self._parse, self._store, decode_workers)
        self.report.log_summary()
        self.sources = [source for source, _, _ in kept]
        self._image_index = [indices[0] for _, _, indices in kept]
        self._text_ids = [ids for _, (_, ids), _ in kept]
        by_image: dict[int, list[str]] = {}
        for image, (_, (caption, _), _) in zip(self._image_index, kept):
            if caption not in by_image.setdefault(image, []):
                by_image[image].append(caption)
        self.captions: list[list[str]] = [by_image[image] for image in self._image_index]
        self.image_paths: list[Path] = [self._store.paths[image] for image in self._image_index]
        self._init_runtime()

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self._text_ids]

    def image_key(self, index: int) -> str:
        """Item `index`'s image as a string (its resolved path): equal keys mean the same image."""
        return str(self.image_paths[index])

    def _parse(self, record: Record) -> tuple[tuple[str, np.ndarray], list[str]]:
        image, caption = caption_fields(record.data)
        ids = np.asarray(self.tokenizer.encode(caption)[: self.max_text_length], dtype=np.int32)
        return (caption, ids), [image]

    def _sample(self, index: int) -> dict[str, Any]:
        pixels = self._store.pixels(self._image_index[index])
        return {
            "pixel_values": self.processor.normalize(pixels),
            "text_ids": torch.from_numpy(self._text_ids[index]).long(),
            "image_id": self._image_index[index],  # equal for captions of the same image
        }
