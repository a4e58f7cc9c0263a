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
every image is resized to the processor's size, or, with a tiling (AnyRes) processor, cut into tiles
whose number, like the image's token count, follows its original size (a record is then ``too_long``
only once its images' sizes are known).

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
from vlmkit.data.video import NO_CLIPS_ANYRES, DecodedFrame, VideoError, VideoSampler, insert_clip

logger = logging.getLogger("vlmkit.data")

# -- images -----------------------------------------------------------------------------------


class _ImageStore:
    """The distinct image files of a dataset, each decoded once at load time.

    With `cache`, the resized images are kept in one uint8 array [N, size, size, 3] (one block of
    memory is cheap to share with DataLoader workers); otherwise they are decoded on every read.
    A tiling processor's images are runs of tiles: the array then holds every image's tiles, image
    after image ([total tiles, size, size, 3]), `rows(i)` says which are image i's, and `sizes` holds
    the original (height, width) of every image.
    """

    def __init__(self, root: str | Path, processor: ImageProcessor, cache: bool):
        self.root = Path(root)
        self.processor = processor
        self.cache = cache
        self.paths: list[Path] = []
        self.sizes: list[tuple[int, int]] = []
        self._index: dict[Path, int] = {}
        self._pixels: np.ndarray | None = None
        self._offsets: np.ndarray | None = None  # tiling: image i's tiles are rows offsets[i]:offsets[i + 1]
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
        tiling = self.processor.tiling
        if self.cache and not tiling:
            size = self.processor.size
            self._pixels = np.empty((len(self.paths), size, size, 3), dtype=np.uint8)
        self.sizes = [(0, 0)] * len(self.paths)
        tiles: list[np.ndarray | None] = [None] * len(self.paths)

        def visit(index: int) -> RecordSkipped | None:
            try:
                if tiling:  # the original size decides the tiles (clips never reach a tiling store)
                    image = load_image(self.paths[index])
                    self.sizes[index] = (image.height, image.width)
                    if self.cache:
                        tiles[index] = self.processor.tiles_uint8(image)[0]
                else:
                    pixels = self._load(index)
                    if self._pixels is not None:
                        self._pixels[index] = pixels
            except ImageError as err:
                return RecordSkipped("missing_image" if err.kind == "missing" else "unreadable_image", str(err))
            return None

        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(visit, range(len(self.paths))))
        if tiling and self.cache:  # a failed image keeps no rows
            s = self.processor.size
            kept = [t if t is not None else np.empty((0, s, s, 3), dtype=np.uint8) for t in tiles]
            self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in kept])]).astype(np.int64)
            self._pixels = np.concatenate(kept) if kept else np.empty((0, s, s, 3), dtype=np.uint8)
        elif self._pixels is not None:
            self._decoded.clear()  # the cache holds them now
        return {index: skip for index, skip in enumerate(results) if skip is not None}

    def pixels(self, index: int) -> np.ndarray:
        """Resized uint8 [size, size, 3]; raises ImageError if an uncached file went bad since loading."""
        if self._pixels is not None:
            return self._pixels[index]
        return self._load(index)

    def rows(self, index: int) -> range:
        """Rows of the cached array that belong to image `index` (one, unless tiling)."""
        if self._offsets is None:
            return range(index, index + 1)
        return range(self._offsets[index], self._offsets[index + 1])

    def tiles(self, index: int) -> np.ndarray:
        """Image `index` as uint8 [n, size, size, 3]: its tiles when tiling, else [1, ...] (see `pixels`)."""
        if not self.processor.tiling:
            return self.pixels(index)[None]
        if self._pixels is not None:
            return self._pixels[self._offsets[index] : self._offsets[index + 1]]
        return self.processor.tiles_uint8(load_image(self.paths[index]))[0]


def _validate(
    records: Sequence[Record],
    report: LoadReport,
    strict: bool,
    parse: Callable[[Record], tuple[Any, list[str]]],
    store: _ImageStore,
    workers: int | None,
    finish: Callable[[Any, list[int]], Any] | None = None,
) -> list[tuple[str, Any, list[int]]]:
    """The one validation path: `parse` checks a record's content, then its images are decoded.

    `parse(record)` returns (item, image names) or raises `RecordSkipped`; `finish(item, image indices)`,
    when given, completes an item once its images are decoded (and may raise `RecordSkipped` too).
    Returns (source, item, image indices) for the records that pass, and sets `report.kept`.
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
        if failure is None and finish is not None:
            try:
                item = finish(item, indices)
            except RecordSkipped as skip:
                failure = skip
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


def _recount_images(ids: np.ndarray, labels: np.ndarray, image_id: int, each: int,
                    counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and labels whose images each had `each` placeholders, with image k's run resized to `counts[k]`
    (placeholders carry no loss, so their labels stay IGNORE_INDEX)."""
    starts = np.flatnonzero(ids == image_id)[::each]
    id_parts, label_parts, done = [], [], 0
    for start, n in zip(starts, counts):
        id_parts += [ids[done:start], np.full(n, image_id, dtype=ids.dtype)]
        label_parts += [labels[done:start], np.full(n, IGNORE_INDEX, dtype=labels.dtype)]
        done = start + each
    return np.concatenate(id_parts + [ids[done:]]), np.concatenate(label_parts + [labels[done:]])


