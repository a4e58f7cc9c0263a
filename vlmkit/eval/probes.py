"""Prior-reliance probes: does the answer come from the image or from the question alone?

**Blind.** The same questions are answered three times: with their image, with a blank image
(constant grey, RGB 128) and with the dataset-mean image (the pixel mean of the split's images). A
model that looks at the image should fall to *chance* without it; one that stays high answers from
language priors. Chance for a question type is the better of two guessers that ignore the image:

- ``majority``: always give the type's most frequent answer in the split (accuracy on the asked
  questions);
- ``uniform``: pick uniformly among the candidates: 2 for types whose question names its two options
  (``exists`` yes/no, ``spatial`` left/right or above/below, ``size`` the two objects), else the number
  of distinct answers of that type in the split.

**Swap.** Each question is paired with a different image of the same split whose ground-truth answer
to the *same question* differs (the partner is a record with the identical question text, another
image and another answer; chosen deterministically from ``(seed, record id)``). The model answers it on
the partner image. ``grounding_rate`` is how often that answer equals the partner's truth;
``changed_rate`` how often it differs from the answer on the original image (it should always change).
Questions whose text no other image shares (e.g. most size and spatial questions) have no partner and
are counted in ``coverage``.

Answers are compared as in `vlmkit.eval.metrics`: yes/no questions through `parse_yes_no` (an
unparsed answer matches nothing), everything else by `normalize_answer` equality.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.data.images import ImageProcessor, Tiles, load_image
from vlmkit.eval.metrics import normalize_answer, parse_yes_no

GREY_RGB = (128, 128, 128)
TWO_CANDIDATE_TYPES = frozenset({"exists", "spatial", "size"})


def is_yes_no(truth: str) -> bool:
    return normalize_answer(truth) in ("yes", "no")


def canonical(text: str | None, yes_no: bool) -> str | None:
    """The form answers are compared in (None: an unparsed yes/no answer)."""
    return parse_yes_no(text) if yes_no else normalize_answer(text)


def is_correct(prediction: str | None, truth: str) -> bool:
    yes_no = is_yes_no(truth)
    return canonical(prediction, yes_no) == canonical(truth, yes_no)


def _type(record: Mapping[str, Any]) -> str:
    return str(record.get("type", "all"))


# --------------------------------------------------------------------------------------------------
# Blind


def blank_image(processor: ImageProcessor, size: tuple[int, int] | None = None) -> torch.Tensor | Tiles:
    """A grey image, preprocessed; `size`: its (height, width) before preprocessing (default: the
    processor's square), which decides the grid of a tiling (AnyRes) processor's `Tiles`."""
    height, width = size or (processor.size, processor.size)
    image = Image.new("RGB", (width, height), GREY_RGB)
    return processor.tiles(image) if processor.tiling else processor(image)


def mean_image(processor: ImageProcessor, paths: Sequence[Path]) -> torch.Tensor | Tiles:
    """Pixel mean of the images (as the model sees them); normalisation is linear, so this is the
    normalised mean image. A tiling processor averages the images' `Tiles`, which needs images of one size."""
    if not paths:
        raise ValueError("mean_image needs at least one image")
    if processor.tiling:
        tiles = [processor.tiles(load_image(path)) for path in paths]
        sizes = {t.size for t in tiles}
        if len(sizes) > 1:
            raise ValueError(f"mean_image: AnyRes tiles of images of different sizes {sorted(sizes)} cannot be "
                             "averaged; give images of one size")
        return Tiles(torch.stack([t.pixels for t in tiles]).mean(dim=0), tiles[0].size)
    total = torch.zeros(3, processor.size, processor.size)
    for path in paths:
        total += processor(path)
    return total / len(paths)


def chance_levels(asked: Sequence[Mapping[str, Any]], split: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """Per type: ``majority``, ``uniform`` and ``chance`` (their maximum), see the module docstring.
    ``split`` (every record of the split) gives the answer distribution, ``asked`` the questions."""
    answers: dict[str, Counter] = {}
    for r in split:
        answers.setdefault(_type(r), Counter())[normalize_answer(str(r["answer"]))] += 1
    out = {}
    for qtype in dict.fromkeys(_type(r) for r in asked):
        dist = answers.get(qtype) or Counter()
        majority_answer = dist.most_common(1)[0][0] if dist else None
        of_type = [r for r in asked if _type(r) == qtype]
        majority = sum(normalize_answer(str(r["answer"])) == majority_answer for r in of_type) / len(of_type)
        n_candidates = 2 if qtype in TWO_CANDIDATE_TYPES else max(1, len(dist))
        out[qtype] = {"majority": majority, "majority_answer": majority_answer, "uniform": 1 / n_candidates,
                      "chance": max(majority, 1 / n_candidates)}
    return out


def accuracy_by_type(records: Sequence[Mapping[str, Any]], predictions: Sequence[str | None]) -> dict[str, float]:
    hits: Counter = Counter()
    counts: Counter = Counter()
    for r, p in zip(records, predictions):
        counts[_type(r)] += 1
        hits[_type(r)] += is_correct(p, str(r["answer"]))
    return {t: hits[t] / counts[t] for t in counts}


def blind_scores(records: Sequence[Mapping[str, Any]], split_records: Sequence[Mapping[str, Any]],
                 predictions: Mapping[str, Sequence[str | None]]) -> dict[str, Any]:
    """Accuracy per type and overall for each condition in ``predictions`` (e.g. ``image``, ``blank``,
    ``mean``: one answer per record), next to chance. Overall chance is the count-weighted mean."""
    counts = Counter(_type(r) for r in records)
    chance = chance_levels(records, split_records)
    by_condition = {name: accuracy_by_type(records, preds) for name, preds in predictions.items()}
    by_type = {t: {"n": counts[t], **{name: acc[t] for name, acc in by_condition.items()}, **chance[t]}
               for t in counts}
    n = len(records)
    overall: dict[str, Any] = {"n": n}
    for name in [*predictions, "chance", "majority", "uniform"]:
        overall[name] = sum(counts[t] * by_type[t][name] for t in counts) / n if n else 0.0
    return {"overall": overall, "by_type": by_type}


# --------------------------------------------------------------------------------------------------
# Swap


def swap_partners(records: Sequence[Mapping[str, Any]], pool: Sequence[Mapping[str, Any]],
                  seed: int = 0) -> list[Mapping[str, Any] | None]:
    """For each record, a record of ``pool`` with the same question text (compared after lower-casing
    and collapsing spaces), another image and a different answer; None when there is none."""
    by_question: dict[str, list[Mapping[str, Any]]] = {}
    for p in pool:
        by_question.setdefault(" ".join(str(p["question"]).lower().split()), []).append(p)
    out: list[Mapping[str, Any] | None] = []
    for i, r in enumerate(records):
        yes_no = is_yes_no(str(r["answer"]))
        truth = canonical(str(r["answer"]), yes_no)
        candidates = [p for p in by_question.get(" ".join(str(r["question"]).lower().split()), [])
                      if p["image"] != r["image"] and canonical(str(p["answer"]), yes_no) != truth]
        key = r.get("id", i)
        out.append(candidates[random.Random(f"swap|{seed}|{key}").randrange(len(candidates))]
                   if candidates else None)
    return out


def swap_scores(records: Sequence[Mapping[str, Any]], partners: Sequence[Mapping[str, Any] | None],
                original: Sequence[str | None], swapped: Sequence[str | None]) -> dict[str, Any]:
    """``grounding_rate``, ``changed_rate`` and ``grounding_rate_when_correct`` (over pairs whose
    original answer was right), overall and per type; ``swapped[j]`` answers the j-th paired record."""
    paired = [(r, p, o) for r, p, o in zip(records, partners, original) if p is not None]
    if len(paired) != len(swapped):
        raise ValueError(f"got {len(swapped)} swapped answers for {len(paired)} paired questions")

    def rates(rows: list[tuple]) -> dict[str, Any]:
        grounded = changed = correct = grounded_when_correct = 0
        for (r, p, o), s in rows:
            yes_no = is_yes_no(str(r["answer"]))
            ok_swapped = is_correct(s, str(p["answer"]))
            was_correct = is_correct(o, str(r["answer"]))
            grounded += ok_swapped
            changed += canonical(s, yes_no) != canonical(o, yes_no)
            correct += was_correct
            grounded_when_correct += was_correct and ok_swapped
        n = len(rows)
        return {"n": n, "grounding_rate": grounded / n if n else 0.0, "changed_rate": changed / n if n else 0.0,
                "grounding_rate_when_correct": grounded_when_correct / correct if correct else 0.0,
                "n_correct": correct}

    rows = list(zip(paired, swapped))
    asked = Counter(_type(r) for r in records)
    by_type = {}
    for t in asked:
        of_type = [row for row in rows if _type(row[0][0]) == t]
        by_type[t] = {"coverage": len(of_type) / asked[t], **rates(of_type)}
    return {"n_questions": len(records), "coverage": len(paired) / len(records) if records else 0.0,
            **rates(rows), "by_type": by_type}
