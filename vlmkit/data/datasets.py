"""Robust loading of user data: LLaVA-format conversations and image-caption pairs.

Files are ``.json`` (a list of records) or ``.jsonl`` (one record per line, blank lines ignored).
Every record is checked when a dataset is built. A bad record is skipped, counted by reason in a
`LoadReport` and named by ``file:line`` in a warning on the ``vlmkit.data`` logger; with
``strict=True`` the first bad record found raises `DataError` instead (problems are found in
stages: JSON syntax while reading, then the conversation text, then the image files).

Skip reasons: ``malformed_json``, ``not_a_dict``, ``bad_image_field``, ``bad_caption``,
``bad_conversation`` (also unknown roles and conversations without an assistant answer),
``image_count_mismatch``, ``too_long``, ``missing_image``, ``unreadable_image``.

LLaVA convention: a record that has images but no ``<image>`` tag anywhere in its text gets one
``<image>\\n`` per image prepended to its first human turn (LLaVA datasets often omit the tag).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.chat import ROLE_ALIASES, ChatFormat, ConversationError
from vlmkit.data.images import ImageError, ImageProcessor, load_image
from vlmkit.data.tokenizer import Tokenizer

logger = logging.getLogger("vlmkit.data")

MAX_LOGGED_WARNINGS = 20  # per report; the rest are counted in one line
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file or record cannot be used; the message names ``file`` or ``file:line`` and the reason."""


@dataclass(frozen=True)
class Record:
    source: str  # "file:line" where the record starts
    data: dict[str, Any]


@dataclass
class LoadReport:
    """What happened while loading one data file: counts per skip reason and one warning per skip."""

    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    _overflow_logged: int = field(default=0, init=False, repr=False, compare=False)

    def skip(self, source: str, reason: str, detail: str) -> None:
        """Count a skipped record; only the first `MAX_LOGGED_WARNINGS` are logged one by one."""
        message = f"{source}: {reason}: {detail}"
        self.skipped[reason] += 1
        self.warnings.append(message)
        if len(self.warnings) <= MAX_LOGGED_WARNINGS:
            logger.warning("%s", message)

    def summary(self) -> str:
        text = f"loaded {self.kept} of {self.total} records from {self.path}"
        n = sum(self.skipped.values())
        if not n:
            return f"{text}; nothing skipped"
        reasons = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        return f"{text}; skipped {n}: " + ", ".join(f"{count} {reason}" for reason, count in reasons)

    def log_summary(self) -> None:
        unlogged = len(self.warnings) - MAX_LOGGED_WARNINGS - self._overflow_logged
        if unlogged > 0:
            logger.warning("%d more skipped records not logged one by one (see LoadReport.warnings)", unlogged)
            self._overflow_logged += unlogged
        logger.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())


class _Skip(Exception):
    """Internal: a record is rejected for `reason` (a LoadReport key)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _reject(report: LoadReport, source: str, skip: _Skip, strict: bool) -> None:
    if strict:
        raise DataError(f"{source}: {skip.reason}: {skip.detail}")
    report.skip(source, skip.reason, skip.detail)


# -- reading ----------------------------------------------------------------------------------


def read_records(path: str | Path, strict: bool = False) -> tuple[list[Record], LoadReport]:
    """Read the JSON objects of a ``.json`` / ``.jsonl`` file, skipping malformed lines and non-objects.

    A ``.json`` file that does not parse as a whole raises `DataError` with the error position.
    """
    records, report = _read(path, strict)
    report.log_summary()
    return records, report


def _read(path: str | Path, strict: bool) -> tuple[list[Record], LoadReport]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        items = _jsonl_items(path)
    elif suffix == ".json":
        items = _json_items(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .json or .jsonl")
    report = LoadReport(str(path))
    records = []
    for line, value, error in items:
        report.total += 1
        source = f"{path}:{line}"
        if error is not None:
            _reject(report, source, _Skip("malformed_json", error), strict)
        elif not isinstance(value, dict):
            _reject(report, source, _Skip("not_a_dict", f"expected a JSON object, got {type(value).__name__}"), strict)
        else:
            records.append(Record(source, value))
    report.kept = len(records)
    return records, report


def _jsonl_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, error) per non-blank line."""
    with open(path, "rb") as f:  # bytes: a bad encoding on one line must only cost that line
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            raw = raw.rstrip()
            if not raw:
                continue
            try:
                yield number, json.loads(raw), None
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON at column {err.colno}: {err.msg}"
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 text ({err})"


