"""Tests for the shapes-world synthetic dataset (vlmkit.data.shapes_world) and its boxes (vlmkit.data.boxes)."""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmkit.data import shapes_world as sw
from vlmkit.data.boxes import box_iou, denormalize_box, format_box, normalize_box, parse_box
from vlmkit.data.shapes_world import (
    ALL_COLORS,
    ALL_SHAPES,
    DEFAULT_HOLDOUT,
    PALETTE,
    QUESTION_TYPES,
    SHAPES,
    SPATIAL_MARGIN,
    Scene,
    SceneSpec,
    caption_scene,
    cooccurrence_score,
    generate_scene,
    questions_for_scene,
    render_scene,
    write_dataset,
)
from vlmkit.data.shapes_world.language import _plural

N = 60
SPLITS = ("train", "val", "test", "compositional")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("shapes")
    summary = write_dataset(out, seed=3, n=N)
    scenes = _jsonl(out / "scenes.jsonl")
    return {
        "out": out,
        "summary": summary,
        "meta": json.loads((out / "meta.json").read_text()),
        "scenes": {r["image"]: r for r in scenes},
        "scene_list": scenes,
    }


def _objs(scene: dict) -> list[dict]:
    return scene["objects"]


def _norm(box: list[int], scene: dict) -> tuple[int, ...]:
    # independent of the module: x / width * 1000, rounded
    w, h = scene["width"], scene["height"]
    return tuple(round(v / s * 1000) for v, s in zip(box, (w, h, w, h)))


def _center(box: list[int]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_dataset(a, seed=11, n=25)
    write_dataset(b, seed=11, n=25)
    write_dataset(c, seed=12, n=25)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 25
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "scenes.jsonl").read_bytes() != (c / "scenes.jsonl").read_bytes()
    differing = sum((a / r).read_bytes() != (c / r).read_bytes() for r in files_a if r.suffix == ".png")
    assert differing > 20


def test_generate_scene_depends_only_on_seed_and_index() -> None:
    spec = SceneSpec()
    s1 = generate_scene(7, seed=5, spec=spec)
    generate_scene(3, seed=5, spec=spec)  # generation order must not matter
    s2 = generate_scene(7, seed=5, spec=spec)
    assert s1 == s2
    assert render_scene(s1, spec).tobytes() == render_scene(s2, spec).tobytes()
    assert generate_scene(7, seed=6, spec=spec) != s1
    assert Scene.from_dict(json.loads(json.dumps(s1.to_dict()))) == s1


# ------------------------------------------------------------------ pixels vs ground truth


def _check_pixels(img: np.ndarray, objects: list[dict], palette: dict, gap: int) -> None:
    for i, o in enumerate(objects):
        for p in objects[i + 1 :]:
            a, b = o["box"], p["box"]
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
        assert (o["color"], o["shape"]) not in [(p["color"], p["shape"]) for p in objects[i + 1 :]]
    for color in {o["color"] for o in objects}:
        mask = np.all(img == np.array(palette[color], dtype=np.uint8), axis=-1)
        inside = np.zeros_like(mask)
        for o in objects:
            if o["color"] != color:
                continue
            x1, y1, x2, y2 = o["box"]
            inside[y1:y2, x1:x2] = True
            m = mask[y1:y2, x1:x2]
            # tight box: the object touches all four edges
            assert m[0, :].any() and m[-1, :].any() and m[:, 0].any() and m[:, -1].any(), o
        assert not (mask & ~inside).any(), f"{color} pixels outside the boxes of {color} objects"


def test_boxes_match_rendered_pixels(ds: dict) -> None:
    palette = ds["meta"]["palette"]
    for scene in ds["scene_list"]:
        img = np.asarray(Image.open(ds["out"] / scene["image"]).convert("RGB"))
        assert img.shape == (scene["height"], scene["width"], 3)
        _check_pixels(img, _objs(scene), palette, gap=ds["meta"]["spec"]["min_gap"])


