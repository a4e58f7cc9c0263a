"""Scoring free-text predictions against shapes-world question records.

Every question record has a ``type``; grounding questions are scored by box IoU, every other type by
exact match after `normalize_answer`. ``exists`` questions are additionally scored POPE-style
(`pope_metrics`), split by the kind of absent-object negative (``"random"`` / ``"popular"``) when the
records say which.

Answers a model gives in free text are never guessed at: a yes/no or a box that cannot be parsed is
counted in ``unparseable`` and scored as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# The dataset generator owns the box text format, so parsing and IoU come from there.
from vlmkit.data.boxes import box_iou, parse_box

__all__ = [
    "QUESTION_TYPES",
    "grounding_metrics",
    "markdown_table",
    "normalize_answer",
    "parse_yes_no",
    "pope_metrics",
    "score",
]

# Exact-match types in report order (shapes-world's single-image types, then its two-image ones); any
# other non-grounding type is scored the same way.
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "spatial", "size", "identify",
                                   "multi_count", "multi_both", "multi_added")

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
}
_ARTICLES = frozenset({"a", "an", "the"})
_TRAILING = ".,!?;:"
_QUOTES = "\"'`"
_YES_NO_RE = re.compile(r"\b(yes|no)\b")
# A leading yes/no that is the whole answer or is closed by punctuation ("Yes, there is ...").
_LEADING_YES_NO_RE = re.compile(r"(yes|no)(?:$|[.,!?;:])")


def normalize_answer(text: str | None) -> str:
    """Canonical form of a short answer, for exact-match scoring.

    Rule, in order: lowercase; strip surrounding whitespace and quotes; strip trailing punctuation
    (``. , ! ? ; :``); split on whitespace; drop one leading article ("a", "an", "the") when other
    words follow; map the whole words "zero".."ten" to "0".."10"; join with single spaces.
    ``None`` normalises to ``""``.

    >>> normalize_answer("The Red.")
    'red'
    >>> normalize_answer("  A red   star! ")
    'red star'
    >>> normalize_answer("Three")
    '3'
    """
    s = (text or "").lower().strip().strip(_QUOTES)
    # Repeat because punctuation, quotes and spaces can interleave at the end ("red ." / "red.'").
    prev = None
    while prev != s:
        prev = s
        s = s.rstrip().rstrip(_TRAILING).rstrip(_QUOTES)
    words = s.split()
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words)


def parse_yes_no(text: str | None) -> str | None:
    """``"yes"``, ``"no"`` or ``None`` (unparseable) for a free-text answer.

    Rule, on the `normalize_answer` form:

    1. if it starts with the word "yes" or "no" and that word is the whole answer or is followed
       directly by punctuation (``. , ! ? ; :``), that word ("Yes, there is" → yes, "no." → no,
       "No, yes would be wrong" → no);
    2. otherwise, if exactly one of the whole words "yes" / "no" appears anywhere, that word
       ("I think yes" → yes, "Yes there is" → yes);
    3. otherwise ``None``: neither appears ("maybe") or both do without a punctuated lead
       ("yes and no"). Callers count these; they are never mapped to an answer.
    """
    s = normalize_answer(text)
    m = _LEADING_YES_NO_RE.match(s)
    if m:
        return m.group(1)
    found = set(_YES_NO_RE.findall(s))
    return found.pop() if len(found) == 1 else None


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(predictions: Sequence[str | None], truths: Sequence[str]) -> dict[str, Any]:
    """POPE-style binary metrics with "yes" as the positive class.

    ``predictions`` are free text (parsed with `parse_yes_no`) or ``None`` for no answer; ``truths``
    must each normalise to exactly "yes" or "no". An unparseable prediction is wrong for accuracy,
    is not a positive prediction (so it is a false negative when the truth is "yes") and is counted
    in ``unparseable``. ``yes_ratio`` is the fraction of predictions parsed as "yes". Every ratio is
    0.0 when its denominator is 0.

    Returns ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (floats) and ``n``,
    ``unparseable`` (ints).
    """
    _check_lengths(predictions, truths, "truths")
    tp = fp = tn = fn = unparseable = 0
    for i, (pred, truth) in enumerate(zip(predictions, truths)):
        t = normalize_answer(truth)
        if t not in ("yes", "no"):
            raise ValueError(f"truth {i} must be 'yes' or 'no', got {truth!r}")
        p = parse_yes_no(pred)
        if p is None:
            unparseable += 1
            fn += t == "yes"
        elif p == "yes":
            tp += t == "yes"
            fp += t == "no"
        else:
            tn += t == "no"
            fn += t == "yes"
    n = len(truths)
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    return {
        "accuracy": _div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, n),
        "n": n,
        "unparseable": unparseable,
    }


def _parse_pred_box(text: str | None) -> tuple[int, int, int, int] | None:
    box = parse_box(text or "")
    # An empty box can only score IoU 0; calling it unparseable keeps the count honest.
    if box is None or box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def grounding_metrics(predictions: Sequence[str | None], boxes: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Box accuracy of free-text ``<box>x1,y1,x2,y2</box>`` predictions against reference boxes.

    A prediction is parsed with ``vlmkit.data.boxes.parse_box`` (first ``<box>...</box>`` in the
    text, spaces allowed); no box, or one with ``x2 <= x1`` or ``y2 <= y1``, is unparseable and scores
    IoU 0. Boxes must be in the same units as the predictions (normalised [0, 1000] in shapes-world).

    Returns ``acc50`` (fraction with IoU >= 0.5), ``miou`` (mean IoU), ``n`` and ``unparseable``;
    the ratios are 0.0 when ``n`` is 0.
    """
    _check_lengths(predictions, boxes, "boxes")
    hits = unparseable = 0
    total = 0.0
    for pred, ref in zip(predictions, boxes):
        box = _parse_pred_box(pred)
        if box is None:
            unparseable += 1
            continue
        iou = box_iou(box, ref)
        total += iou
        hits += iou >= 0.5
    n = len(boxes)
    return {"acc50": _div(hits, n), "miou": _div(total, n), "n": n, "unparseable": unparseable}


