"""Dataset files: `write_dataset` generates, renders and describes every scene of a shapes-world dataset
and writes its images, the records, question and caption files of each split, ``scenes.jsonl`` (the
ground truth) and ``meta.json`` (the summary it also returns); with ``multi_image`` also the two-image
task of `vlmkit.data.shapes_world.multi`.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vlmkit.data.shapes_world.generate import _derive_seed, generate_scene
from vlmkit.data.shapes_world.language import caption_scene, questions_for_scene
from vlmkit.data.shapes_world.multi import MULTI_QUESTION_TYPES, check_pair_spec, pair_records, scene_pair
from vlmkit.data.shapes_world.records import dialogue_records, question_records, scene_records
from vlmkit.data.shapes_world.render import render_scene
from vlmkit.data.shapes_world.spec import (
    DEFAULT_HOLDOUT,
    QUESTION_TYPES,
    SPATIAL_MARGIN,
    VERSION,
    SceneSpec,
    _as_pairs,
)
from vlmkit.data.shapes_world.video import (
    DEFAULT_FRAMES,
    VIDEO_QUESTION_TYPES,
    clip_records,
    moving_clip,
    render_clip,
)

# --------------------------------------------------------------------------------------------------
# Dataset files


RECORD_STYLES: tuple[str, ...] = ("mixed", "dialogue", "questions")


def _dump_json_list(path: Path, items: Sequence[Any]) -> None:
    # One element per line: valid JSON that still diffs and greps well.
    with open(path, "w", encoding="utf-8") as f:
        if not items:
            f.write("[]\n")
            return
        f.write("[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n")


def _dump_jsonl(path: Path, items: Iterable[Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for x in items:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")


SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional", "variants")
# The `variants` split: training's pairs, drawn differently (sizes, turns, background greys that
# training never shows), to check that a model reads shapes and colours rather than exact pixels.
DRAWING_VARIANTS: dict[str, Any] = {"size_jitter": 0.2, "max_rotation": 20, "background_levels": (175, 250)}


def write_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n: int = 2000,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    holdout_pairs: Iterable[Sequence[str]] = DEFAULT_HOLDOUT,
    backgrounds: bool | None = None,
    *,
    n_compositional: int | None = None,
    spec: SceneSpec | None = None,
    qa_per_type: int = 1,
    margin: float = SPATIAL_MARGIN,
    records: str = "mixed",
    dialogues_per_image: int = 1,
    dialogue_per_type: int = 1,
    object_lists: bool = False,
    n_variants: int = 0,
    variants: Mapping[str, Any] | None = None,
    multi_image: int = 0,
    video: int = 0,
    video_frames: int = DEFAULT_FRAMES,
) -> dict[str, Any]:
    """Generate shapes-world under ``out_dir`` and return the summary also written to ``meta.json``.

    ``n`` scenes (indices ``0..n-1``) are split contiguously into train / val / test; they never
    contain a ``holdout_pairs`` object. ``n_compositional`` further scenes (indices ``n..``; default
    ``max(1, n // 10)``, 0 when there are no held-out pairs) each contain at least one held-out object.
    ``n_variants`` scenes after those (split ``variants``) hold training's pairs drawn differently:
    `SceneSpec` drawing settings ``variants`` (default `DRAWING_VARIANTS`).
    ``image_size`` (default 64) and ``backgrounds`` (default True) build the default `SceneSpec`;
    pass ``spec`` instead for full control (then leave those two unset). Existing files are
    overwritten; stale images from an earlier, larger run are not removed.

    ``records`` chooses the conversations of ``{split}.json``: ``"mixed"`` (per scene a caption
    request, two single questions and one 2-4 turn conversation; see `scene_records`) or
    ``"dialogue"`` (``dialogues_per_image`` conversations each asking up to ``dialogue_per_type``
    questions of every type, plus the object lists when ``object_lists``; see `dialogue_records`) or
    ``"questions"`` (the same questions one per record; see `question_records`). The question files
    ``{split}_qa.jsonl`` are the same whatever the style.

    ``multi_image`` pairs of scenes (default 0: none, and nothing else changes) make the two-image task
    (see `vlmkit.data.shapes_world.multi`), split into train / val / test by the same fractions: images
    ``images/multi_{index}_{1,2}.png``, records ``multi_{split}.json`` (one question each), questions
    ``multi_{split}_qa.jsonl`` (``image`` is the list of both paths) and the ground truth
    ``multi_scenes.jsonl``. Pairs use the training spec (no held-out pair is drawn or named).

    ``video`` clips of ``video_frames`` frames (default 0: none, and nothing else changes) make the
    moving-shapes task (see `vlmkit.data.shapes_world.video`), split alike: frames
    ``videos/clip_{index}/frame_{t}.png``, records ``video_{split}.json`` (one question each, ``"video"``:
    the clip's directory), questions ``video_{split}_qa.jsonl`` and the trajectories ``video_clips.jsonl``.
    """
    t0 = time.perf_counter()
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"n={n} with val_fraction={val_fraction} and test_fraction={test_fraction} leaves no training "
            "scenes; increase n or lower the fractions"
        )
    if qa_per_type < 1:
        raise ValueError(f"qa_per_type must be >= 1, got {qa_per_type}")
    if records not in RECORD_STYLES:
        raise ValueError(f"records must be one of {RECORD_STYLES}, got {records!r}")
    if dialogues_per_image < 1:
        raise ValueError(f"dialogues_per_image must be >= 1, got {dialogues_per_image}")
    style = records
    if spec is None:
        spec = SceneSpec(
            image_size=64 if image_size is None else image_size,
            backgrounds=True if backgrounds is None else backgrounds,
        )
    elif image_size is not None or backgrounds is not None:
        raise ValueError("pass image_size/backgrounds inside spec (SceneSpec(...)), not next to it")
    holdout = _as_pairs(holdout_pairs, "holdout_pairs")
    unknown = sorted(holdout - set(spec.all_pairs()))
    if unknown:
        raise ValueError(f"holdout_pairs {unknown} use colours/shapes missing from the palette/shapes")
    remaining = set(spec.all_pairs()) - holdout - spec.exclude_pairs
    lost = [c for c in spec.colors if not any(p[0] == c for p in remaining)]
    lost += [s for s in spec.shapes if not any(p[1] == s for p in remaining)]
    if lost:
        raise ValueError(
            f"holdout_pairs leave no training pair for {lost}; "
            "every colour and shape must keep another partner"
        )
    if n_compositional is None:
        n_compositional = max(1, n // 10) if holdout else 0
    if n_compositional < 0:
        raise ValueError(f"n_compositional must be >= 0, got {n_compositional}")
    if n_compositional and not holdout:
        raise ValueError("n_compositional > 0 needs at least one holdout pair")
    train_spec = replace(spec, exclude_pairs=spec.exclude_pairs | holdout, require_pairs=frozenset())
    comp_spec = replace(spec, require_pairs=holdout) if holdout else train_spec
    if n_variants < 0:
        raise ValueError(f"n_variants must be >= 0, got {n_variants}")
    if not isinstance(multi_image, int) or multi_image < 0:
        raise ValueError(f"multi_image must be an int >= 0 (pairs of images), got {multi_image!r}")
    if multi_image:
        check_pair_spec(spec)
    if not isinstance(video, int) or video < 0:
        raise ValueError(f"video must be an int >= 0 (clips), got {video!r}")
    variant_spec = replace(train_spec, **dict(DRAWING_VARIANTS if variants is None else variants))
    split_specs = {"train": train_spec, "val": train_spec, "test": train_spec, "compositional": comp_spec,
                   "variants": variant_spec}
    bounds = [("train", n_train), ("val", n_val), ("test", n_test), ("compositional", n_compositional)]
    bounds += [("variants", n_variants)] if n_variants else []

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records: dict[str, list] = {s: [] for s in SPLITS}
    qa_rows: dict[str, list] = {s: [] for s in SPLITS}
    cap_rows: dict[str, list] = {s: [] for s in SPLITS}
    scene_rows: list[dict[str, Any]] = []
    index = 0
    for split, count in bounds:
        sp = split_specs[split]
        neg_pool = sp.allowed_pairs()  # held-out pairs are never mentioned in train/val/test text
        focus = holdout if split == "compositional" else None
        for i in range(count):
            scene = generate_scene(index, seed, sp)
            image = f"images/{index:06d}.png"
            render_scene(scene, sp).save(out / image, format="PNG")
            row = {"image": image, "split": split, **scene.to_dict()}
            scene_rows.append(row)
            qa_rng = random.Random(_derive_seed(seed, index, "qa"))
            qas = questions_for_scene(
                scene,
                qa_rng,
                sp,
                max_per_type=qa_per_type,
                focus_pairs=focus,
                negative_pairs=neg_pool,
                first_negative=("random", "popular")[i % 2],  # exact random/popular balance per split
                margin=margin,
            )
            for j, q in enumerate(qas):
                qa_rows[split].append({"id": f"{index:06d}_{j:02d}", "image": image, **q.to_dict()})
            text_rng = random.Random(_derive_seed(seed, index, "text"))
            for c in caption_scene(scene, text_rng, margin=margin):
                cap_rows[split].append({"image": image, "caption": c})
            rec_rng = random.Random(_derive_seed(seed, index, "records"))
            if style == "questions":
                made = question_records(scene, image, rec_rng, sp, max_per_type=dialogue_per_type, focus_pairs=focus,
                                        negative_pairs=neg_pool, margin=margin, object_lists=object_lists)
            elif style == "dialogue":
                made = dialogue_records(scene, image, rec_rng, sp, n_dialogues=dialogues_per_image,
                                        max_per_type=dialogue_per_type, focus_pairs=focus,
                                        negative_pairs=neg_pool, margin=margin, object_lists=object_lists)
            else:
                made = scene_records(scene, image, rec_rng, sp, focus_pairs=focus, negative_pairs=neg_pool,
                                     margin=margin)
            records[split].extend(made)
            index += 1

    files: dict[str, str] = {}
    for split, _ in bounds:
        _dump_json_list(out / f"{split}.json", records[split])
        _dump_jsonl(out / f"{split}_qa.jsonl", qa_rows[split])
        _dump_jsonl(out / f"captions_{split}.jsonl", cap_rows[split])
        files[split] = f"{split}.json"
        files[f"{split}_qa"] = f"{split}_qa.jsonl"
        files[f"captions_{split}"] = f"captions_{split}.jsonl"
    _dump_jsonl(out / "scenes.jsonl", scene_rows)
    files["scenes"] = "scenes.jsonl"
    multi_counts = _write_pairs(out, seed, train_spec, multi_image, val_fraction, test_fraction, files)
    video_counts = _write_clips(out, seed, train_spec, video, video_frames, val_fraction, test_fraction, files)

    counts = {}
    for split, count in bounds:
        rows = qa_rows[split]
        counts[split] = {
            "scenes": count,
            "records": len(records[split]),
            "qa": len(rows),
            "captions": len(cap_rows[split]),
            "qa_types": dict(sorted(Counter(r["type"] for r in rows).items())),
            "exists_answers": dict(
                sorted(Counter(r["answer"] for r in rows if r["type"] == "exists").items())
            ),
            "negatives": dict(sorted(Counter(r["negative"] for r in rows if "negative" in r).items())),
        }
    meta = {
        "version": VERSION,
        "seed": seed,
        "n": n,
        "n_compositional": n_compositional,
        "image_size": spec.image_size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "backgrounds": spec.backgrounds,
        "palette": {k: list(v) for k, v in spec.palette.items()},
        "shapes": list(spec.shapes),
        "sizes": {k: spec.size_px(k) for k in spec.sizes},
        "holdout_pairs": sorted([list(p) for p in holdout]),
        "qa_per_type": qa_per_type,
        "records": style,
        "dialogues_per_image": dialogues_per_image if style == "dialogue" else 0,
        **({"dialogue_per_type": dialogue_per_type, "object_lists": object_lists} if style != "mixed" else {}),
        "spatial_margin": margin,
        "question_types": list(QUESTION_TYPES),
        "box_format": (
            "scenes.jsonl: pixel [x1,y1,x2,y2], x2/y2 exclusive; text: <box>x1,y1,x2,y2</box> in [0,1000]"
        ),
        "spec": spec.to_dict(),
        **({"variants": variant_spec.to_dict()} if n_variants else {}),
        "counts": counts,
        "files": files,
    }
    if multi_image:
        meta.update({"multi_image": multi_image, "multi_question_types": list(MULTI_QUESTION_TYPES),
                     "multi_counts": multi_counts})
    if video:
        meta.update({"video": video, "video_frames": video_frames, "video_question_types": list(VIDEO_QUESTION_TYPES),
                     "video_counts": video_counts})
    with open(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return {**meta, "out_dir": str(out), "seconds": round(time.perf_counter() - t0, 3)}


def _write_pairs(out: Path, seed: int, spec: SceneSpec, n: int, val_fraction: float, test_fraction: float,
                 files: dict[str, str]) -> dict[str, Any]:
    """Render and write `n` two-image pairs (the files `write_dataset` describes); adds them to `files`
    and returns their counts per split."""
    if not n:
        return {}
    scene_rows, counts = [], {}
    index = 0
    for split, count in _split_bounds(n, val_fraction, test_fraction):
        records, qa_rows = [], []
        for position in range(count):
            pair = scene_pair(index, seed, spec, position)
            images = [f"images/multi_{index:06d}_{k}.png" for k in (1, 2)]
            for scene, image in zip((pair.first, pair.second), images):
                render_scene(scene, spec).save(out / image, format="PNG")
            scene_rows.append({"id": f"multi_{index:06d}", "image": images, "split": split, **pair.to_dict()})
            records.extend(pair_records(pair, images))
            qa_rows.extend({"id": f"multi_{index:06d}_{j:02d}", "image": images, **q.to_dict()}
                           for j, q in enumerate(pair.questions))
            index += 1
        name = f"multi_{split}"
        _dump_json_list(out / f"{name}.json", records)
        _dump_jsonl(out / f"{name}_qa.jsonl", qa_rows)
        files[name], files[f"{name}_qa"] = f"{name}.json", f"{name}_qa.jsonl"
        counts[name] = {"pairs": count, "records": len(records), "qa": len(qa_rows),
                        "qa_types": dict(sorted(Counter(r["type"] for r in qa_rows).items())),
                        "answers": {t: dict(sorted(Counter(r["answer"] for r in qa_rows if r["type"] == t).items()))
                                    for t in ("multi_count", "multi_both")}}
    _dump_jsonl(out / "multi_scenes.jsonl", scene_rows)
    files["multi_scenes"] = "multi_scenes.jsonl"
    return counts


def _split_bounds(n: int, val_fraction: float, test_fraction: float) -> list[tuple[str, int]]:
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return [("train", n - n_val - n_test), ("val", n_val), ("test", n_test)]


def _write_clips(out: Path, seed: int, spec: SceneSpec, n: int, frames: int, val_fraction: float,
                 test_fraction: float, files: dict[str, str]) -> dict[str, Any]:
    """Render and write `n` moving-shapes clips (the files `write_dataset` describes); adds them to `files`
    and returns their counts per split."""
    if not n:
        return {}
    rows, counts, index = [], {}, 0
    for split, count in _split_bounds(n, val_fraction, test_fraction):
        records, qa_rows = [], []
        for position in range(count):
            clip = moving_clip(index, seed, spec, position, frames)
            directory = f"videos/clip_{index:06d}/"
            (out / directory).mkdir(parents=True, exist_ok=True)
            for t, frame in enumerate(render_clip(clip, spec)):
                frame.save(out / directory / f"frame_{t:03d}.png", format="PNG")
            rows.append({"id": f"video_{index:06d}", "video": directory, "split": split, **clip.to_dict()})
            records.extend(clip_records(clip, directory))
            qa_rows.extend({"id": f"video_{index:06d}_{j:02d}", "video": directory, **q.to_dict()}
                           for j, q in enumerate(clip.questions))
            index += 1
        name = f"video_{split}"
        _dump_json_list(out / f"{name}.json", records)
        _dump_jsonl(out / f"{name}_qa.jsonl", qa_rows)
        files[name], files[f"{name}_qa"] = f"{name}.json", f"{name}_qa.jsonl"
        counts[name] = {"clips": count, "records": len(records), "qa": len(qa_rows),
                        "answers": {t: dict(sorted(Counter(r["answer"] for r in qa_rows if r["type"] == t).items()))
                                    for t in ("video_direction", "video_leave")}}
    _dump_jsonl(out / "video_clips.jsonl", rows)
    files["video_clips"] = "video_clips.jsonl"
    return counts