def test_boxes_match_pixels_for_all_shapes_colours_and_sizes() -> None:
    spec = SceneSpec(image_size=96, shapes=ALL_SHAPES, palette=ALL_COLORS, sizes={"tiny": 0.06, "big": 0.25})
    for i in range(40):
        scene = generate_scene(i, seed=1, spec=spec)
        img = np.asarray(render_scene(scene, spec))
        _check_pixels(img, [o.to_dict() for o in scene.objects], spec.palette, gap=spec.min_gap)


def test_overlap_mode_and_plain_backgrounds() -> None:
    spec = SceneSpec(allow_overlap=True, min_objects=5, max_objects=5, backgrounds=False)
    for i in range(20):
        scene = generate_scene(i, seed=0, spec=spec)
        assert len(scene.objects) == 5
        assert scene.background["kind"] == "plain"
        img = np.asarray(render_scene(scene, spec))
        # the last-drawn object is never occluded, so its box is exact
        top = scene.objects[-1]
        x1, y1, x2, y2 = top.box
        m = np.all(img[y1:y2, x1:x2] == spec.palette[top.color], axis=-1)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()


# ------------------------------------------------------------------ held-out compositional split


def test_holdout_pairs_absent_from_regular_splits_and_present_in_compositional(ds: dict) -> None:
    holdout = {tuple(p) for p in ds["meta"]["holdout_pairs"]}
    assert holdout == set(DEFAULT_HOLDOUT)
    splits = Counter(s["split"] for s in ds["scene_list"])
    assert splits["compositional"] >= 1 and splits["train"] >= 1
    for scene in ds["scene_list"]:
        pairs = {(o["color"], o["shape"]) for o in _objs(scene)}
        if scene["split"] == "compositional":
            assert pairs & holdout, scene
        else:
            assert not pairs & holdout, scene
    # every colour and shape still occurs in training, with other partners
    train_pairs = {
        (o["color"], o["shape"]) for s in ds["scene_list"] if s["split"] == "train" for o in _objs(s)
    }
    assert {c for c, _ in train_pairs} == set(PALETTE)
    assert {s for _, s in train_pairs} == set(SHAPES)
    # held-out names are not even mentioned in train/val/test text
    names = [f"{c} {s}" for c, s in holdout]
    for split in ("train", "val", "test"):
        for fname in (f"{split}.json", f"{split}_qa.jsonl", f"captions_{split}.jsonl"):
            text = (ds["out"] / fname).read_text()
            assert not any(name in text for name in names), (fname, names)


def test_compositional_questions_focus_on_held_out_objects(ds: dict) -> None:
    holdout = {f"{c} {s}" for c, s in ds["meta"]["holdout_pairs"]}
    rows = _jsonl(ds["out"] / "compositional_qa.jsonl")

    def share(t: str) -> float:
        typed = [r for r in rows if r["type"] == t]
        return sum(bool(set(r["targets"]) & holdout) for r in typed) / len(typed)

    # a held-out object is always available for these ...
    for t in ("grounding", "identify", "spatial", "size"):
        assert share(t) == 1.0, t
    # ... but color/shape questions need its shape/colour to be unique in the scene
    assert share("color") >= 0.5 and share("shape") >= 0.5
    yes = [r for r in rows if r["type"] == "exists" and r["answer"] == "yes"]
    assert all(set(r["targets"]) & holdout for r in yes)


# ------------------------------------------------------------------ answers vs ground truth

_PLURALS = {_plural(s): s for s in ALL_SHAPES}


_PATTERNS = {
    "color": r"What (?:color is|is the color of) the (\w+)\?",
    "shape": r"What (?:shape is|is the shape of) the (\w+) object\?",
    "count": r"How many (?:objects (?:are there|are in the image)|(\w+) objects are there|(\w+) are there)\?",
    "exists": r"(?:Is there|Does the image contain) an? (\w+ \w+)(?: in the image)?\?",
    "spatial": (
        r"Is the (\w+ \w+) (left or right of|to the left or to the right of|above or below) the (\w+ \w+)\?"
    ),
    "size": r"Which is (bigger|smaller), the (\w+ \w+) or the (\w+ \w+)\?",
    "grounding": r"(?:Where is|Give the bounding box of|Locate) the (\w+ \w+)[.?]",
    "identify": r"What (?:object )?is at <box>\d+,\d+,\d+,\d+</box>\?",
}


