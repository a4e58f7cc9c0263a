"""Writing a benchmark's generated table into its page under docs/, keeping the prose around it."""

from __future__ import annotations

from pathlib import Path


def write_table_section(doc: Path, begin: str, end: str, body: str, title: str) -> None:
    """Put `begin`, `body`, `end` into `doc`: in place of the section between the markers when the page
    has them (the hand-written prose around it stays), else at its end (a new page starts with `title`)."""
    section = f"{begin}\n{body}\n{end}"
    text = doc.read_text() if doc.is_file() else f"# {title}\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
