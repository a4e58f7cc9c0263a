"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning") on generated captions.

- CHAIR-i = hallucinated object mentions / all object mentions (over every caption);
- CHAIR-s = captions with at least one hallucinated mention / all captions.

A *mention* is found with a `Lexicon` (canonical object -> synonyms and plurals). Matching rule:
the caption is lower-cased and split into words (runs of letters and digits; "teddy-bear" is
"teddy bear"); scanning left to right, at each word the longest lexicon entry (in words) that
matches there is taken and its words are consumed, else the scan moves one word on. So "a red star"
is one mention of "red star", never also of "star"; "red stars" (plural listed in the lexicon) is
"red star"; a bare "stars" is "star". Every occurrence counts (a caption naming the same missing
object twice has two hallucinated mentions), as in the original CHAIR. A mention is hallucinated
when its canonical object is not among the image's objects. Negation is not understood ("no red
star" is a mention), nor are coordinated colours ("red and blue stars" only mentions "blue star").

Shapes-world ships its lexicon (``lexicons/shapes_world.json``): every "colour shape" name and every
bare shape, each with its plural. An image's objects are its "colour shape" names plus its shapes
(`vlmkit.eval.annotations.scene_object_names` with ``with_shapes``), so "a star" is true when any star
is present and "a red star" only when a red one is. COCO-style users pass their own file with the same
format (``{"dog": ["dog", "dogs", "puppy"], ...}``); without one, each category name and its plural
are the lexicon.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from vlmkit.eval.annotations import scene_object_names
from vlmkit.io import read_json_file

SHAPES_WORLD_LEXICON = Path(__file__).resolve().parent / "lexicons" / "shapes_world.json"
_WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def canonical_name(name: str) -> str:
    """The form object names are compared in: lower case, words joined by single spaces."""
    return " ".join(words(name))


def plural(word: str) -> str:
    """English plural of a single noun for the common cases ("cross" -> "crosses", "bus" -> "buses")."""
    if word.endswith(("s", "x", "z", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        return word[:-1] + "ies"
    return word + "s"


class Lexicon:
    """Canonical object names with the phrases that mention them (see the module docstring)."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]], where: str = "lexicon"):
        self.canonical: dict[tuple[str, ...], str] = {}
        for raw, phrases in synonyms.items():
            name = canonical_name(str(raw))
            if isinstance(phrases, str) or not isinstance(phrases, Iterable):
                raise ValueError(f"{where}: the value of {name!r} must be a list of phrases")
            for phrase in [name, *phrases]:
                key = tuple(words(str(phrase)))
                if not key:
                    raise ValueError(f"{where}: {name!r} has a phrase with no words: {phrase!r}")
                other = self.canonical.setdefault(key, name)
                if other != name:
                    raise ValueError(f"{where}: {' '.join(key)!r} mentions both {other!r} and {name!r}")
        self.objects = frozenset(self.canonical.values())
        self.longest = max((len(k) for k in self.canonical), default=0)

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """A JSON object mapping each canonical object to a list of phrases (synonyms, plurals)."""
        path = Path(path)
        data = read_json_file(path, "CHAIR lexicon")
        if not isinstance(data, dict) or not data:
            raise ValueError(f'{path}: expected a non-empty JSON object {{"object": ["synonym", ...], ...}}')
        return cls(data, where=str(path))

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Lexicon:
        """Each name mentions itself and, for its last word pluralised, its plural."""
        out = {}
        for name in names:
            *head, last = words(name) or [name]
            out[name] = [" ".join([*head, plural(last)])]
        return cls(out, where="default lexicon")

    def mentions(self, caption: str) -> list[str]:
        """Canonical objects mentioned in ``caption``, in order, one per occurrence."""
        tokens = words(caption)
        found, i = [], 0
        while i < len(tokens):
            for n in range(min(self.longest, len(tokens) - i), 0, -1):
                name = self.canonical.get(tuple(tokens[i:i + n]))
                if name is not None:
                    found.append(name)
                    i += n
                    break
            else:
                i += 1
        return found

    def check_covers(self, objects: Iterable[str], where: str) -> None:
        """Every ground-truth object must be a canonical lexicon entry, or it could never be mentioned."""
        missing = sorted({canonical_name(o) for o in objects} - self.objects)
        if missing:
            raise ValueError(f"the CHAIR lexicon has no entry for {missing[:5]} ({where}); add them to the lexicon")


@cache
def shapes_world_lexicon() -> Lexicon:
    return Lexicon.load(SHAPES_WORLD_LEXICON)


def chair(captions: Sequence[str], truths: Sequence[Iterable[str]], lexicon: Lexicon,
          objects: Sequence[Iterable[str]] | None = None) -> dict[str, Any]:
    """CHAIR-i and CHAIR-s of ``captions`` against each image's true objects ``truths`` (every object a
    caption may truly mention).

    Also: ``mentions`` (total), ``hallucinated`` (mentions), ``recall`` (the fraction of the images'
    ``objects``, default ``truths``, that their caption mentions; a model that names nothing has CHAIR 0
    and recall 0),
    ``no_mention`` (captions that mention no object), ``top_hallucinated`` (most frequent hallucinated
    objects) and per-caption ``details``. Ratios are 0.0 when their denominator is 0.
    """
    objects = truths if objects is None else objects
    if not len(captions) == len(truths) == len(objects):
        raise ValueError(f"got {len(captions)} captions for {len(truths)} images ({len(objects)} object sets)")
    n_mentions = n_hallucinated = n_bad_captions = n_true = n_recalled = n_silent = 0
    wrong: Counter = Counter()
    details = []
    for caption, truth, wanted in zip(captions, truths, objects):
        truth = {canonical_name(t) for t in truth}
        wanted = {canonical_name(t) for t in wanted}
        said = lexicon.mentions(caption)
        bad = [m for m in said if m not in truth]
        n_mentions += len(said)
        n_hallucinated += len(bad)
        n_bad_captions += bool(bad)
        n_silent += not said
        n_true += len(wanted)
        n_recalled += len(wanted & set(said))
        wrong.update(bad)
        details.append({"caption": caption, "mentions": said, "hallucinated": bad})
    n = len(captions)
    return {
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad_captions / n if n else 0.0,
        "recall": n_recalled / n_true if n_true else 0.0,
        "n_captions": n,
        "mentions": n_mentions,
        "hallucinated": n_hallucinated,
        "no_mention": n_silent,
        "top_hallucinated": wrong.most_common(10),
        "details": details,
    }


def shapes_world_truth(scene: Mapping[str, Any]) -> set[str]:
    """The objects a shapes-world caption may truly mention: "colour shape" names and bare shapes."""
    return scene_object_names(scene, with_shapes=True)


def shapes_world_chair_i(captions: list[str], scenes: list[dict]) -> float:
    """CHAIR-i of captions of shapes-world scenes (rows as in ``scenes.jsonl``), with the built-in lexicon."""
    return chair(captions, [shapes_world_truth(s) for s in scenes], shapes_world_lexicon())["chair_i"]