def _oracle(q: str, scene: dict, margin_px: float) -> tuple[str, str | None]:
    """(type, answer) recomputed from the scene alone; answer None if the question should not be asked."""
    objs = _objs(scene)
    by_name = {f"{o['color']} {o['shape']}": o for o in objs}
    matches = [(t, re.fullmatch(p, q)) for t, p in _PATTERNS.items()]
    matches = [(t, m) for t, m in matches if m]
    assert len(matches) == 1, (q, matches)
    t, m = matches[0]
    if t == "color":
        hits = [o for o in objs if o["shape"] == m.group(1)]
        return t, hits[0]["color"] if len(hits) == 1 else None
    if t == "shape":
        hits = [o for o in objs if o["color"] == m.group(1)]
        return t, hits[0]["shape"] if len(hits) == 1 else None
    if t == "count":
        if m.group(1):
            return t, str(sum(o["color"] == m.group(1) for o in objs))
        if m.group(2):
            return t, str(sum(o["shape"] == _PLURALS[m.group(2)] for o in objs))
        return t, str(len(objs))
    if t == "exists":
        return t, "yes" if m.group(1) in by_name else "no"
    if t == "spatial":
        (ax, ay), (bx, by) = _center(by_name[m.group(1)]["box"]), _center(by_name[m.group(3)]["box"])
        if "above" in m.group(2):
            return t, None if abs(ay - by) <= margin_px else ("above" if ay < by else "below")
        return t, None if abs(ax - bx) <= margin_px else ("left" if ax < bx else "right")
    if t == "size":
        a, b = by_name[m.group(2)], by_name[m.group(3)]
        if a["size"] == b["size"]:
            return t, None
        big, small = (m.group(2), m.group(3)) if a["size"] == "large" else (m.group(3), m.group(2))
        return t, big if m.group(1) == "bigger" else small
    if t == "grounding":
        return t, "<box>{},{},{},{}</box>".format(*_norm(by_name[m.group(1)]["box"], scene))
    box = parse_box(q)
    hits = [n for n, o in by_name.items() if _norm(o["box"], scene) == box]
    return t, hits[0] if len(hits) == 1 else None


def test_every_answer_matches_scene_ground_truth(ds: dict) -> None:
    all_types = Counter()
    for split in SPLITS:
        rows = _jsonl(ds["out"] / f"{split}_qa.jsonl")
        types = Counter(r["type"] for r in rows)
        all_types.update(types)
        assert set(types) >= {"count", "exists", "grounding", "identify"}, (split, types)
        for r in rows:
            scene = ds["scenes"][r["image"]]
            assert scene["split"] == split
            t, expected = _oracle(r["question"], scene, SPATIAL_MARGIN * scene["width"])
            assert t == r["type"] and expected is not None and r["answer"] == expected, r
            assert ("negative" in r) == (t == "exists" and r["answer"] == "no")
            if t in ("grounding", "identify"):
                assert tuple(r["box"]) == parse_box(r["answer"] if t == "grounding" else r["question"])
    assert set(all_types) == set(QUESTION_TYPES)


def test_question_types_and_negatives_balanced_in_every_split(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, seed=1, n=300)
    for split in SPLITS:
        c = meta["counts"][split]
        n_scenes = c["scenes"]
        assert n_scenes >= 30
        assert set(c["qa_types"]) == set(QUESTION_TYPES), (split, c["qa_types"])
        # always-askable types once per scene, the conditional ones still common
        for t in ("count", "grounding", "identify"):
            assert c["qa_types"][t] == n_scenes
        for t in ("color", "shape", "spatial", "size"):
            assert c["qa_types"][t] >= 0.3 * n_scenes, (split, t, c["qa_types"])
        assert c["exists_answers"]["yes"] == c["exists_answers"]["no"] == n_scenes
        assert abs(c["negatives"]["random"] - c["negatives"]["popular"]) <= 1