def _check_lengths(predictions: Sequence[Any], other: Sequence[Any], name: str) -> None:
    if len(predictions) != len(other):
        raise ValueError(f"got {len(predictions)} predictions for {len(other)} {name}; lengths must match")


def _record_box(record: Mapping[str, Any], i: int) -> Sequence[float]:
    if record.get("box") is not None:
        return record["box"]
    box = parse_box(str(record.get("answer", "")))
    if box is None:
        raise ValueError(f"grounding record {i} has no 'box' and no <box>...</box> answer")
    return box


def score(records: Sequence[Mapping[str, Any]], predictions: Sequence[str | None]) -> dict[str, Any]:
    """Score one prediction per question record.

    Returns:

    - ``n_samples``: number of records;
    - ``n_by_type``: number of records per type (grounding included);
    - ``vqa_accuracy``: exact match after `normalize_answer` over every non-grounding record
      (``exists`` included);
    - ``vqa_accuracy_by_type``: the same per type present;
    - ``pope``: `pope_metrics` over the ``exists`` records, plus ``by_negative``: for each negative
      kind carried by the records (``record["negative"]``), `pope_metrics` over the positive
      ("yes") records together with that kind's negatives (``{}`` when no record carries a kind);
    - ``grounding``: `grounding_metrics` over the ``grounding`` records, the reference box taken from
      ``record["box"]`` or else parsed from ``record["answer"]``.

    ``vqa_accuracy``, ``pope`` and ``grounding`` are absent when there are no records to compute
    them on, as is a type with no records in ``vqa_accuracy_by_type``. Raises ValueError when the
    lengths differ or a record lacks ``type`` / ``answer``.
    """
    _check_lengths(predictions, records, "records")
    n_by_type: dict[str, int] = {}
    correct_by_type: dict[str, int] = {}
    exists: list[tuple[str | None, str, str | None]] = []  # (prediction, truth, negative kind)
    g_preds: list[str | None] = []
    g_boxes: list[Sequence[float]] = []
    for i, (rec, pred) in enumerate(zip(records, predictions)):
        if "type" not in rec or "answer" not in rec:
            raise ValueError(f"record {i} needs 'type' and 'answer' keys, got {sorted(rec)}")
        qtype = str(rec["type"])
        n_by_type[qtype] = n_by_type.get(qtype, 0) + 1
        if qtype == "grounding":
            g_preds.append(pred)
            g_boxes.append(_record_box(rec, i))
            continue
        ok = normalize_answer(pred) == normalize_answer(str(rec["answer"]))
        correct_by_type[qtype] = correct_by_type.get(qtype, 0) + ok
        if qtype == "exists":
            exists.append((pred, str(rec["answer"]), rec.get("negative")))

    # Known types first in report order, then anything else alphabetically.
    order = [t for t in QUESTION_TYPES if t in correct_by_type] + sorted(set(correct_by_type) - set(QUESTION_TYPES))
    out: dict[str, Any] = {
        "n_samples": len(records),
        "n_by_type": n_by_type,
        "vqa_accuracy_by_type": {t: correct_by_type[t] / n_by_type[t] for t in order},
    }
    n_vqa = sum(n_by_type[t] for t in order)
    if n_vqa:
        out["vqa_accuracy"] = sum(correct_by_type.values()) / n_vqa
    if exists:
        pope = pope_metrics([p for p, _, _ in exists], [t for _, t, _ in exists])
        positives = [(p, t) for p, t, _ in exists if normalize_answer(t) == "yes"]
        by_negative = {}
        for kind in sorted({k for _, _, k in exists if k is not None}):
            subset = positives + [(p, t) for p, t, k in exists if k == kind]
            by_negative[kind] = pope_metrics([p for p, _ in subset], [t for _, t in subset])
        pope["by_negative"] = by_negative
        out["pope"] = pope
    if g_preds:
        out["grounding"] = grounding_metrics(g_preds, g_boxes)
    return out


