"""The language of shapes-world: number words and noun phrases, `caption_scene` (true descriptions of a
scene), `questions_for_scene` (questions of every type in `QUESTION_TYPES` with short exact answers),
`grounding_qa`, `identify_qa` and `object_list_qa` (boxes in ``<box>`` text, see `vlmkit.data.boxes`),
and the prompts that ask for a caption or an object list.

Spatial relations are computed from box centres; "left"/"above" mean a smaller x/y centre (image y
grows downwards). A relation is only stated when the centre offset exceeds ``margin * image_size``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence

from vlmkit.data.boxes import format_box, normalize_box
from vlmkit.data.shapes_world.generate import _score
from vlmkit.data.shapes_world.spec import (
    _BACKGROUND_WORDS,
    PALETTE,
    QA,
    SHAPES,
    SPATIAL_MARGIN,
    Scene,
    SceneObject,
    SceneSpec,
    _as_pairs,
)

# --------------------------------------------------------------------------------------------------
# Text


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _number(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(o: SceneObject, with_size: bool) -> str:
    return _a(f"{o.size} {o.name}" if with_size else o.name)


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sentence(s: str) -> str:
    s = _cap(s)
    return s if s.endswith((".", "!", "?")) else s + "."


def _relations(a: SceneObject, b: SceneObject, margin_px: float) -> tuple[str | None, str | None]:
    """(horizontal, vertical) relation of a w.r.t. b, each None when within the margin."""
    (ax, ay), (bx, by) = a.center, b.center
    h = ("left" if ax < bx else "right") if abs(ax - bx) > margin_px else None
    v = ("above" if ay < by else "below") if abs(ay - by) > margin_px else None
    return h, v


_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def caption_scene(scene: Scene, rng: random.Random, *, margin: float = SPATIAL_MARGIN) -> list[str]:
    """Several true descriptions of ``scene``; each mentions every object and nothing else."""
    objs = list(scene.objects)
    if not objs:
        return ["an empty image."]
    m = margin * min(scene.width, scene.height)
    n = len(objs)
    shuffled = objs[:]
    rng.shuffle(shuffled)
    caps = []
    # 1. "two objects: a large red star and a small blue circle."
    caps.append(f"{_number(n)} object{'s' if n > 1 else ''}: {_join([_np(o, True) for o in shuffled])}.")
    # 2. "There is a green square on the left and a yellow cross on the right."
    if n == 2 and _relations(objs[0], objs[1], m)[0]:
        left, right = sorted(objs, key=lambda o: o.center[0])
        sz = rng.random() < 0.5
        caps.append(f"There is {_np(left, sz)} on the left and {_np(right, sz)} on the right.")
    elif n == 1:
        caps.append(f"There is {_np(objs[0], True)}.")
    else:
        caps.append(
            f"There are {_number(n)} objects: {_join([_np(o, rng.random() < 0.5) for o in shuffled])}."
        )
    # 3. "a red star above a small blue circle" (+ the remaining objects)
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        rels = [r for r in _relations(a, b, m) if r]
        if rels:
            rel = rng.choice(rels)
            rest = [o for o in shuffled if o is not a and o is not b]
            text = f"{_np(a, rng.random() < 0.5)} {_REL_PHRASE[rel]} {_np(b, rng.random() < 0.5)}"
            if rest:
                text += ", with " + _join([_np(o, rng.random() < 0.5) for o in rest])
            caps.append(text)
            break
    # 4. "From left to right: ..." only if every neighbour gap is unambiguous
    by_x = sorted(objs, key=lambda o: o.center[0])
    if n >= 3 and all(b.center[0] - a.center[0] > m for a, b in zip(by_x, by_x[1:])):
        caps.append("From left to right: " + _join([_np(o, rng.random() < 0.5) for o in by_x]) + ".")
    # 5. mention the background
    kind = _BACKGROUND_WORDS.get(scene.background.get("kind", "plain"), "plain")
    caps.append(f"{_cap(_join([_np(o, True) for o in shuffled]))} on a {kind} background.")
    return list(dict.fromkeys(caps))


def _vocab(
    scene: Scene, spec: SceneSpec | None
) -> tuple[tuple[str, ...], tuple[str, ...], list[tuple[str, str]]]:
    if spec is not None:
        return spec.shapes, spec.colors, spec.allowed_pairs()
    shapes = tuple(dict.fromkeys(list(SHAPES) + [o.shape for o in scene.objects]))
    colors = tuple(dict.fromkeys(list(PALETTE) + [o.color for o in scene.objects]))
    return shapes, colors, [(c, s) for c in colors for s in shapes]


def questions_for_scene(
    scene: Scene,
    rng: random.Random,
    spec: SceneSpec | None = None,
    *,
    max_per_type: int = 1,
    focus_pairs: Iterable[Sequence[str]] | None = None,
    negative_pairs: Iterable[Sequence[str]] | None = None,
    first_negative: str | None = None,
    margin: float = SPATIAL_MARGIN,
) -> list[QA]:
    """Up to ``max_per_type`` questions of each type in `QUESTION_TYPES` (``exists``: that many "yes"
    plus as many "no"), all answerable exactly from ``scene``.

    ``spec`` supplies the shape/colour vocabulary, the co-occurrence prior and pixel areas for size
    questions; ``negative_pairs`` restricts absent objects asked about (default: the spec's allowed
    pairs, so held-out pairs are never even mentioned in training text). Objects whose pair is in
    ``focus_pairs`` are asked about first. Absent-object questions alternate "random" / "popular"
    negatives starting with ``first_negative`` (default: chosen by ``rng``).
    """
    if max_per_type < 1:
        raise ValueError(f"max_per_type must be >= 1, got {max_per_type}")
    if first_negative not in (None, "random", "popular"):
        raise ValueError(f"first_negative must be None, 'random' or 'popular', got {first_negative!r}")
    shapes, colors, allowed = _vocab(scene, spec)
    neg_pool = [tuple(p) for p in negative_pairs] if negative_pairs is not None else allowed
    focus = _as_pairs(focus_pairs, "focus_pairs")
    m = margin * min(scene.width, scene.height)
    objs = list(scene.objects)
    k = max_per_type
    out: list[QA] = []

    def ordered(items: list[SceneObject]) -> list[SceneObject]:
        items = items[:]
        rng.shuffle(items)
        return sorted(items, key=lambda o: o.pair not in focus)  # stable: focus objects first

    shape_counts = Counter(o.shape for o in objs)
    color_counts = Counter(o.color for o in objs)

    # color: only for shapes that occur once
    for o in ordered([o for o in objs if shape_counts[o.shape] == 1])[:k]:
        q = rng.choice(("What color is the {s}?", "What is the color of the {s}?")).format(s=o.shape)
        out.append(QA(q, o.color, "color", targets=(o.name,)))
    # shape: only for colours that occur once
    for o in ordered([o for o in objs if color_counts[o.color] == 1])[:k]:
        q = rng.choice(("What shape is the {c} object?", "What is the shape of the {c} object?")).format(
            c=o.color
        )
        out.append(QA(q, o.shape, "shape", targets=(o.name,)))
    # count: total, per shape (may be 0), per colour
    count_qs: dict[str, QA] = {}
    for _ in range(6 * k):
        if len(count_qs) >= k:
            break
        kind = rng.choice(("total", "shape", "color"))
        if kind == "total":
            q = rng.choice(("How many objects are there?", "How many objects are in the image?"))
            count_qs.setdefault(q, QA(q, str(len(objs)), "count"))
        elif kind == "shape":
            # mostly present shapes (focus first), sometimes any shape so that "0" is a possible answer
            s = ordered(objs)[0].shape if objs and rng.random() < 0.6 else rng.choice(shapes)
            q = f"How many {_plural(s)} are there?"
            count_qs.setdefault(q, QA(q, str(shape_counts[s]), "count"))
        else:
            c = ordered(objs)[0].color if objs and rng.random() < 0.6 else rng.choice(colors)
            q = f"How many {c} objects are there?"
            count_qs.setdefault(q, QA(q, str(color_counts[c]), "count"))
    out.extend(count_qs.values())
    # exists: equal numbers of present and absent objects; absent ones alternate random / popular
    present = {o.pair for o in objs}
    absent = [p for p in dict.fromkeys(neg_pool) if p not in present]
    n_ex = min(k, len(objs), len(absent))
    ex_templates = ("Is there {a} in the image?", "Is there {a}?", "Does the image contain {a}?")
    for o in ordered(objs)[:n_ex]:
        q = rng.choice(ex_templates).format(a=_a(o.name))
        out.append(QA(q, "yes", "exists", targets=(o.name,)))
    first = first_negative or rng.choice(("random", "popular"))
    kinds = ["random", "popular"] if first == "random" else ["popular", "random"]
    used: set[tuple[str, str]] = set()
    for i in range(n_ex):
        kind = kinds[i % 2]
        cands = [p for p in absent if p not in used]
        if kind == "popular":
            rng.shuffle(cands)
            cands.sort(key=lambda p: -_score(p, present, colors, shapes))
            p = rng.choice(cands[:3])
        else:
            p = rng.choice(cands)
        used.add(p)
        name = f"{p[0]} {p[1]}"
        q = rng.choice(ex_templates).format(a=_a(name))
        out.append(QA(q, "no", "exists", negative=kind, targets=(name,)))
    # spatial: only when the centre offset clearly exceeds the margin
    pairs = [(a, b) for a in ordered(objs) for b in objs if a is not b]
    rng.shuffle(pairs)
    pairs.sort(key=lambda ab: not (ab[0].pair in focus or ab[1].pair in focus))
    n_sp = 0
    asked: set[frozenset[str]] = set()  # one spatial question per unordered pair
    for a, b in pairs:
        if n_sp >= k:
            break
        if frozenset((a.name, b.name)) in asked:
            continue
        h, v = _relations(a, b, m)
        options = [r for r in (h, v) if r]
        if not options:
            continue
        rel = rng.choice(options)
        if rel in ("left", "right"):
            t = rng.choice(
                ("Is the {a} left or right of the {b}?", "Is the {a} to the left or to the right of the {b}?")
            )
        else:
            t = "Is the {a} above or below the {b}?"
        out.append(QA(t.format(a=a.name, b=b.name), rel, "spatial", targets=(a.name, b.name)))
        asked.add(frozenset((a.name, b.name)))
        n_sp += 1
    # size: only between different size classes whose drawn areas agree with the classes
    n_sz = 0
    asked = set()
    for a, b in pairs:
        if n_sz >= k:
            break
        if (
            frozenset((a.name, b.name)) in asked
            or a.size == b.size
            or (spec is not None and (a.size not in spec.sizes or b.size not in spec.sizes))
        ):
            continue
        if spec is not None:
            fa, fb = spec.sizes[a.size], spec.sizes[b.size]
            area_a, area_b = a.mask(spec)[3], b.mask(spec)[3]
        else:
            fa = (a.box[2] - a.box[0]) * (a.box[3] - a.box[1])
            fb = (b.box[2] - b.box[0]) * (b.box[3] - b.box[1])
            area_a, area_b = fa, fb
        if fa == fb or (fa > fb) != (area_a > area_b):
            continue
        big, small = (a, b) if fa > fb else (b, a)
        if rng.random() < 0.7:
            q, ans = f"Which is bigger, the {a.name} or the {b.name}?", big.name
        else:
            q, ans = f"Which is smaller, the {a.name} or the {b.name}?", small.name
        out.append(QA(q, ans, "size", targets=(a.name, b.name)))
        asked.add(frozenset((a.name, b.name)))
        n_sz += 1
    # grounding and identify
    out.extend(grounding_qa(o, scene, rng) for o in ordered(objs)[:k])
    out.extend(identify_qa(o, scene, rng) for o in ordered(objs)[:k])
    return out


def grounding_qa(o: SceneObject, scene: Scene, rng: random.Random) -> QA:
    """"Where is the red star?" -> its box in [0, 1000] text form."""
    nb = normalize_box(o.box, scene.width, scene.height)
    t = rng.choice(("Where is the {n}?", "Give the bounding box of the {n}.", "Locate the {n}."))
    return QA(t.format(n=o.name), format_box(nb), "grounding", box=nb, targets=(o.name,))


def identify_qa(o: SceneObject, scene: Scene, rng: random.Random) -> QA:
    """"What is at <box>...</box>?" -> the object's name."""
    nb = normalize_box(o.box, scene.width, scene.height)
    t = rng.choice(("What is at {b}?", "What object is at {b}?"))
    return QA(t.format(b=format_box(nb)), o.name, "identify", box=nb, targets=(o.name,))


OBJECT_LIST_PROMPTS = ("List the objects and their boxes.", "Which objects are where?")


def object_list_qa(scene: Scene, rng: random.Random, boxes_first: bool = False) -> QA:
    """Every object with its box, in reading order (rows of centres, top to bottom, then left to right):
    "red star <box>...</box>, blue circle <box>...</box>", or with `boxes_first` "<box>...</box> red star, ...".

    Grounded listings (as in Pix2Seq or Kosmos-2) give a supervised name and box for every object of
    an image at once; the two orders teach both ways of binding a name to a place.
    """
    row = scene.height / 8
    ordered = sorted(scene.objects, key=lambda o: (int(o.center[1] // row), o.center[0]))
    items = []
    for o in ordered:
        box = format_box(normalize_box(o.box, scene.width, scene.height))
        items.append(f"{box} {o.name}" if boxes_first else f"{o.name} {box}")
    return QA(OBJECT_LIST_PROMPTS[boxes_first], ", ".join(items), "objects", targets=tuple(o.name for o in ordered))


CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this image?",
    "Write a short caption for the image.",
    "Describe the scene briefly.",
)