def test_training_records_answers_are_consistent(ds: dict) -> None:
    # Chat records reuse the QA generator: every non-caption turn must pass the same oracle.
    n_qa = 0
    for split in SPLITS:
        for rec in json.loads((ds["out"] / f"{split}.json").read_text()):
            scene = ds["scenes"][rec["image"]]
            conv = rec["conversations"]
            for h, g in zip(conv[::2], conv[1::2]):
                q = h["value"].removeprefix("<image>\n")
                if q in sw.CAPTION_PROMPTS:
                    continue
                _, expected = _oracle(q, scene, SPATIAL_MARGIN * scene["width"])
                assert g["value"] == expected, (q, g["value"])
                n_qa += 1
    assert n_qa > 3 * N


def test_exists_questions_are_balanced_and_negatives_truly_absent(ds: dict) -> None:
    spec = SceneSpec()
    popular_scores, random_scores = [], []
    for split in SPLITS:
        rows = [r for r in _jsonl(ds["out"] / f"{split}_qa.jsonl") if r["type"] == "exists"]
        answers = Counter(r["answer"] for r in rows)
        assert answers["yes"] == answers["no"] > 0, (split, answers)
        kinds = Counter(r["negative"] for r in rows if r["answer"] == "no")
        assert set(kinds) <= {"random", "popular"}
        assert abs(kinds["random"] - kinds["popular"]) <= 1, (split, kinds)
        for r in rows:
            present = {(o["color"], o["shape"]) for o in _objs(ds["scenes"][r["image"]])}
            name = r["targets"][0]
            assert (tuple(name.split()) in present) == (r["answer"] == "yes")
            if r["answer"] == "no":
                score = cooccurrence_score(tuple(name.split()), present, spec)
                (popular_scores if r["negative"] == "popular" else random_scores).append(score)
    assert np.mean(popular_scores) > np.mean(random_scores) + 0.5


def test_cooccurrence_prior_is_visible_in_scene_statistics() -> None:
    def neighbour_rate(strength: float) -> float:
        spec = SceneSpec(min_objects=2, max_objects=2, cooccurrence=strength)
        scenes = [generate_scene(i, seed=0, spec=spec) for i in range(600)]
        return float(
            np.mean([cooccurrence_score(s.objects[0].pair, [s.objects[1].pair], spec) > 0 for s in scenes])
        )

    # uniform sampling gives ~0.62 neighbour pairs, the default prior ~0.78
    assert neighbour_rate(1.0) > neighbour_rate(0.0) + 0.08


# ------------------------------------------------------------------ boxes


def test_parse_box_round_trip_and_iou() -> None:
    for box in [(0, 0, 1000, 1000), (12, 345, 678, 999), (5, 6, 7, 8)]:
        assert parse_box(format_box(box)) == box
    assert parse_box("The answer is <box> 1, 2 ,3,4 </box>.") == (1, 2, 3, 4)
    assert parse_box("<box>1,2,3</box>") is None
    assert parse_box("no box here") is None
    assert parse_box("") is None
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert normalize_box((8, 16, 64, 48), 64, 64) == (125, 250, 1000, 750)
    assert normalize_box((10, 10, 20, 20), 100, 50) == (100, 200, 200, 400)


def test_grounding_answers_round_trip_to_pixel_boxes(ds: dict) -> None:
    rows = [r for r in _jsonl(ds["out"] / "test_qa.jsonl") if r["type"] == "grounding"]
    assert rows
    for r in rows:
        scene = ds["scenes"][r["image"]]
        name = r["targets"][0]
        (obj,) = [o for o in _objs(scene) if f"{o['color']} {o['shape']}" == name]
        px = denormalize_box(parse_box(r["answer"]), scene["width"], scene["height"])
        assert box_iou(px, obj["box"]) > 0.9


# ------------------------------------------------------------------ captions and chat records


def test_captions_mention_only_and_all_present_objects(ds: dict) -> None:
    names = "|".join(f"{c} {s}" for c in ALL_COLORS for s in ALL_SHAPES)
    pattern = re.compile(rf"\b({names})\b")
    for split in SPLITS:
        rows = _jsonl(ds["out"] / f"captions_{split}.jsonl")
        per_image = Counter(r["image"] for r in rows)
        assert min(per_image.values()) >= 3
        for r in rows:
            scene = ds["scenes"][r["image"]]
            present = {f"{o['color']} {o['shape']}" for o in _objs(scene)}
            mentioned = set(pattern.findall(r["caption"]))
            assert mentioned == present, (r["caption"], present)


