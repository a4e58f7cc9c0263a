"""Out-of-distribution stress: where does a VLM stop looking at the image and start hallucinating?

Two families of conditions, each at severities 0 (clean) to 5:

- image corruptions (`vlmkit.eval.corruptions`) applied to the first ``limit`` images of a
  shapes-world split, asked that split's questions (from ``{split}_qa.jsonl``);
- scene shifts (`vlmkit.eval.scene_shifts`): ``limit`` fresh scenes per level, drawn with the data
  set's own spec (from ``meta.json``) at indices past the data set's last scene, with questions from
  the data set's question generator, so ground truth stays exact.

For every condition and severity we record VQA accuracy (exact match, `vlmkit.eval.metrics.score`;
grounding questions are left out: their long box answers would dominate the cost), the
**hallucination rate** (share of "yes" answers to existence questions about absent objects) and,
when a ``caption_scorer`` is given, CHAIR-i of captions generated for "Describe the image.". The
**horizon** is the first severity whose hallucination rate exceeds the threshold.

Severity 0 is the same for every corruption (the clean images) and for every scene shift (the
plain scenes), so each is answered once and shared.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.data.shapes_world import CAPTION_PROMPTS, SceneSpec
from vlmkit.eval.corruptions import CORRUPTIONS, corrupt
from vlmkit.eval.figures import new_figure, to_png
from vlmkit.eval.generation import Answerer
from vlmkit.eval.metrics import normalize_answer, parse_yes_no, score
from vlmkit.eval.scene_shifts import SCENE_SHIFTS, shifted_scene
from vlmkit.io import read_jsonl

CAPTION_PROMPT = CAPTION_PROMPTS[0]  # "Describe the image.", the first caption prompt of training data
CAPTION_MAX_TOKENS = 48  # the longest demo training captions are 31 tokens
CURVE_STYLES = (("accuracy", "o-", "VQA accuracy"), ("hallucination_rate", "s--", "hallucination rate"),
                ("chair_i", "^:", "CHAIR-i"))
CaptionScorer = Callable[[list[str], list[dict]], float]

__all__ = ["CAPTION_PROMPT", "hallucination_horizon", "plot_stress", "run_stress"]


@dataclass
class Condition:
    """Images of one condition at one severity, with their questions and ground-truth scenes."""

    images: list[Image.Image]
    questions: list[dict]  # question records; "image_index" points into images
    scenes: list[dict]  # as in scenes.jsonl, one per image


def hallucination_horizon(severities: Sequence[int], rates: Sequence[float | None], threshold: float) -> int | None:
    """The first severity (in the given order) whose hallucination rate exceeds `threshold`, else None."""
    for severity, rate in zip(severities, rates):
        if rate is not None and rate > threshold:
            return int(severity)
    return None


def _read_jsonl(path: Path) -> list[dict]:
    return read_jsonl(path, ": stress tests need a shapes-world data directory (vlmkit synth)")


def _asked(questions: list[dict]) -> list[dict]:
    return [q for q in questions if q["type"] != "grounding"]


def _split_condition(data_root: Path, split: str, limit: int) -> Condition:
    """The first `limit` images of `split` with their (non-grounding) questions."""
    scenes = [s for s in _read_jsonl(data_root / "scenes.jsonl") if s.get("split") == split][:limit]
    if not scenes:
        raise ValueError(f"{data_root / 'scenes.jsonl'} has no scenes of split {split!r}")
    index_of = {s["image"]: i for i, s in enumerate(scenes)}
    questions = [{**q, "image_index": index_of[q["image"]]}
                 for q in _asked(_read_jsonl(data_root / f"{split}_qa.jsonl")) if q.get("image") in index_of]
    images = [load_image(data_root / s["image"]) for s in scenes]
    return Condition(images, questions, scenes)


def _base_spec(data_root: Path) -> tuple[SceneSpec, int, int]:
    """The data set's scene spec with its held-out pairs excluded, its seed and its number of scenes."""
    path = data_root / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: scene shifts need the data set's meta.json (vlmkit synth)")
    meta = json.loads(path.read_text())
    try:
        names = {f.name for f in fields(SceneSpec)}
        spec = SceneSpec(**{k: v for k, v in meta["spec"].items() if k in names})
        holdout = frozenset(tuple(p) for p in meta.get("holdout_pairs", []))
        total = int(meta["n"]) + int(meta.get("n_compositional", 0))
        return replace(spec, exclude_pairs=spec.exclude_pairs | holdout), int(meta["seed"]), total
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: cannot rebuild the scene spec ({type(err).__name__}: {err})") from None


def _shift_condition(name: str, level: int, base: SceneSpec, seed: int, first_index: int, limit: int) -> Condition:
    negatives = base.allowed_pairs()  # absent objects asked about come from the training vocabulary
    images, questions, scenes = [], [], []
    for i in range(limit):
        shifted = shifted_scene(name, level, first_index + i, seed, base)
        images.append(shifted.image)
        scenes.append(shifted.scene.to_dict())
        for qa in _asked([q.to_dict() for q in shifted.questions(negatives, ("random", "popular")[i % 2])]):
            questions.append({**qa, "image_index": i})
    return Condition(images, questions, scenes)