_MISSING = "–"


def _rows(results: Mapping[str, Any], types: Sequence[str]) -> dict[str, float | None]:
    by_type = results.get("vqa_accuracy_by_type") or {}
    pope = results.get("pope") or {}
    grounding = results.get("grounding") or {}
    rows: dict[str, float | None] = {"VQA accuracy": results.get("vqa_accuracy")}
    rows.update({f"VQA accuracy: {t}": by_type.get(t) for t in types})
    rows["POPE F1"] = pope.get("f1")
    rows["POPE accuracy"] = pope.get("accuracy")
    rows["POPE yes-ratio"] = pope.get("yes_ratio")
    rows["Grounding acc@0.5"] = grounding.get("acc50")
    rows["Grounding mIoU"] = grounding.get("miou")
    return rows


def markdown_table(results: Mapping[str, Any], extra: Mapping[str, Mapping[str, Any]] | None = None,
                   name: str = "test") -> str:
    """A markdown table of `score` results: one row per metric, a column `name` (the split scored) and
    one column per further split in `extra` (``{name: results}``, each scored by the same `score`).

    Rows: overall VQA accuracy; VQA accuracy per type present in either column; POPE F1, accuracy
    and yes-ratio; grounding acc@0.5 and mIoU. Values have 3 decimals; a metric missing from a
    column is shown as "–".
    """
    columns = [(name, results)] + list((extra or {}).items())
    present: set[str] = set()
    for _, res in columns:
        present |= set(res.get("vqa_accuracy_by_type") or {})
    types = [t for t in QUESTION_TYPES if t in present] + sorted(present - set(QUESTION_TYPES))
    cells = [_rows(res, types) for _, res in columns]
    lines = [
        "| metric | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label in cells[0]:
        values = [c[label] for c in cells]
        lines.append(f"| {label} | " + " | ".join(_MISSING if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines)