def test_caption_relations_are_true() -> None:
    rng = random.Random(0)
    spec = SceneSpec()
    rel_re = re.compile(r"an? (?:small |large )?(\w+ \w+) (above|below|to the left of|to the right of) an? ")
    two_re = re.compile(
        r"There is an? (?:small |large )?(\w+ \w+) on the left and an? (?:small |large )?(\w+ \w+) "
    )
    seen = 0
    for i in range(150):
        scene = generate_scene(i, seed=2, spec=spec)
        by_name = {o.name: o for o in scene.objects}
        for cap in caption_scene(scene, rng):
            m = rel_re.match(cap)
            if m:
                rest = cap[m.end() :]
                other = re.match(r"(?:small |large )?(\w+ \w+)", rest).group(1)
                (ax, ay), (bx, by) = by_name[m.group(1)].center, by_name[other].center
                ok = {
                    "above": ay < by,
                    "below": ay > by,
                    "to the left of": ax < bx,
                    "to the right of": ax > bx,
                }
                assert ok[m.group(2)], cap
                seen += 1
            m = two_re.match(cap)
            if m:
                assert by_name[m.group(1)].center[0] < by_name[m.group(2)].center[0], cap
                seen += 1
    assert seen > 50


def test_llava_records_are_well_formed(ds: dict) -> None:
    ids = set()
    kinds = Counter()
    for split in SPLITS:
        records = json.loads((ds["out"] / f"{split}.json").read_text())
        assert records, split
        for rec in records:
            assert set(rec) == {"id", "image", "conversations"}
            assert rec["id"] not in ids
            ids.add(rec["id"])
            assert (ds["out"] / rec["image"]).is_file() and not Path(rec["image"]).is_absolute()
            assert ds["scenes"][rec["image"]]["split"] == split
            conv = rec["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert all(t["value"].strip() for t in conv)
            kinds["caption" if rec["id"].endswith("_cap") else "multi" if len(conv) > 2 else "single"] += 1
    assert kinds["caption"] == N + ds["meta"]["n_compositional"]
    assert kinds["single"] > N and kinds["multi"] > N // 2


def test_files_meta_and_counts(ds: dict) -> None:
    out, meta = ds["out"], ds["meta"]
    assert meta["version"] == sw.VERSION and meta["seed"] == ds["summary"]["seed"] and meta["n"] == N
    assert meta["image_size"] == 64 and set(meta["palette"]) >= set(PALETTE)
    assert len(ds["scene_list"]) == N + meta["n_compositional"]
    for split in SPLITS:
        c = meta["counts"][split]
        assert c["scenes"] == sum(s["split"] == split for s in ds["scene_list"])
        assert c["qa"] == len(_jsonl(out / f"{split}_qa.jsonl"))
        assert c["records"] == len(json.loads((out / f"{split}.json").read_text()))
        assert c["captions"] == len(_jsonl(out / f"captions_{split}.jsonl"))
    assert sum(meta["counts"][s]["scenes"] for s in ("train", "val", "test")) == N
    for scene in ds["scene_list"]:
        assert {"image", "split", "width", "height", "objects"} <= set(scene)
        for o in _objs(scene):
            assert set(o) == {"shape", "color", "size", "box"} and o["size"] in ("small", "large")
        with Image.open(out / scene["image"]) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    assert ds["summary"]["counts"] == meta["counts"]


def test_questions_without_spec_and_focus() -> None:
    scene = generate_scene(0, seed=9, spec=SceneSpec(min_objects=3, max_objects=3))
    qs = questions_for_scene(scene, random.Random(0), max_per_type=2)
    assert {q.type for q in qs} >= {"count", "exists", "grounding", "identify"}
    focus = [scene.objects[0].pair]
    qs = questions_for_scene(scene, random.Random(0), focus_pairs=focus)
    ground = [q for q in qs if q.type == "grounding"]
    assert ground[0].targets == (scene.objects[0].name,)


# ------------------------------------------------------------------ argument validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 10, "val_fraction": 0.5, "test_fraction": 0.5}, "no training"),
        ({"n": 10, "val_fraction": 1.5}, "val_fraction"),
        ({"n": 10, "image_size": 32}, "image_size=32 is too small"),
        ({"n": 10, "holdout_pairs": [("red", "blob")]}, "holdout_pairs"),
        ({"n": 10, "holdout_pairs": [("red", s) for s in SHAPES]}, "every colour and shape"),
        ({"n": 10, "spec": SceneSpec(), "image_size": 64}, "inside spec"),
        ({"n": 10, "multi_image": -1}, "multi_image must be an int >= 0"),
        ({"n": 10, "multi_image": 4, "spec": SceneSpec(min_objects=3, max_objects=3)},
         "different numbers of objects"),
    ],
)
def test_write_dataset_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 8}, "image_size must be"),
        ({"image_size": 32}, "use image_size >= "),
        ({"shapes": ("circle", "blob")}, "unknown shapes"),
        ({"palette": {}}, "palette is empty"),
        ({"palette": {"a": (1, 2, 3), "b": (1, 2, 3)}}, "same RGB"),
        ({"sizes": {"small": 0.2, "large": 0.2}}, "equal pixel sizes"),
        ({"sizes": {"small": 0.01}}, "increase image_size"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 40}, "distinct"),
        ({"exclude_pairs": [("pink", "star")]}, "exclude_pairs"),
        ({"background_kinds": ("plaid",)}, "background_kinds"),
    ],
)
def test_scene_spec_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SceneSpec(**kwargs)


