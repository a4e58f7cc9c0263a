"""Atomic file and directory writes (a crash mid-write never leaves a half-written result behind),
and JSON reads whose errors name the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target`.

    The new directory is complete before it gets the target's name. An existing target is moved
    aside first and removed only after the swap, so at every instant either the old or the new
    version exists under a known name (a leftover `.old-*` sibling is the previous version).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_file(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON is an error naming the file (and `what` it is for)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def read_jsonl(path: str | Path, hint: str = "") -> list[Any]:
    """The rows of a JSON Lines file (blank lines skipped); errors name the file and line.
    `hint` follows the not-found message (e.g. what kind of directory was expected)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found{hint}")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to `path` via a temporary file and a rename."""
    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it is synced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