def _json_items(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) per element of a top-level JSON list.

    Elements are decoded one at a time so each record knows the line it starts on.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    try:
        yield from _json_array_items(path, text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def _json_array_items(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    decoder = json.JSONDecoder()
    pos = _JSON_WHITESPACE.match(text).end()
    if not text.startswith("[", pos):
        value = json.loads(text)  # raises a positioned error unless the file is valid JSON
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {type(value).__name__}")
    line, counted = 1, 0
    pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    if not text.startswith("]", pos):
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            value, pos = decoder.raw_decode(text, pos)
            yield line, value, None
            pos = _JSON_WHITESPACE.match(text, pos).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
            pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)


def _caption_fields(data: dict[str, Any]) -> tuple[str, str]:
    image, caption = data.get("image"), data.get("caption")
    if not isinstance(image, str) or not image.strip():
        raise _Skip("bad_caption", "needs an 'image' path (a non-empty string)")
    if not isinstance(caption, str) or not caption.strip():
        raise _Skip("bad_caption", "needs a 'caption' (a non-empty string)")
    return image, caption


def caption_records(
    path: str | Path, prompt: str = "Describe the image.", strict: bool = False
) -> tuple[list[Record], LoadReport]:
    """Read ``{"image", "caption"}`` pairs as one-turn conversations (``<image>\\n{prompt}`` -> caption).

    The result feeds `ConversationDataset.from_records` for the alignment stage.
    """
    records, report = _read(path, strict)
    conversations = []
    for record in records:
        try:
            image, caption = _caption_fields(record.data)
        except _Skip as skip:
            _reject(report, record.source, skip, strict)
            continue
        data: dict[str, Any] = {"image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption}]}
        if "id" in record.data:
            data = {"id": record.data["id"], **data}
        conversations.append(Record(record.source, data))
    report.kept = len(conversations)
    report.log_summary()
    return conversations, report


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

    def add(self, name: str) -> int:
        # An absolute `name` replaces the root; normpath makes "a/./b.png" and "a/b.png" one image.
        path = Path(os.path.normpath(self.root / name))
        if path not in self._index:
            self._index[path] = len(self.paths)
            self.paths.append(path)
        return self._index[path]

    def check(self, workers: int | None) -> dict[int, _Skip]:
        """Decode every image once (in threads: PIL releases the GIL); returns failures by index."""
        if self.cache:
            size = self.processor.size
            self._pixels = np.empty((len(self.paths), size, size, 3), dtype=np.uint8)

        def visit(index: int) -> _Skip | None:
            try:
                image = load_image(self.paths[index])
                if self._pixels is not None:
                    self._pixels[index] = self.processor.to_uint8(image)
            except ImageError as err:
                return _Skip("missing_image" if err.kind == "missing" else "unreadable_image", str(err))
            return None

        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(visit, range(len(self.paths))))
        return {index: skip for index, skip in enumerate(results) if skip is not None}

    def pixels(self, index: int) -> np.ndarray:
        """Resized uint8 [size, size, 3]; raises ImageError if an uncached file went bad since loading."""
        if self._pixels is not None:
            return self._pixels[index]
        return self.processor.to_uint8(load_image(self.paths[index]))


def _validate(
    records: Sequence[Record],
    report: LoadReport,
    strict: bool,
    parse: Callable[[dict[str, Any]], tuple[Any, list[str]]],
    store: _ImageStore,
    workers: int | None,
) -> list[tuple[str, Any, list[int]]]:
    """The one validation path: `parse` checks a record's content, then its images are decoded.

    `parse(data)` returns (item, image names) or raises `_Skip`. Returns (source, item, image
    indices) for the records that pass, and sets `report.kept`.
    """
    staged = []
    for record in records:
        try:
            item, names = parse(record.data)
        except _Skip as skip:
            _reject(report, record.source, skip, strict)
            continue
        staged.append((record.source, item, [store.add(name) for name in names]))
    failures = store.check(workers)
    kept = []
    for source, item, indices in staged:
        failure = next((failures[i] for i in indices if i in failures), None)
        if failure is not None:
            _reject(report, source, failure, strict)
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
        raise _Skip("bad_image_field", f"'image' must be a path or a list of paths, got {value!r:.80}")
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
    """LLaVA-format conversations with their images, validated at load time (see the module doc).

    A sample is ``{"input_ids": [L], "labels": [L], "pixel_values": [n, 3, H, W], "num_images": n}``;
    batch samples with `collate`. Image paths are relative to `image_root` unless absolute.
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
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if records is None:
            if path is None:
                raise ValueError("give a data file path or already-read records")
            records, report = _read(path, strict)
        elif report is None:
            report = LoadReport(str(path or "<records>"), total=len(records), kept=len(records))
        self.chat, self.processor, self.max_length = chat, processor, max_length
        self.report = report
        self._store = _ImageStore(image_root, processor, cache_images)
        kept = _validate(records, report, strict, self._parse, self._store, decode_workers)
        report.log_summary()
        self.sources = [source for source, _, _ in kept]
        self._images = [tuple(indices) for _, _, indices in kept]
        # Token ids of all samples in two flat int32 arrays: far smaller than per-sample Python lists.
        lengths = [len(ids) for _, (ids, _), _ in kept]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._ids = np.concatenate([ids for _, (ids, _), _ in kept])
        self._labels = np.concatenate([labels for _, (_, labels), _ in kept])
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
    ) -> ConversationDataset:
        """Build from already-read records (e.g. `caption_records`), continuing their report."""
        path = report.path if report is not None else None
        return cls(path, image_root, chat, processor, max_length, strict, cache_images,
                   records=records, report=report, decode_workers=decode_workers)

    def _parse(self, data: dict[str, Any]) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
        names = _image_names(data)
        data = _with_image_tags(data, len(names), self.chat.tok.image_token)
        try:
            encoded = self.chat.encode(data)
        except ConversationError as err:
            raise _Skip("bad_conversation", str(err)) from None
        if all(label == IGNORE_INDEX for label in encoded.labels):
            raise _Skip("bad_conversation", "no assistant answer to learn from")
        if encoded.num_images != len(names):
            raise _Skip("image_count_mismatch",
                        f"{encoded.num_images} <image> placeholder(s) in the text but {len(names)} image(s) given")
        if len(encoded.input_ids) > self.max_length:
            raise _Skip("too_long", f"{len(encoded.input_ids)} tokens > max_length {self.max_length}")
        ids = np.asarray(encoded.input_ids, dtype=np.int32)
        return (ids, np.asarray(encoded.labels, dtype=np.int32)), names

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
        if self._features is not None:
            rows = list(self._images[index])
            return {
                "input_ids": torch.from_numpy(self._ids[start:end]).long(),
                "labels": torch.from_numpy(self._labels[start:end]).long(),
                "image_features": self._features[rows],
                "num_images": len(rows),
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
            "num_images": len(pixels),
        }


class ImageTextDataset(_SkippingDataset):
    """Image-caption pairs for contrastive (CLIP-style) pretraining, from a caption ``.jsonl``/``.json``.

    A sample is ``{"pixel_values": [3, H, W], "text_ids": [T]}`` with the caption's tokens cut to
    `max_text_length`; batch with `collate_image_text`. For retrieval evaluation, `captions[i]`
    lists the distinct captions of item i's image (file order) and `image_paths[i]` is that image.
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
        records, self.report = _read(path, strict)
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

    def _parse(self, data: dict[str, Any]) -> tuple[tuple[str, np.ndarray], list[str]]:
        image, caption = _caption_fields(data)
        ids = np.asarray(self.tokenizer.encode(caption)[: self.max_text_length], dtype=np.int32)
        return (caption, ids), [image]

    def _sample(self, index: int) -> dict[str, Any]:
        pixels = self._store.pixels(self._image_index[index])
        return {
            "pixel_values": self.processor.normalize(pixels),
            "text_ids": torch.from_numpy(self._text_ids[index]).long(),
        }


# -- batching ---------------------------------------------------------------------------------


def _pad(sequences: list[torch.Tensor], value: int) -> torch.Tensor:
    return pad_sequence(sequences, batch_first=True, padding_value=value)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _join_images(images: list[torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor | list[torch.Tensor] | None:
    """Per-sample images ([n, ...] tensors or lists of single images) in sample order: one tensor when
    they all have one shape, else a list of single images (the model groups them by size)."""
    if not images:
        return None
    if all(torch.is_tensor(x) for x in images) and len({x.shape[1:] for x in images}) == 1:
        return torch.cat(images)
    flat = [image for sample in images for image in sample]
    return torch.stack(flat) if len({image.shape for image in flat}) == 1 else flat


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
    """Right-pad `ConversationDataset` samples; images are concatenated in sample order.

    Returns ``input_ids`` / ``labels`` (padded with IGNORE_INDEX) / ``attention_mask`` [B, L],
    ``pixel_values`` [N_total, 3, H, W] (or, when image sizes differ, a list of N_total [3, H_i, W_i])
    or None when the batch has no image, ``image_counts`` [B]. Samples that carry ``image_features``
    (see `ConversationDataset.use_features`) give ``image_features`` [N_total, P, D] in place of
    ``pixel_values``.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    input_ids = _pad([sample["input_ids"] for sample in batch], pad_id)
    key = "image_features" if any("image_features" in sample for sample in batch) else "pixel_values"
    images = [sample[key] for sample in batch if sample["num_images"]]
    return {
        "input_ids": input_ids,
        "labels": _pad([sample["labels"] for sample in batch], IGNORE_INDEX),
        "attention_mask": _mask([len(sample["input_ids"]) for sample in batch], input_ids.shape[1]),
        key: _join_images(images),
        "image_counts": torch.tensor([sample["num_images"] for sample in batch], dtype=torch.long),
    }


def collate_image_text(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack `ImageTextDataset` samples: ``pixel_values`` [B, 3, H, W], ``text_ids`` / ``text_mask`` [B, T]."""
    if not batch:
        raise ValueError("collate_image_text got an empty batch")
    text_ids = _pad([sample["text_ids"] for sample in batch], pad_id)
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "text_ids": text_ids,
        "text_mask": _mask([len(sample["text_ids"]) for sample in batch], text_ids.shape[1]),
    }
