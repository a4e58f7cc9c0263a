"""Reading user data files record by record: LLaVA-format ``.json`` / ``.jsonl`` and caption pairs.

Files are ``.json`` (a list of records) or ``.jsonl`` (one record per line, blank lines ignored). A bad
record is skipped, counted by reason in a `LoadReport` and named by ``file:line`` in a warning on the
``vlmkit.data`` logger; with ``strict=True`` the first bad record raises `DataError` instead. The
datasets (`vlmkit.data.datasets`) check what is left: the conversation text, then the image files.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("vlmkit.data")

MAX_LOGGED_WARNINGS = 20  # per report; the rest are counted in one line
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


class DataError(ValueError):
    """A data file or record cannot be used; the message names ``file`` or ``file:line`` and the reason."""


@dataclass(frozen=True)
class Record:
    source: str  # "file:line" where the record starts
    data: dict[str, Any]
    # Position among the file's records, from 0 (skipped ones count): `data[index]` of a .json list,
    # the index-th non-blank line of a .jsonl file. None for records built in memory.
    index: int | None = None


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


class RecordSkipped(Exception):
    """A record is rejected for `reason` (a LoadReport key); raised by checks, turned into a skip or an
    error by `reject`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def reject(report: LoadReport, source: str, skip: RecordSkipped, strict: bool) -> None:
    if strict:
        raise DataError(f"{source}: {skip.reason}: {skip.detail}")
    report.skip(source, skip.reason, skip.detail)


def read_records(path: str | Path, strict: bool = False) -> tuple[list[Record], LoadReport]:
    """Read the JSON objects of a ``.json`` / ``.jsonl`` file, skipping malformed lines and non-objects.

    A ``.json`` file that does not parse as a whole raises `DataError` with the error position.
    """
    records, report = read_record_file(path, strict)
    report.log_summary()
    return records, report


def read_record_file(path: str | Path, strict: bool) -> tuple[list[Record], LoadReport]:
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
            reject(report, source, RecordSkipped("malformed_json", error), strict)
        elif not isinstance(value, dict):
            reject(report, source,
                   RecordSkipped("not_a_dict", f"expected a JSON object, got {type(value).__name__}"), strict)
        else:
            records.append(Record(source, value, report.total - 1))
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


def caption_fields(data: dict[str, Any]) -> tuple[str, str]:
    image, caption = data.get("image"), data.get("caption")
    if not isinstance(image, str) or not image.strip():
        raise RecordSkipped("bad_caption", "needs an 'image' path (a non-empty string)")
    if not isinstance(caption, str) or not caption.strip():
        raise RecordSkipped("bad_caption", "needs a 'caption' (a non-empty string)")
    return image, caption


def caption_records(
    path: str | Path, prompt: str = "Describe the image.", strict: bool = False
) -> tuple[list[Record], LoadReport]:
    """Read ``{"image", "caption"}`` pairs as one-turn conversations (``<image>\\n{prompt}`` -> caption).

    The result feeds `ConversationDataset.from_records` for the alignment stage.
    """
    records, report = read_record_file(path, strict)
    conversations = []
    for record in records:
        try:
            image, caption = caption_fields(record.data)
        except RecordSkipped as skip:
            reject(report, record.source, skip, strict)
            continue
        data: dict[str, Any] = {"image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption}]}
        if "id" in record.data:
            data = {"id": record.data["id"], **data}
        conversations.append(Record(record.source, data, record.index))
    report.kept = len(conversations)
    report.log_summary()
    return conversations, report