def test_render_rejects_mismatched_spec() -> None:
    scene = generate_scene(0, seed=0, spec=SceneSpec())
    with pytest.raises(ValueError, match="generating spec"):
        render_scene(scene, SceneSpec(image_size=128))


# ------------------------------------------------------------------ speed


@pytest.mark.slow
def test_generation_speed(tmp_path: Path) -> None:
    t = time.perf_counter()
    write_dataset(tmp_path, seed=0, n=5000)
    assert time.perf_counter() - t < 30


# ------------------------------------------------------------------ drawing variation, dialogues, variants split


def test_drawing_variation_keeps_boxes_exact_and_round_trips() -> None:
    spec = SceneSpec(size_jitter=0.2, max_rotation=20, background_levels=(175, 250))
    turned = scaled = 0
    for i in range(40):
        scene = generate_scene(i, seed=2, spec=spec)
        img = np.asarray(render_scene(scene, spec))
        _check_pixels(img, [o.to_dict() for o in scene.objects], spec.palette, gap=spec.min_gap)
        turned += sum(o.rotation != 0 for o in scene.objects)
        scaled += sum(o.scale != 1.0 for o in scene.objects)
        assert all(abs(o.rotation) <= 20 and 0.8 <= o.scale <= 1.2 for o in scene.objects)
        assert 175 - 6 <= min(scene.background["rgb"]) and max(scene.background["rgb"]) <= 250
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert np.array_equal(np.asarray(render_scene(again, spec)), img)
    assert turned > 40 and scaled > 40
    # A plain spec draws as before: no variation fields in its records.
    plain = generate_scene(0, seed=2).to_dict()
    assert all(set(o) == {"shape", "color", "size", "box"} for o in plain["objects"])
    with pytest.raises(ValueError, match="max_rotation"):
        SceneSpec(max_rotation=90)
    with pytest.raises(ValueError, match="background_levels"):
        SceneSpec(background_levels=(250, 200))


