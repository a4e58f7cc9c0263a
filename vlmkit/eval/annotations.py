"""Images with object annotations, the input of the POPE and CHAIR probes.

Two sources give the same thing, an `AnnotatedImage` (an image path and the set of object names in
it):

- shapes-world ground truth (``scenes.jsonl``): every object is named ``"colour shape"``
  (``"red star"``); `scene_object_names` can add the bare shape names (``"star"``) for CHAIR;
- a COCO-style ``instances`` JSON (``images`` + ``annotations`` + ``categories``): an object is a
  category name; image paths are ``file_name`` relative to the image root the user gives.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlmkit.data.scenes import SCENES_FILE, read_scenes
from vlmkit.io import read_json_file

T = TypeVar("T")


@dataclass(frozen=True)
class AnnotatedImage:
    image: str  # path relative to the image root
    objects: frozenset[str]  # canonical object names present in the image
    scene: Mapping[str, Any] | None = field(default=None, compare=False)  # the shapes-world scene row, if any


@dataclass(frozen=True)
class ObjectDataset:
    """Annotated images of one split plus the object vocabulary negatives are drawn from."""

    images: list[AnnotatedImage]
    image_root: Path
    vocabulary: tuple[str, ...]  # every object name of the dataset, in a fixed order
    source: str  # "shapes-world" | "coco"


def scene_object_names(scene: Mapping[str, Any], *, with_shapes: bool = False) -> set[str]:
    """``"colour shape"`` names of a shapes-world scene's objects (and, with ``with_shapes``, the bare
    shape names too, since "a star" is a true mention whenever any star is present)."""
    names = {f"{o['color']} {o['shape']}" for o in scene["objects"]}
    if with_shapes:
        names |= {o["shape"] for o in scene["objects"]}
    return names


def shapes_world_dataset(data_root: str | Path, split: str = "test") -> ObjectDataset:
    """Shapes-world scenes of ``split`` with ``"colour shape"`` objects; the vocabulary is every object
    seen in the split (held-out pairs of other splits are never asked about)."""
    root = Path(data_root)
    scenes = read_scenes(root / SCENES_FILE, split)
    images = [AnnotatedImage(s["image"], frozenset(scene_object_names(s)), s) for s in scenes]
    vocabulary = tuple(sorted(set().union(*(im.objects for im in images))))
    return ObjectDataset(images, root, vocabulary, "shapes-world")


def coco_dataset(instances: str | Path, image_root: str | Path) -> ObjectDataset:
    """A COCO-style ``instances`` JSON: ``images`` (``id``, ``file_name``), ``annotations``
    (``image_id``, ``category_id``) and ``categories`` (``id``, ``name``). Images without annotations
    are left out (they can give no "yes" question); the vocabulary is every category."""
    path = Path(instances)
    data = read_json_file(path, "--instances")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    images = _field_list(data, "images", ("id", "file_name"), path)
    annotations = _field_list(data, "annotations", ("image_id", "category_id"), path)
    categories = _field_list(data, "categories", ("id", "name"), path)
    names = {c["id"]: str(c["name"]).strip().lower() for c in categories}
    files = {im["id"]: str(im["file_name"]) for im in images}
    objects: dict[Any, set[str]] = {}
    for i, ann in enumerate(annotations):
        if ann["category_id"] not in names:
            raise ValueError(f"{path}: annotations[{i}].category_id={ann['category_id']!r} is not in 'categories'")
        if ann["image_id"] not in files:
            raise ValueError(f"{path}: annotations[{i}].image_id={ann['image_id']!r} is not in 'images'")
        objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    annotated = [AnnotatedImage(files[i], frozenset(objects[i])) for i in files if i in objects]
    if not annotated:
        raise ValueError(f"{path}: no image has an annotation")
    return ObjectDataset(annotated, Path(image_root), tuple(dict.fromkeys(names.values())), "coco")


def _field_list(data: Mapping[str, Any], key: str, required: Iterable[str], path: Path) -> list[dict]:
    items = data.get(key)
    if not isinstance(items, list):
        raise ValueError(f"{path}: '{key}' must be a list")
    for i, item in enumerate(items):
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"{path}: {key}[{i}] has no {missing[0]!r} field")
    return items


def seeded_subset(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """``limit`` items drawn with ``seed``, kept in their original order (all of them when ``limit`` is
    None or not smaller than ``len(items)``)."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = sorted(random.Random(f"subset|{seed}").sample(range(len(items)), max(0, limit)))
    return [items[i] for i in keep]
