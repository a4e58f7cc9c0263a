"""Two-image tasks: pairs of scenes and questions that can only be answered by looking at both images.

A pair is one of two kinds, alternating through a split (`PAIR_KINDS`):

* ``added``: the second scene is the first plus one object. It is drawn the other way round: a
  scene of at least two objects is generated and the first image is that scene with one object taken
  out, so no new layout is needed and every other pixel of the two images is the same.
* ``different``: two scenes generated apart, with different numbers of objects, that share at least
  one (colour, shape) pair (the second scene is required to contain one of the first's).

Questions (types `MULTI_QUESTION_TYPES`, short exact answers):

* ``multi_count``: "Which image has more objects, the first or the second?" -> ``first`` / ``second``
  (``different`` pairs; the answer alternates through a split);
* ``multi_both``: "Is the red star in both images?" -> ``yes`` / ``no`` (every pair; the answer
  alternates through a split; a "no" names an object of one image only or of neither, marked in
  ``negative`` as ``one_image`` / ``neither``);
* ``multi_added``: "What was added in the second image?" -> the added object's name (``added`` pairs).

Scenes of pairs draw from their own random streams (a seed derived from the dataset seed), never the
single-image scenes' ones. Training records put both images first, each on its own line, then the
question (``"<image>\\n<image>\\nWhich image ..."``), the layout `vlmkit.data.chat.ChatFormat.prompt`
gives questions about several images.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from vlmkit.data.shapes_world.generate import _derive_seed, generate_scene
from vlmkit.data.shapes_world.language import _a
from vlmkit.data.shapes_world.spec import QA, Scene, SceneSpec

MULTI_QUESTION_TYPES: tuple[str, ...] = ("multi_count", "multi_both", "multi_added")
PAIR_KINDS: tuple[str, ...] = ("added", "different")


@dataclass(frozen=True)
class ScenePair:
    """Two scenes shown together, and the questions asked about them."""

    index: int
    kind: str  # one of PAIR_KINDS
    first: Scene
    second: Scene
    questions: tuple[QA, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "scenes": [self.first.to_dict(), self.second.to_dict()]}


def _pair_seed(seed: int) -> int:
    return _derive_seed(seed, 0, "multi")


def _added(index: int, seed: int, spec: SceneSpec, rng: random.Random) -> tuple[Scene, Scene, QA]:
    second = generate_scene(2 * index, _pair_seed(seed), replace(spec, min_objects=max(2, spec.min_objects)))
    removed = rng.randrange(len(second.objects))
    first = replace(second, objects=second.objects[:removed] + second.objects[removed + 1:])
    name = second.objects[removed].name
    question = rng.choice(("What was added in the second image?", "Which object was added in the second image?"))
    return first, second, QA(question, name, "multi_added", targets=(name,))


def _different(index: int, seed: int, spec: SceneSpec, rng: random.Random,
               more_in_first: bool) -> tuple[Scene, Scene, QA]:
    a = generate_scene(2 * index, _pair_seed(seed), spec)
    counts = [n for n in range(spec.min_objects, spec.max_objects + 1) if n != len(a.objects)]
    shared = rng.choice(sorted({o.pair for o in a.objects}))
    n = rng.choice(counts)
    b = generate_scene(2 * index + 1, _pair_seed(seed),
                       replace(spec, require_pairs=frozenset({shared}), min_objects=n, max_objects=n))
    first, second = (a, b) if (len(a.objects) > len(b.objects)) == more_in_first else (b, a)
    question = rng.choice(("Which image has more objects, the first or the second?",
                           "Which image shows more objects, the first or the second?"))
    return first, second, QA(question, "first" if more_in_first else "second", "multi_count")


def _both(first: Scene, second: Scene, yes: bool, rng: random.Random,
          pairs: Sequence[tuple[str, str]]) -> QA:
    """"Is the X in both images?" about an object of both images (`yes`), else of one image or of neither
    (`pairs`: the pairs that may be named)."""
    in_first, in_second = {o.pair for o in first.objects}, {o.pair for o in second.objects}
    if yes:
        pair, negative = rng.choice(sorted(in_first & in_second)), None
    else:
        one = sorted(in_first ^ in_second)
        neither = [p for p in pairs if p not in in_first | in_second]
        negative = "one_image" if one and (not neither or rng.random() < 0.5) else "neither"
        pair = rng.choice(one if negative == "one_image" else neither)
    name = f"{pair[0]} {pair[1]}"
    question = rng.choice(("Is the {n} in both images?", "Do both images contain {a}?")).format(n=name, a=_a(name))
    return QA(question, "yes" if yes else "no", "multi_both", negative=negative, targets=(name,))


def check_pair_spec(spec: SceneSpec) -> None:
    """Pairs need scenes of two or more objects (``added``) and two different object counts (``different``)."""
    if spec.min_objects == spec.max_objects:
        raise ValueError(f"two-image questions need scenes with different numbers of objects; got "
                         f"min_objects = max_objects = {spec.max_objects}")


def scene_pair(index: int, seed: int, spec: SceneSpec, position: int) -> ScenePair:
    """Pair ``index`` of dataset ``seed``; `position` (its place in its split) sets the kind and which
    answers it gets, so that kinds and answers alternate through a split. Depends only on its arguments
    (`spec`: see `check_pair_spec`).
    """
    check_pair_spec(spec)
    rng = random.Random(_derive_seed(seed, index, "multi/questions"))
    kind = PAIR_KINDS[position % 2]
    turn = position // 2 % 2  # alternates within each kind
    if kind == "added":
        first, second, main = _added(index, seed, spec, rng)
    else:
        first, second, main = _different(index, seed, spec, rng, more_in_first=turn == 0)
    # yes, no, no, yes, ...: balanced over every two pairs and within each kind.
    both = _both(first, second, yes=(position + turn) % 2 == 0, rng=rng, pairs=spec.allowed_pairs())
    return ScenePair(index, kind, first, second, (main, both))


def pair_records(pair: ScenePair, images: Sequence[str]) -> list[dict[str, Any]]:
    """One LLaVA record per question of `pair`: both images (paths `images`), then the question."""
    head = "<image>\n" * len(images)
    return [{"id": f"multi_{pair.index:06d}_q{j}", "image": list(images),
             "conversations": [{"from": "human", "value": head + q.question}, {"from": "gpt", "value": q.answer}]}
            for j, q in enumerate(pair.questions)]