def test_dialogue_records_ask_everything_without_echoing_boxes(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, seed=5, n=40, records="dialogue", dialogue_per_type=2, object_lists=True)
    assert meta["records"] == "dialogue" and meta["object_lists"]
    scenes = {r["image"]: r for r in _jsonl(tmp_path / "scenes.jsonl")}
    records = json.loads((tmp_path / "train.json").read_text())
    kinds = Counter(rec["id"].split("_", 1)[1] for rec in records)
    n_train = meta["counts"]["train"]["scenes"]
    assert kinds["cap"] == kinds["list"] == kinds["where"] == kinds["dlg0"] == n_train
    for rec in records:
        turns = [t["value"] for t in rec["conversations"]]
        scene = scenes[rec["image"]]
        if rec["id"].endswith("_list"):
            # Every object once, in reading order, with its box.
            named = re.findall(r"(\w+ \w+) (<box>[\d,]+</box>)", turns[1])
            assert sorted(n for n, _ in named) == sorted(f"{o['color']} {o['shape']}" for o in scene["objects"])
            for name, box in named:
                obj = next(o for o in scene["objects"] if f"{o['color']} {o['shape']}" == name)
                assert parse_box(box) == _norm(obj["box"], scene)
        if rec["id"].endswith("_dlg0"):
            grounded = {q for q in turns[0::2] if "<box>" not in q and re.search("Where|bounding|Locate", q)}
            boxes = [a for q, a in zip(turns[0::2], turns[1::2]) if q in grounded]
            asked = [q for q in turns[0::2] if "<box>" in q]
            assert not any(parse_box(a) == parse_box(q) for a in boxes for q in asked), turns
            assert len(turns) >= 2 * 5


def test_variants_split_draws_training_pairs_differently(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, seed=6, n=30, n_variants=12)
    assert meta["counts"]["variants"]["scenes"] == 12 and meta["variants"]["max_rotation"] == 20
    rows = [r for r in _jsonl(tmp_path / "scenes.jsonl") if r["split"] == "variants"]
    held_out = {tuple(p) for p in meta["holdout_pairs"]}
    assert len(rows) == 12 and not {(o["color"], o["shape"]) for r in rows for o in r["objects"]} & held_out
    assert any("rotation" in o or "scale" in o for r in rows for o in r["objects"])
    assert _jsonl(tmp_path / "variants_qa.jsonl")
    plain = write_dataset(tmp_path / "plain", seed=6, n=30)
    assert set(plain["counts"]) == set(SPLITS) and not (tmp_path / "plain" / "variants_qa.jsonl").exists()


def test_question_records_ask_one_question_each(tmp_path: Path) -> None:
    meta = write_dataset(tmp_path, seed=5, n=30, records="questions", object_lists=True)
    records = json.loads((tmp_path / "train.json").read_text())
    per_image = Counter(rec["image"] for rec in records)
    assert all(len(rec["conversations"]) == 2 for rec in records)
    assert min(per_image.values()) >= 4 and meta["counts"]["train"]["records"] == len(records)
    kinds = Counter(rec["id"].split("_", 1)[1].rstrip("0123456789") for rec in records)
    assert kinds["cap"] == kinds["list"] == kinds["where"] == len(per_image) and kinds["q"] > 5 * len(per_image)


# ------------------------------------------------------------------ two-image task


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("multi")
    summary = write_dataset(out, seed=5, n=20, multi_image=40)
    return {"out": out, "summary": summary, "pairs": _jsonl(out / "multi_scenes.jsonl")}


def test_multi_image_option_only_adds_files(tmp_path: Path, multi: dict) -> None:
    plain = tmp_path / "plain"
    write_dataset(plain, seed=5, n=20)
    assert not list(plain.glob("multi_*")) and not list(plain.glob("images/multi_*"))
    added = {p.relative_to(multi["out"]) for p in multi["out"].rglob("*") if p.is_file()}
    base = {p.relative_to(plain) for p in plain.rglob("*") if p.is_file()}
    assert base < added
    assert all(p.name.startswith("multi_") for p in added - base)
    for rel in base - {Path("meta.json")}:
        assert (plain / rel).read_bytes() == (multi["out"] / rel).read_bytes(), rel
    meta, plain_meta = (json.loads((d / "meta.json").read_text()) for d in (multi["out"], plain))
    extra = {"multi_image", "multi_question_types", "multi_counts"}
    assert set(meta) - set(plain_meta) == extra
    assert {k: v for k, v in meta.items() if k not in extra and k != "files"} == {
        k: v for k, v in plain_meta.items() if k != "files"}


