"""Images with object annotations (boxes + attributes), for dense supervision of a vision tower.

Two sources give the same samples:

- a ``scenes.jsonl`` file (what `vlmkit synth` writes, or the same shape from any detection data):
  one row per image, ``{"image": path, "split": ..., "objects": [{"box": [x1, y1, x2, y2], <attribute>:
  <class>, ...}]}`` with pixel boxes (x2/y2 exclusive);
- shapes-world scenes generated on the fly from a `SceneSpec`, as many as asked for, never written
  to disk (rendering one 64 px scene takes ~0.4 ms).

A sample is ``{"pixel_values": [3, H, W], "objectness": [P], "classes": [A, P], "boxes": [P, 4]}`` (see
`cell_targets`); with ``flip`` images are mirrored left-right at random (boxes follow). Samples never
read global random state, so DataLoader workers serve exactly what the training process would: a
scene depends only on its index, and the flip of sample ``(index, epoch)`` is a hash of (flip seed,
epoch, index), so each epoch mirrors a different half of the data.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.data.shapes_world import ALL_SHAPES, Scene, SceneSpec, generate_scene, render_scene
from vlmkit.io import read_json_file, read_jsonl

SCENES_FILE = "scenes.jsonl"
NOT_ATTRIBUTES = frozenset({"box"})


def read_scenes(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a ``scenes.jsonl`` file (those of ``split``, when given), in file order."""
    path = Path(path)
    rows = []
    hint = f": is {path.parent} a shapes-world data directory (vlmkit synth)?"
    for n, row in enumerate(read_jsonl(path, hint), 1):
        for key in ("image", "objects"):
            if key not in row:
                raise ValueError(f"{path}:{n}: scene has no {key!r} field")
        if split is None or row.get("split", split) == split:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no scenes of split {split!r}")
    return rows


def scene_attributes(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Every string-valued object field but ``box``, with its classes sorted: the heads to train."""
    found: dict[str, set[str]] = {}
    for row in rows:
        for obj in row["objects"]:
            for key, value in obj.items():
                if key not in NOT_ATTRIBUTES and isinstance(value, str):
                    found.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in sorted(found.items())}


def spec_attributes(spec: SceneSpec) -> dict[str, list[str]]:
    """The shapes-world attributes of `spec` (colour, shape, size), in the spec's order."""
    return {"color": list(spec.colors), "shape": list(spec.shapes), "size": list(spec.sizes)}


def data_spec(data_root: str | Path) -> tuple[SceneSpec, int]:
    """The training `SceneSpec` of a `vlmkit synth` directory (held-out pairs excluded) and its seed."""
    meta = read_json_file(Path(data_root) / "meta.json", "generating scenes needs a `vlmkit synth` data directory")
    spec = SceneSpec.from_dict(meta["spec"])
    held_out = frozenset(tuple(p) for p in meta.get("holdout_pairs", ()))
    return replace(spec, exclude_pairs=spec.exclude_pairs | held_out, require_pairs=frozenset()), int(meta["seed"])


@dataclass
class CellTargets:
    """Per-cell targets of one image: ``objectness`` [P] in {0, 1}, ``classes`` [A, P] (IGNORE_INDEX off
    object cells), ``boxes`` [P, 4] in [0, 1] (zeros off object cells)."""

    objectness: torch.Tensor
    classes: torch.Tensor
    boxes: torch.Tensor


def cell_targets(objects: list[dict[str, Any]], image_size: tuple[int, int], grid: tuple[int, int],
                 attributes: dict[str, list[str]]) -> CellTargets:
    """Targets for `objects` (each ``{"box": [x1, y1, x2, y2] in pixels, <attribute>: <class>, ...}``)
    in an image of ``(width, height)`` pixels cut into a ``(rows, cols)`` patch grid.

    Two centres in one cell keep the larger object (never the case in shapes-world at 8 px cells).
    """
    width, height = image_size
    rows, cols = grid
    cells = rows * cols
    objectness = torch.zeros(cells)
    classes = torch.full((len(attributes), cells), IGNORE_INDEX, dtype=torch.long)
    boxes = torch.zeros(cells, 4)
    area = torch.zeros(cells)
    for obj in objects:
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        col = min(cols - 1, max(0, int((x1 + x2) / 2 / width * cols)))
        row = min(rows - 1, max(0, int((y1 + y2) / 2 / height * rows)))
        cell, size = row * cols + col, (x2 - x1) * (y2 - y1)
        if objectness[cell] and area[cell] >= size:
            continue
        objectness[cell], area[cell] = 1.0, size
        boxes[cell] = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height])
        for a, (name, names) in enumerate(attributes.items()):
            value = obj.get(name)
            if value is None:
                continue  # unknown for this object: no target
            if value not in names:
                raise ValueError(f"object attribute {name}={value!r} is not one of {names}")
            classes[a, cell] = names.index(value)
    return CellTargets(objectness, classes, boxes)


