"""LLaVA-style training records for one scene: `scene_records` (a caption request, single questions and
a short conversation), `dialogue_records` (long conversations asking every question the scene offers)
and `question_records` (the same questions one per record), with the object lists when asked for.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from vlmkit.data.shapes_world.language import (
    CAPTION_PROMPTS,
    _sentence,
    caption_scene,
    identify_qa,
    object_list_qa,
    questions_for_scene,
)
from vlmkit.data.shapes_world.spec import QA, SPATIAL_MARGIN, Scene, SceneSpec

# --------------------------------------------------------------------------------------------------
# LLaVA records


def _balanced_pick(qs: Sequence[QA], n: int, rng: random.Random) -> list[QA]:
    # Round-robin over question types so no type dominates the training records.
    by_type: dict[str, list[QA]] = {}
    for q in qs:
        by_type.setdefault(q.type, []).append(q)
    for v in by_type.values():
        rng.shuffle(v)
    types = list(by_type)
    rng.shuffle(types)
    out: list[QA] = []
    while len(out) < n and any(by_type.values()):
        for t in types:
            if by_type[t] and len(out) < n:
                out.append(by_type[t].pop())
    return out


def _conversation(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def scene_records(
    scene: Scene,
    image: str,
    rng: random.Random,
    spec: SceneSpec | None = None,
    *,
    n_single: int = 2,
    focus_pairs: Iterable[Sequence[str]] | None = None,
    negative_pairs: Iterable[Sequence[str]] | None = None,
    margin: float = SPATIAL_MARGIN,
) -> list[dict[str, Any]]:
    """LLaVA-style training records for one scene: a caption request, ``n_single`` single-question
    records and one 2-4 turn conversation (fewer when the scene offers too few questions)."""
    stem = f"{scene.index:06d}"
    captions = caption_scene(scene, rng, margin=margin)
    qs = questions_for_scene(
        scene,
        rng,
        spec,
        max_per_type=2,
        focus_pairs=focus_pairs,
        negative_pairs=negative_pairs,
        margin=margin,
    )
    n_turns = rng.randint(2, 4)
    picked = _balanced_pick(qs, n_single + n_turns, rng)
    records = [
        {
            "id": f"{stem}_cap",
            "image": image,
            "conversations": _conversation([(rng.choice(CAPTION_PROMPTS), _sentence(rng.choice(captions)))]),
        }
    ]
    for j, q in enumerate(picked[:n_single]):
        records.append(
            {"id": f"{stem}_q{j}", "image": image, "conversations": _conversation([(q.question, q.answer)])}
        )
    multi = picked[n_single:]
    if len(multi) >= 2:
        records.append(
            {
                "id": f"{stem}_conv",
                "image": image,
                "conversations": _conversation([(q.question, q.answer) for q in multi]),
            }
        )
    return records


def dialogue_records(
    scene: Scene,
    image: str,
    rng: random.Random,
    spec: SceneSpec | None = None,
    *,
    n_dialogues: int = 1,
    max_per_type: int = 1,
    focus_pairs: Iterable[Sequence[str]] | None = None,
    negative_pairs: Iterable[Sequence[str]] | None = None,
    margin: float = SPATIAL_MARGIN,
    object_lists: bool = False,
) -> list[dict[str, Any]]:
    """A caption request and ``n_dialogues`` multi-turn conversations about one scene, each asking every
    question the scene offers (up to ``max_per_type`` per type, in random order); with ``object_lists``
    also the two object lists of `object_list_qa` (own records: their boxes must not be in view of a
    conversation that asks for them).

    Many answers per conversation means many supervised tokens per pass over the image's tokens, but
    correlated ones: at an equal budget one question per record (`question_records`) taught the demo
    model more (the `dialogues` row of docs/recipe_ablation.md).
    """
    stem = f"{scene.index:06d}"
    records = [{"id": f"{stem}_{name}", "image": image, "conversations": _conversation([(q, a)])}
               for name, q, a in _caption_and_lists(scene, rng, margin, object_lists)]
    for d in range(n_dialogues):
        qs = questions_for_scene(scene, rng, spec, max_per_type=max_per_type, focus_pairs=focus_pairs,
                                 negative_pairs=negative_pairs, margin=margin)
        qs = _without_box_echo(qs, scene, rng)
        rng.shuffle(qs)
        turns = [(q.question, q.answer) for q in qs]
        records.append({"id": f"{stem}_dlg{d}", "image": image, "conversations": _conversation(turns)})
    return records


def _without_box_echo(qs: list[QA], scene: Scene, rng: random.Random) -> list[QA]:
    """Identify questions about objects other than the grounded ones, where the scene has others: a
    conversation that states an object's box in one turn and asks for it in another teaches copying."""
    grounded = {q.targets for q in qs if q.type == "grounding"}
    others = [o for o in scene.objects if (o.name,) not in grounded]
    out = []
    for q in qs:
        if q.type == "identify" and q.targets in grounded:
            if not others:
                continue
            q = identify_qa(others.pop(rng.randrange(len(others))), scene, rng)
        out.append(q)
    return out


def question_records(
    scene: Scene,
    image: str,
    rng: random.Random,
    spec: SceneSpec | None = None,
    *,
    max_per_type: int = 1,
    focus_pairs: Iterable[Sequence[str]] | None = None,
    negative_pairs: Iterable[Sequence[str]] | None = None,
    margin: float = SPATIAL_MARGIN,
    object_lists: bool = False,
) -> list[dict[str, Any]]:
    """A caption request, (with ``object_lists``) the two object lists of `object_list_qa`, and one
    single-turn record per question the scene offers (up to ``max_per_type`` per type): every answer
    is asked exactly as evaluation asks it, with nothing else in view to copy from."""
    stem = f"{scene.index:06d}"
    turns = _caption_and_lists(scene, rng, margin, object_lists)
    qs = questions_for_scene(scene, rng, spec, max_per_type=max_per_type, focus_pairs=focus_pairs,
                             negative_pairs=negative_pairs, margin=margin)
    turns += [(f"q{j}", *_qa_pair(q)) for j, q in enumerate(qs)]
    return [{"id": f"{stem}_{name}", "image": image, "conversations": _conversation([(q, a)])} for name, q, a in turns]


def _caption_and_lists(scene: Scene, rng: random.Random, margin: float,
                       object_lists: bool) -> list[tuple[str, str, str]]:
    """(name, question, answer) of the caption request and (with ``object_lists``, in a scene with
    objects) the two object lists; each becomes a record of its own."""
    captions = caption_scene(scene, rng, margin=margin)
    turns = [("cap", rng.choice(CAPTION_PROMPTS), _sentence(rng.choice(captions)))]
    if object_lists and scene.objects:
        turns += [("where" if first else "list", *_qa_pair(object_list_qa(scene, rng, first)))
                  for first in (False, True)]
    return turns


def _qa_pair(q: QA) -> tuple[str, str]:
    return q.question, q.answer
