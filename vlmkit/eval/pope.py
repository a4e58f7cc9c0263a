"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Yes/no object-existence probes ("Is there a red star in the image?") built from any dataset with
object annotations (`vlmkit.eval.annotations`). For each sampled image, ``k`` objects that are present
give "yes" questions and ``k`` absent objects give "no" questions, where
``k = min(n_per_image, #present, #absent)`` so every image is balanced. The absent objects come from
one of three samplings, each a separate split with the same "yes" questions:

- ``random``: uniformly among the vocabulary objects not in the image;
- ``popular``: the objects in the most images of the dataset, most frequent first;
- ``adversarial``: the objects that co-occur most often with the ones present (summed over them:
  the number of dataset images holding both), most co-occurring first.

Ties are broken by frequency, then vocabulary order. Everything is a pure function of
``(dataset, seed)``: images are sampled with ``seed`` and each image's choices use a generator seeded
by ``(seed, image path)``, so they do not depend on which other images were sampled.

Answers are parsed with `vlmkit.eval.metrics.parse_yes_no` (a leading "yes"/"no" after
`normalize_answer`, else exactly one of the two words anywhere, else unparsed). Unparsed answers are
counted in ``unparsed`` / ``unparsed_rate`` and scored as wrong (never mapped to "yes" or "no"); they
are not positive predictions, so they lower recall when the truth is "yes".
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from vlmkit.eval.annotations import AnnotatedImage, ObjectDataset, seeded_subset
from vlmkit.eval.generation import Answerer
from vlmkit.eval.metrics import pope_metrics

SAMPLINGS: tuple[str, ...] = ("random", "popular", "adversarial")
QUESTION_TEMPLATE = "Is there {a} {object} in the image?"


def pope_question(obj: str) -> str:
    return QUESTION_TEMPLATE.format(a="an" if obj[:1] in "aeiou" else "a", object=obj)


def object_statistics(images: Sequence[AnnotatedImage]) -> tuple[Counter, dict[str, Counter]]:
    """(images per object, for each object the images per co-occurring object)."""
    frequency: Counter = Counter()
    cooccurrence: dict[str, Counter] = {}
    for im in images:
        frequency.update(im.objects)
        for a, b in combinations(sorted(im.objects), 2):
            cooccurrence.setdefault(a, Counter())[b] += 1
            cooccurrence.setdefault(b, Counter())[a] += 1
    return frequency, cooccurrence


def choose_negatives(present: frozenset[str], vocabulary: Sequence[str], sampling: str, k: int,
                     rng: random.Random, frequency: Mapping[str, int],
                     cooccurrence: Mapping[str, Mapping[str, int]]) -> list[str]:
    """``k`` absent objects for one image under one sampling (see the module docstring)."""
    absent = [o for o in vocabulary if o not in present]
    order = {o: i for i, o in enumerate(vocabulary)}
    if sampling == "random":
        return rng.sample(absent, k)
    if sampling == "popular":
        return sorted(absent, key=lambda o: (-frequency.get(o, 0), order[o]))[:k]
    if sampling == "adversarial":
        def together(o: str) -> int:
            return sum(cooccurrence.get(p, {}).get(o, 0) for p in present)
        return sorted(absent, key=lambda o: (-together(o), -frequency.get(o, 0), order[o]))[:k]
    raise ValueError(f"unknown POPE sampling {sampling!r}; expected one of {SAMPLINGS}")


def build_pope(dataset: ObjectDataset, *, n_images: int | None = 100, n_per_image: int = 3, seed: int = 0,
               samplings: Sequence[str] = SAMPLINGS) -> list[dict[str, Any]]:
    """POPE question records for ``n_images`` sampled images, every sampling.

    Each record: ``id``, ``image``, ``question``, ``answer`` ("yes"/"no"), ``type`` ("exists"),
    ``object`` and ``sampling``. "yes" records are repeated in every sampling (each split is a
    self-contained balanced set); answer each distinct (image, question) once. Frequencies and
    co-occurrences are counted over every image of the dataset, not just the sampled ones.
    """
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    frequency, cooccurrence = object_statistics(dataset.images)
    records: list[dict[str, Any]] = []
    for im in seeded_subset(dataset.images, n_images, seed):
        rng = random.Random(f"pope|{seed}|{im.image}")
        absent = [o for o in dataset.vocabulary if o not in im.objects]
        k = min(n_per_image, len(im.objects), len(absent))
        if k == 0:
            continue
        positives = rng.sample(sorted(im.objects), k)
        for sampling in samplings:
            negatives = choose_negatives(im.objects, dataset.vocabulary, sampling, k, rng, frequency, cooccurrence)
            for answer, objects in (("yes", positives), ("no", negatives)):
                for obj in objects:
                    records.append({"id": f"pope-{sampling}-{len(records):05d}", "image": im.image,
                                    "question": pope_question(obj), "answer": answer, "type": "exists",
                                    "object": obj, "sampling": sampling})
    return records


def pope_scores(records: Sequence[Mapping[str, Any]], predictions: Sequence[str | None]) -> dict[str, Any]:
    """Per sampling: accuracy, precision, recall, F1 ("yes" is positive), ``yes_ratio``, ``n``,
    ``unparsed`` and ``unparsed_rate``."""
    if len(records) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for {len(records)} POPE records")
    out: dict[str, Any] = {}
    for sampling in dict.fromkeys(r["sampling"] for r in records):
        pairs = [(p, r["answer"]) for r, p in zip(records, predictions) if r["sampling"] == sampling]
        m = pope_metrics([p for p, _ in pairs], [t for _, t in pairs])
        m["unparsed"] = m.pop("unparseable")
        m["unparsed_rate"] = m["unparsed"] / m["n"] if m["n"] else 0.0
        out[sampling] = m
    return out


def answer_distinct(answerer: Answerer, records: Sequence[Mapping[str, Any]], image_root: Path) -> list[str]:
    """One answer per record, asking each distinct (image, question) only once."""
    distinct = list(dict.fromkeys((r["image"], r["question"]) for r in records))
    answers = answerer.answer_records([{"image": i, "question": q} for i, q in distinct], image_root)
    lookup = dict(zip(distinct, answers))
    return [lookup[(r["image"], r["question"])] for r in records]