class SceneDataset(Dataset):
    """Annotated images as dense per-cell targets for a patch `grid` (rows, cols).

    ``dataset[index]`` is the sample of epoch 0 and ``dataset[index, epoch]`` that of `epoch`; they
    differ only when `flip` is on (`epoch_keyed`, which tells the trainer to pass epochs). Decoded or
    rendered images are kept in memory, one copy per process (each DataLoader worker fills its own).
    """

    def __init__(self, count: int, load: Callable[[int], tuple[np.ndarray, list[dict[str, Any]]]],
                 processor: ImageProcessor, attributes: dict[str, list[str]], grid: tuple[int, int],
                 flip: bool = False, flip_seed: int = 0):
        self.count, self._load, self.processor = count, load, processor
        self.attributes, self.grid, self.flip, self.flip_seed = attributes, grid, flip, flip_seed
        self._pixels = np.zeros((count, processor.size, processor.size, 3), dtype=np.uint8)
        self._objects: list[list[dict[str, Any]] | None] = [None] * count

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], image_root: str | Path, processor: ImageProcessor,
                  attributes: dict[str, list[str]], grid: tuple[int, int], flip: bool = False,
                  flip_seed: int = 0) -> SceneDataset:
        """Scenes from ``scenes.jsonl`` rows; boxes are rescaled when images are resized."""
        return cls(len(rows), _RowLoader(list(rows), Path(image_root), processor), processor, attributes, grid,
                   flip, flip_seed)

    @classmethod
    def generated(cls, spec: SceneSpec, seed: int, count: int, processor: ImageProcessor,
                  grid: tuple[int, int], flip: bool = False, recolor: float = 0.0,
                  other_shapes: float = 0.0, flip_seed: int = 0) -> SceneDataset:
        """``count`` fresh shapes-world scenes of `spec` (indices 0..count-1 of dataset `seed`).

        Two knobs break the link between colour and shape that held-out colour-shape pairs create (a
        star that is never red is otherwise recognised partly by not being red): a `recolor` share of
        the scenes is drawn in random colours far from every palette colour (no colour targets), and an
        `other_shapes` share holds only shapes outside the spec's (no shape targets). Neither ever
        draws a held-out pair.
        """
        others = tuple(shape for shape in ALL_SHAPES if shape not in spec.shapes)
        if other_shapes and not others:
            raise ValueError("other_shapes needs shapes outside the spec's, but it uses them all")
        other_spec = replace(spec, shapes=others, exclude_pairs=frozenset()) if other_shapes else spec
        load = _SceneGenerator(spec, other_spec, seed, processor, recolor, other_shapes)
        return cls(count, load, processor, spec_attributes(spec), grid, flip, flip_seed)

    @property
    def epoch_keyed(self) -> bool:
        """Whether samples change with the epoch (read them as ``dataset[index, epoch]``)."""
        return self.flip

    def __len__(self) -> int:
        return self.count

    def _scene(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Decoded (or rendered) once, then served from memory."""
        if self._objects[index] is None:
            self._pixels[index], self._objects[index] = self._load(index)
        return self._pixels[index], self._objects[index]

    def flipped(self, index: int, epoch: int = 0) -> bool:
        """Whether sample `index` is mirrored in `epoch`: a hash, the same in every process."""
        digest = hashlib.blake2b(f"flip|{self.flip_seed}|{epoch}|{index}".encode(), digest_size=1).digest()
        return self.flip and bool(digest[0] & 1)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        pixels, objects = self._scene(index)
        size = self.processor.size
        if self.flipped(index, epoch):
            pixels = pixels[:, ::-1]
            objects = [{**o, "box": [size - o["box"][2], o["box"][1], size - o["box"][0], o["box"][3]]}
                       for o in objects]
        targets = cell_targets(objects, (size, size), self.grid, self.attributes)
        return {"pixel_values": self.processor.normalize(np.ascontiguousarray(pixels)),
                "objectness": targets.objectness, "classes": targets.classes, "boxes": targets.boxes}


# The loaders are classes, not closures, so that a dataset pickles (DataLoader workers started by
# "spawn" or "forkserver" receive the dataset pickled).


@dataclass
class _RowLoader:
    rows: list[dict[str, Any]]
    root: Path
    processor: ImageProcessor

    def __call__(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        row = self.rows[index]
        image = load_image(self.root / row["image"])
        sx, sy = self.processor.size / image.width, self.processor.size / image.height
        objects = [{**o, "box": [o["box"][0] * sx, o["box"][1] * sy, o["box"][2] * sx, o["box"][3] * sy]}
                   for o in row["objects"]]
        return self.processor.to_uint8(image), objects


@dataclass
class _SceneGenerator:
    spec: SceneSpec
    other_spec: SceneSpec
    seed: int
    processor: ImageProcessor
    recolor: float
    other_shapes: float

    def __call__(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        spec, processor = self.spec, self.processor
        rng = random.Random(f"decorrelate|{self.seed}|{index}")
        draw = rng.random()
        scene_spec = self.other_spec if draw < self.other_shapes else spec
        scene, draw_spec = generate_scene(index, self.seed, scene_spec), scene_spec
        if self.other_shapes <= draw < self.other_shapes + self.recolor:
            scene, draw_spec = _recolored(scene, spec, rng)
        scale = processor.size / spec.image_size
        objects = [{**o.to_dict(), "box": [v * scale for v in o.box]} for o in scene.objects]
        for o in objects:  # a colour or shape without a name here has no target
            o["color"] = o["color"] if o["color"] in spec.palette else None
            o["shape"] = o["shape"] if o["shape"] in spec.shapes else None
        return processor.to_uint8(render_scene(scene, draw_spec)), objects


OTHER_COLOR_DISTANCE = 110  # RGB distance a random colour keeps from every palette colour and the backgrounds


def _recolored(scene: Scene, spec: SceneSpec, rng: random.Random) -> tuple[Scene, SceneSpec]:
    """`scene` with every object in a random colour that is no palette colour (nor a background grey)."""
    avoid = [*spec.palette.values(), (230, 230, 230), (190, 190, 190)]
    colors: dict[str, tuple[int, int, int]] = {}
    for k in range(len(scene.objects)):
        while True:
            rgb = tuple(rng.randrange(256) for _ in range(3))
            if min(math.dist(rgb, c) for c in avoid) >= OTHER_COLOR_DISTANCE:
                break
        colors[f"other{k}"] = rgb
    objects = tuple(replace(o, color=f"other{k}") for k, o in enumerate(scene.objects))
    return replace(scene, objects=objects), replace(spec, palette={**spec.palette, **colors})


def collate_scenes(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not batch:
        raise ValueError("collate_scenes got an empty batch")
    return {key: torch.stack([sample[key] for sample in batch]) for key in batch[0]}