class ConversationDataset(_SkippingDataset):
    """LLaVA-format conversations with their images or clip, validated at load time (see the module doc).

    A sample is ``{"input_ids": [L], "labels": [L], "pixel_values": [n, 3, H, W], "num_images": n}``, plus
    ``"image_frames"`` (frames averaged into each of its images, summing to n) for a clip with temporal
    pooling; batch samples with `collate`. Image paths are relative to `image_root` unless absolute.
    Records with a ``"video"`` need `video` (the model's `VideoSampler`, `VLMProcessor.video`).

    With a tiling (AnyRes) `processor`, `image_tokens(height, width)` gives the token count of an image
    of that original size, and a sample's ``pixel_values`` are all its images' tiles [n_tiles, 3, S, S],
    with ``image_sizes`` [n, 2] (each image's original height and width). Its records hold no clips.
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
        image_tokens: Callable[[int, int], int] | None = None,
        video: VideoSampler | None = None,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if processor.tiling and image_tokens is None:
            raise ValueError("a tiling (AnyRes) image processor needs image_tokens(height, width), the token count "
                             "of an image of that original size (VLMProcessor.image_tokens)")
        if processor.tiling and video is not None:
            raise ValueError(NO_CLIPS_ANYRES)
        if records is None:
            if path is None:
                raise ValueError("give a data file path or already-read records")
            records, report = read_record_file(path, strict)
        elif report is None:
            report = LoadReport(str(path or "<records>"), total=len(records), kept=len(records))
        self.chat, self.processor, self.max_length, self.video = chat, processor, max_length, video
        self.report = report
        self._image_tokens = image_tokens if processor.tiling else None
        self._store = _ImageStore(image_root, processor, cache_images)
        finish = self._count_tiled_images if self._image_tokens is not None else None
        kept = _validate(records, report, strict, self._parse, self._store, decode_workers, finish)
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

    @property
    def images_per_sample(self) -> np.ndarray:
        return np.array([len(images) for images in self._images], dtype=np.int64)

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
        image_tokens: Callable[[int, int], int] | None = None,
        video: VideoSampler | None = None,
    ) -> ConversationDataset:
        """Build from already-read records (e.g. `caption_records`), continuing their report."""
        path = report.path if report is not None else None
        return cls(path, image_root, chat, processor, max_length, strict, cache_images,
                   records=records, report=report, decode_workers=decode_workers, image_tokens=image_tokens,
                   video=video)

    def _clip(self, data: dict[str, Any]) -> tuple[dict[str, Any], list, tuple[int, ...] | None]:
        """A clip record as a record of images: its text with the frames' lines, the kept frames, and
        the frames per image (None when every image is one frame)."""
        if "image" in data:
            raise RecordSkipped("bad_video_field", "a record holds 'image' or 'video', not both")
        if self.video is None:
            raise RecordSkipped("bad_video_field", NO_CLIPS_ANYRES if self.processor.tiling else
                                "this dataset was built without a video sampler (VLMProcessor.video): it cannot "
                                "read clips")
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
        if self._image_tokens is None and len(encoded.input_ids) > self.max_length:  # tiling: see finish
            raise RecordSkipped("too_long", f"{len(encoded.input_ids)} tokens > max_length {self.max_length}")
        ids = np.asarray(encoded.input_ids, dtype=np.int32)
        return (ids, np.asarray(encoded.labels, dtype=np.int32), groups), names

    def _count_tiled_images(self, item: tuple[np.ndarray, np.ndarray, None], images: list[int]):
        """AnyRes: once the images' original sizes are known, each gets its own token count."""
        ids, labels, groups = item
        if images:
            counts = [self._image_tokens(*self._store.sizes[k]) for k in images]
            ids, labels = _recount_images(ids, labels, self.chat.tok.image_id, self.chat.image_tokens, counts)
        if len(ids) > self.max_length:
            raise RecordSkipped("too_long", f"{len(ids)} tokens > max_length {self.max_length}")
        return ids, labels, groups

    @property
    def image_pixels(self) -> np.ndarray:
        """The resized uint8 images [N, size, size, 3] of the dataset's distinct image files (cached);
        tiling: every image's tiles, image after image [N_tiles, size, size, 3]."""
        if self._store._pixels is None:
            raise ValueError("image_pixels needs a dataset built with cache_images=True")
        return self._store._pixels

    def use_features(self, features: torch.Tensor) -> None:
        """Serve ``image_features`` (rows of `features` [N, P, D], one per `image_pixels` row) instead of
        pixels, e.g. a frozen tower's output computed once (see `vlmkit.train.features`)."""
        rows = len(self.image_pixels) if self.processor.tiling else len(self._store.paths)
        if features.shape[0] != rows:
            what = "tiles" if self.processor.tiling else "images"
            raise ValueError(f"{features.shape[0]} feature rows for {rows} {what}")
        self._features = features

    def _sample(self, index: int) -> dict[str, Any]:
        start, end = self._offsets[index], self._offsets[index + 1]
        images = self._images[index]
        frames = self._frames.get(index)  # a pooled clip: frames per shown image
        sample: dict[str, Any] = {"input_ids": torch.from_numpy(self._ids[start:end]).long(),
                                  "labels": torch.from_numpy(self._labels[start:end]).long(),
                                  "num_images": len(images) if frames is None else len(frames)}
        if frames is not None:
            sample["image_frames"] = list(frames)
        if self.processor.tiling:
            sample["image_sizes"] = torch.tensor([self._store.sizes[k] for k in images], dtype=torch.long).view(-1, 2)
        if self._features is not None:
            sample["image_features"] = self._features[[row for k in images for row in self._store.rows(k)]]
            return sample
        tiles = [self._store.tiles(k) for k in images]  # first: this may raise ImageError
        if tiles:
            sample["pixel_values"] = self.processor.normalize(np.concatenate(tiles))
        else:
            sample["pixel_values"] = torch.zeros(0, 3, self.processor.size, self.processor.size)
        return sample


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
        if processor.tiling:
            raise ValueError("image-caption pairs take one resized square per image: give a processor without "
                             "grid_pinpoints")
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