def _measure(answerer: Answerer, condition: Condition, caption_scorer: CaptionScorer | None,
             captioner: Answerer | None) -> dict[str, Any]:
    pixels = [answerer.processor.preprocess(image) for image in condition.images]
    qs = condition.questions
    with torch.inference_mode():
        answers = answerer.answer([q["question"] for q in qs], [pixels[q["image_index"]] for q in qs])
    absent = [parse_yes_no(a) == "yes" for q, a in zip(qs, answers)
              if q["type"] == "exists" and normalize_answer(q["answer"]) == "no"]
    out: dict[str, Any] = {
        "accuracy": score(qs, answers).get("vqa_accuracy"),
        "hallucination_rate": float(np.mean(absent)) if absent else None,
        "n_questions": len(qs),
        "n_absent": len(absent),
        "chair_i": None,
    }
    if caption_scorer is not None and captioner is not None:
        with torch.inference_mode():
            captions = captioner.answer([CAPTION_PROMPT] * len(pixels), pixels)
        out["chair_i"] = float(caption_scorer(captions, condition.scenes))
    return out


def _curves(severities: Sequence[int], per_severity: list[dict], threshold: float) -> dict[str, Any]:
    curves: dict[str, Any] = {"severity": list(severities)}
    for key in ("accuracy", "hallucination_rate", "chair_i", "n_questions", "n_absent"):
        curves[key] = [m[key] for m in per_severity]
    curves["horizon"] = hallucination_horizon(severities, curves["hallucination_rate"], threshold)
    return curves


def run_stress(answerer: Answerer, data_root: str | Path, *, split: str = "test", limit: int = 100,
               severities: Sequence[int] = (0, 1, 2, 3, 4, 5), threshold: float = 0.2,
               caption_scorer: CaptionScorer | None = None, seed: int = 0) -> dict:
    """Accuracy, hallucination rate (and CHAIR-i) per severity for every corruption and scene shift.

    `limit` is the number of images per condition and severity (questions: about 7 per image). Cost
    is linear in it: on the demo model about 1.7 s of single-thread CPU per image with captions
    (about 1 s without), so the default 100 takes about 3 minutes.
    `caption_scorer(captions, scenes)` returns CHAIR-i for captions of images whose ground truth is
    `scenes` (dicts as in scenes.jsonl). `seed` drives the corruptions' random parts and, added to the
    data set's seed, the fresh scenes of the shifts. Returns ``{"threshold", "corruptions": {name:
    curves}, "scene_shifts": {name: curves}, "n_images", "seconds"}`` where curves are lists over
    `severities` (``severity``, ``accuracy``, ``hallucination_rate``, ``chair_i`` (None when not
    scored), ``n_questions``, ``n_absent``: the absent-object questions behind the hallucination rate)
    and ``horizon`` (`hallucination_horizon`).
    """
    t0 = time.perf_counter()
    data_root = Path(data_root)
    severities = [int(s) for s in severities]
    if not severities or any(not 0 <= s <= 5 for s in severities):
        raise ValueError(f"severities must be a non-empty list of ints in 0..5, got {severities}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    captioner = None
    if caption_scorer is not None:
        captioner = Answerer(answerer.model, answerer.tok, batch_size=answerer.batch_size,
                             max_new_tokens=CAPTION_MAX_TOKENS, precision=answerer.precision)

    def measure(condition: Condition) -> dict[str, Any]:
        return _measure(answerer, condition, caption_scorer, captioner)

    clean = _split_condition(data_root, split, limit)
    clean_pixels = [np.asarray(image) for image in clean.images]
    base, data_seed, n_scenes = _base_spec(data_root)

    def corrupted(name: str, severity: int) -> Condition:
        images = [Image.fromarray(corrupt(x, name, severity, seed=seed * 1_000_003 + i))
                  for i, x in enumerate(clean_pixels)]
        return replace(clean, images=images)

    def shifted(name: str, level: int) -> Condition:
        return _shift_condition(name, level, base, data_seed + seed, n_scenes, limit)

    sections: dict[str, dict] = {}
    for section, names, build in (("corruptions", CORRUPTIONS, corrupted), ("scene_shifts", SCENE_SHIFTS, shifted)):
        baseline = None  # severity 0 is the same condition for every name of a family: answer it once
        sections[section] = {}
        for name in names:
            per_severity = []
            for s in severities:
                if s == 0:
                    baseline = baseline or measure(build(name, 0))
                per_severity.append(baseline if s == 0 else measure(build(name, s)))
            sections[section][name] = _curves(severities, per_severity, threshold)
    seconds = round(time.perf_counter() - t0, 1)
    return {"threshold": threshold, **sections, "n_images": len(clean.images), "seconds": seconds}


def plot_stress(section: dict) -> bytes:
    """One PNG: a small panel per corruption and scene shift with accuracy, hallucination rate and
    (when scored) CHAIR-i against severity, the threshold as a dotted line and the horizon marked."""
    panels = [(name, c, "") for name, c in section.get("corruptions", {}).items()]
    panels += [(name, c, " (scene shift)") for name, c in section.get("scene_shifts", {}).items()]
    if not panels:
        raise ValueError("nothing to plot: the stress section has no corruptions or scene shifts")
    cols = 4
    rows = -(-len(panels) // cols)
    figure = new_figure(3.2 * cols, 2.5 * rows)
    axes = figure.subplots(rows, cols, squeeze=False)
    threshold = section.get("threshold")
    for ax, (name, curves, kind) in zip(axes.flat, panels):
        x = curves["severity"]
        for key, style, label in CURVE_STYLES:
            y = [np.nan if v is None else v for v in curves.get(key, [])]
            if y and not all(np.isnan(y)):
                ax.plot(x, y, style, label=label, markersize=4)
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
        horizon = curves.get("horizon")
        if horizon is not None:
            ax.axvline(horizon, color="red", alpha=0.5, linewidth=2, label="horizon")
        ax.set_title(f"{name}{kind}" + (f", horizon {horizon}" if horizon is not None else ""), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(x)
        ax.set_xlabel("severity", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1.02))
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return to_png(figure)