def test_multi_image_task_is_deterministic(tmp_path: Path, multi: dict) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    write_dataset(again, seed=5, n=20, multi_image=40)
    write_dataset(other, seed=6, n=20, multi_image=40)
    names = sorted(p.relative_to(again) for p in again.rglob("multi_*") if p.is_file())
    assert len(names) == 7 + 80  # 3 record files, 3 question files, the scenes, two images per pair
    for rel in names:
        assert (again / rel).read_bytes() == (multi["out"] / rel).read_bytes(), rel
    assert (other / "multi_scenes.jsonl").read_bytes() != (again / "multi_scenes.jsonl").read_bytes()


def test_multi_image_answers_match_the_scenes(multi: dict) -> None:
    out, pairs = multi["out"], {p["id"]: p for p in multi["pairs"]}
    held_out = {f"{c} {s}" for c, s in DEFAULT_HOLDOUT}
    spec = SceneSpec()
    rows = [r for split in ("train", "val", "test") for r in _jsonl(out / f"multi_{split}_qa.jsonl")]
    assert len(rows) == 80 and len(pairs) == 40
    for row in rows:
        pair = pairs[row["id"][:12]]
        assert row["image"] == pair["image"]
        first, second = (Scene.from_dict(s) for s in pair["scenes"])
        names = [{o.name for o in scene.objects} for scene in (first, second)]
        assert not (names[0] | names[1]) & held_out and not set(row["targets"]) & held_out
        for scene, image in zip((first, second), row["image"]):  # the pictures show the ground truth
            assert np.array_equal(np.asarray(Image.open(out / image).convert("RGB")),
                                  np.asarray(render_scene(scene, spec)))
        if row["type"] == "multi_added":
            assert pair["kind"] == "added" and set(first.objects) < set(second.objects)
            (added,) = set(second.objects) - set(first.objects)
            assert row["answer"] == added.name and first.background == second.background
            # Only the added object's box differs between the two pictures.
            a, b = (np.asarray(Image.open(out / image).convert("RGB")) for image in row["image"])
            changed = np.argwhere((a != b).any(-1))
            x1, y1, x2, y2 = added.box
            assert len(changed) and (changed[:, 1] >= x1).all() and (changed[:, 1] < x2).all()
            assert (changed[:, 0] >= y1).all() and (changed[:, 0] < y2).all()
        elif row["type"] == "multi_count":
            assert pair["kind"] == "different" and len(first.objects) != len(second.objects)
            assert row["answer"] == ("first" if len(first.objects) > len(second.objects) else "second")
        else:
            assert row["type"] == "multi_both"
            (name,) = row["targets"]
            assert row["answer"] == ("yes" if name in names[0] and name in names[1] else "no")
            if row["answer"] == "no":
                assert row["negative"] == ("one_image" if name in names[0] | names[1] else "neither")
    for pair in pairs.values():
        if pair["kind"] == "different":  # the second scene shares an object with the first
            first, second = ({(o["color"], o["shape"]) for o in s["objects"]} for s in pair["scenes"])
            assert first & second


def test_multi_image_answers_are_balanced_and_records_ask_them(multi: dict) -> None:
    out, counts = multi["out"], multi["summary"]["multi_counts"]
    assert [counts[f"multi_{s}"]["pairs"] for s in ("train", "val", "test")] == [32, 4, 4]
    for split, c in counts.items():
        assert c["answers"]["multi_both"] == {"no": c["pairs"] // 2, "yes": c["pairs"] // 2}, split
        assert c["answers"]["multi_count"] == {"first": c["pairs"] // 4, "second": c["pairs"] // 4}, split
        assert c["qa_types"] == {"multi_added": c["pairs"] // 2, "multi_both": c["pairs"],
                                 "multi_count": c["pairs"] // 2}, split
        records = json.loads((out / f"{split}.json").read_text())
        qa = _jsonl(out / f"{split}_qa.jsonl")
        assert [(r["image"], r["conversations"]) for r in records] == [
            (q["image"], [{"from": "human", "value": "<image>\n<image>\n" + q["question"]},
                          {"from": "gpt", "value": q["answer"]}]) for q in qa]
