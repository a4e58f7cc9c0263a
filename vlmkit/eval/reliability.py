"""The reliability suite: does the model look at the image, and where does it break?

`run_reliability` answers every probe with one loaded model and writes ``report.json`` and a
self-contained ``report.html``. Sections:

- ``pope``: object-existence yes/no probes, random / popular / adversarial negatives (`vlmkit.eval.pope`);
- ``chair``: hallucinated objects in generated captions (`vlmkit.eval.chair`);
- ``blind`` and ``swap``: prior-reliance probes (`vlmkit.eval.probes`);
- ``stress``: accuracy and hallucination under image corruptions and scene shifts (`vlmkit.eval.stress`);
- ``attention``: where the answer tokens attend (`vlmkit.eval.attention`);
- ``modality_gap``: image/text embedding geometry of the clip-stage tower the model started from.

A section whose module is not installed, or that does not apply (no shapes-world data, no clip-stage
run), is ``{"status": "not available", "reason": ...}``; one of the last three that raises is
``{"status": "failed", "reason": ...}`` (and the error is printed), so a late failure never loses
the results before it.

Data comes from a shapes-world directory (default: the run's ``data.root``) or, for POPE, CHAIR and
the blind/swap probes built on POPE questions, from a COCO-style ``instances`` JSON. Sizes: ``limit``
(when given) replaces every default count below (images for POPE and CHAIR, questions for blind and
swap, images for stress, records for attention, pairs for the modality gap).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vlmkit import __version__
from vlmkit.data.images import load_image
from vlmkit.data.shapes_world import CAPTION_PROMPTS
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.eval import chair as chair_lib
from vlmkit.eval import pope as pope_lib
from vlmkit.eval import probes
from vlmkit.eval.annotations import ObjectDataset, coco_dataset, seeded_subset, shapes_world_dataset
from vlmkit.eval.generation import Answerer
from vlmkit.eval.run_eval import data_root_of, read_jsonl
from vlmkit.io import write_json_atomic, write_text_atomic
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

SECTIONS = ("pope", "chair", "blind", "swap", "stress", "attention", "modality_gap")
CAPTION_PROMPT = CAPTION_PROMPTS[0]


@dataclass
class SuiteSizes:
    """How much of each probe to run (defaults keep the demo model under 10 minutes on 2 CPU cores)."""

    pope_images: int = 100  # x 3 samplings x up to 2*3 questions (the "yes" ones shared)
    chair_images: int = 100
    blind_questions: int = 300  # each answered with its image, a blank and the mean image
    stress_images: int = 100
    attention_records: int = 100
    gap_pairs: int = 256

    @classmethod
    def with_limit(cls, limit: int | None) -> SuiteSizes:
        if limit is None:
            return cls()
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        return cls(*(limit,) * len(asdict(cls())))


def not_available(reason: str) -> dict[str, str]:
    return {"status": "not available", "reason": reason}


def optional_function(module: str, name: str) -> tuple[Callable | None, str]:
    """``vlmkit.eval.<module>.<name>``, or (None, why not) when the module or the function is missing."""
    try:
        mod = importlib.import_module(f"vlmkit.eval.{module}")
    except ImportError as err:
        return None, f"vlmkit.eval.{module} cannot be imported ({err})"
    fn = getattr(mod, name, None)
    return (fn, "") if callable(fn) else (None, f"vlmkit.eval.{module} has no {name}()")


def _guarded(name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or a ``{"status": "failed", "reason": ...}`` section (also printed) when it raises."""
    try:
        return fn()
    except Exception as err:  # an optional section must not lose the results computed before it
        reason = f"{type(err).__name__}: {err}"
        print(f"[reliability] {name} failed: {reason}", file=sys.stderr, flush=True)
        return {"status": "failed", "reason": reason}


def _is_clip_model(run: Path) -> bool:
    config = resolve_model_dir(run) / "config.json"
    return config.is_file() and '"vlmkit-clip"' in config.read_text()


def find_clip_run(run_dir: Path) -> Path | None:
    """The clip-stage run a model's vision tower came from: ``vision_from`` in its run.yaml, followed
    through ``init_from`` links, else a sibling directory named ``clip`` holding a clip model. A tower
    from another kind of run (e.g. the `dense` stage) has no text side: no clip run."""
    seen: set[Path] = set()
    current: Path | None = run_dir
    while current is not None and current.resolve() not in seen:
        seen.add(current.resolve())
        run_yaml = current / "run.yaml"
        if not run_yaml.is_file():
            break
        cfg = yaml.safe_load(run_yaml.read_text()) or {}
        if cfg.get("vision_from"):
            return Path(cfg["vision_from"]) if _is_clip_model(Path(cfg["vision_from"])) else None
        current = Path(cfg["init_from"]) if cfg.get("init_from") else None
    sibling = run_dir.parent / "clip"
    return sibling if _is_clip_model(sibling) else None


class _Timer:
    """Times each section and reports progress on stderr (a full run takes minutes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[reliability] {name}: {self.seconds[name]:.1f}s", file=sys.stderr, flush=True)
        return result


def run_reliability(run_dir: str | Path, *, data_root: str | Path | None = None, split: str = "test",
                    limit: int | None = None, instances: str | Path | None = None,
                    images: str | Path | None = None, chair_lexicon: str | Path | None = None,
                    stress_severities: Sequence[int] = (0, 1, 2, 3, 4, 5), device: str = "cpu",
                    batch_size: int = 64, seed: int = 0, out_dir: str | Path | None = None,
                    html: bool = True) -> dict[str, Any]:
    """Run every section, write ``report.json`` (and ``report.html``) to ``out_dir`` (default: the
    run directory) and return the report. ``stress_severities``: the severities the stress section
    measures (it is the costliest section: each severity of 13 conditions answers every question)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    sizes = SuiteSizes.with_limit(limit)
    model_dir = resolve_model_dir(run_dir)
    model = VisionLanguageModel.from_pretrained(model_dir, device=device)
    tokenizer = Tokenizer.load(model_dir)
    answerer = Answerer(model, tokenizer, batch_size=batch_size, max_new_tokens=16)
    captioner = Answerer(model, tokenizer, batch_size=batch_size, max_new_tokens=48)

    if instances is not None:
        if images is None:
            raise ValueError("--instances needs --images DIR (the directory its file_name paths are relative to)")
        dataset = coco_dataset(instances, images)
        root = Path(data_root) if data_root else None
        lexicon = chair_lib.Lexicon.load(chair_lexicon) if chair_lexicon else \
            chair_lib.Lexicon.from_names(dataset.vocabulary)
    else:
        root = Path(data_root) if data_root else data_root_of(run_dir)
        dataset = shapes_world_dataset(root, split)
        lexicon = chair_lib.Lexicon.load(chair_lexicon) if chair_lexicon else chair_lib.shapes_world_lexicon()

    timer = _Timer()
    report: dict[str, Any] = {
        "meta": {"model": str(model_dir), "data": str(root or dataset.image_root), "source": dataset.source,
                 "split": split, "seed": seed, "device": device, "sizes": asdict(sizes),
                 "stress_severities": list(stress_severities),
                 "vlmkit_version": __version__},
    }
    with torch.inference_mode():
        pope_records = pope_lib.build_pope(dataset, n_images=sizes.pope_images, seed=seed)
        report["pope"] = timer.run("pope", lambda: _pope(answerer, dataset, pope_records))
        report["chair"] = timer.run("chair", lambda: _chair(captioner, dataset, lexicon, sizes.chair_images, seed))
        if dataset.source == "shapes-world":
            pool = [r for r in read_jsonl(root / f"{split}_qa.jsonl") if r.get("type") != "grounding"]
        else:
            pool = _distinct_questions(pope_records)
        asked = seeded_subset(pool, sizes.blind_questions, seed)
        report["blind"], original = timer.run("blind", lambda: _blind(answerer, dataset, asked, pool, seed))
        report["swap"] = timer.run("swap", lambda: _swap(answerer, dataset, asked, pool, original, seed))

    # The sections below come from optional modules: a failure is reported in its section, and the
    # results above are still written.
    report["stress"] = timer.run("stress", lambda: _guarded("stress", lambda: _stress(
        answerer, root, dataset, split, sizes.stress_images, stress_severities, seed)))
    correct = [probes.is_correct(p, str(r["answer"])) for r, p in zip(asked, original)]
    n_att = sizes.attention_records
    report["attention"] = timer.run("attention", lambda: _guarded("attention", lambda: _attention(
        model, tokenizer, asked[:n_att], dataset.image_root, correct[:n_att])))
    report["modality_gap"] = timer.run("modality_gap", lambda: _guarded("modality_gap", lambda: _modality_gap(
        run_dir, root, sizes.gap_pairs)))
    plots: dict[str, bytes] = {}
    for section, plotter in (("stress", "plot_stress"), ("attention", "plot_attention")):
        fn, _ = optional_function(section, plotter)
        if report[section].get("status") is None and fn is not None and html:
            png = _guarded(f"{section} plot", lambda fn=fn, section=section: fn(report[section]))
            if isinstance(png, bytes):
                plots[section] = png

    report["meta"]["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - started, 2)}
    out = Path(out_dir) if out_dir else run_dir
    write_json_atomic(out / "report.json", report)
    if html:
        from vlmkit.eval.report_html import render_report_html

        write_text_atomic(out / "report.html", render_report_html(report, plots))
    return report


def _distinct_questions(records: list[dict]) -> list[dict]:
    seen: dict[tuple[str, str], dict] = {}
    for r in records:
        seen.setdefault((r["image"], r["question"]), {k: v for k, v in r.items() if k != "sampling"})
    return list(seen.values())


def _pope(answerer: Answerer, dataset: ObjectDataset, records: list[dict]) -> dict[str, Any]:
    predictions = pope_lib.answer_distinct(answerer, records, dataset.image_root)
    wrong = [{**r, "prediction": p} for r, p in zip(records, predictions) if not probes.is_correct(p, r["answer"])]
    return {
        "n_images": len({r["image"] for r in records}),
        "n_questions": len(records),
        "question": pope_lib.QUESTION_TEMPLATE,
        "splits": pope_lib.pope_scores(records, predictions),
        "wrong_examples": wrong[:12],
    }


def _chair(captioner: Answerer, dataset: ObjectDataset, lexicon: chair_lib.Lexicon, n_images: int,
           seed: int) -> dict[str, Any]:
    chosen = seeded_subset(dataset.images, n_images, seed)
    if dataset.source == "shapes-world":
        truths = [chair_lib.shapes_world_truth(im.scene) for im in chosen]
    else:
        truths = [set(im.objects) for im in chosen]
    lexicon.check_covers(set().union(*truths), f"objects of {dataset.source} images")
    captions = captioner.answer_records([{"image": im.image, "question": CAPTION_PROMPT} for im in chosen],
                                        dataset.image_root)
    result = chair_lib.chair(captions, truths, lexicon, [im.objects for im in chosen])
    for detail, im in zip(result["details"], chosen):
        detail["image"] = im.image
    return {"prompt": CAPTION_PROMPT, **result}


def _blind(answerer: Answerer, dataset: ObjectDataset, asked: list[dict], pool: list[dict],
           seed: int) -> tuple[dict[str, Any], list[str]]:
    questions = [r["question"] for r in asked]
    with_image = answerer.answer_records(asked, dataset.image_root)
    size = None
    if answerer.processor.tiling:  # AnyRes: a blank of the data's image size, whose grid follows it
        first = load_image(dataset.image_root / dataset.images[0].image)
        size = (first.height, first.width)
    blank = probes.blank_image(answerer.processor.image_processor, size)
    mean_from = seeded_subset(dataset.images, 256, seed)
    mean = probes.mean_image(answerer.processor.image_processor, [dataset.image_root / im.image for im in mean_from])
    predictions = {"image": with_image,
                   "blank": answerer.answer(questions, [blank] * len(asked)),
                   "mean": answerer.answer(questions, [mean] * len(asked))}
    section = {"blank_rgb": list(probes.GREY_RGB), "mean_of_images": len(mean_from),
               **probes.blind_scores(asked, pool, predictions)}
    return section, with_image


def _swap(answerer: Answerer, dataset: ObjectDataset, asked: list[dict], pool: list[dict],
          original: list[str], seed: int) -> dict[str, Any]:
    partners = probes.swap_partners(asked, pool, seed)
    paired = [p for p in partners if p is not None]
    swapped = answerer.answer_records(paired, dataset.image_root)
    section = probes.swap_scores(asked, partners, original, swapped)
    section["examples"] = [
        {"question": r["question"], "image": r["image"], "answer": r["answer"], "prediction": o,
         "swap_image": p["image"], "swap_answer": p["answer"], "swap_prediction": s}
        for (r, p, o), s in zip([(r, p, o) for r, p, o in zip(asked, partners, original) if p is not None],
                                swapped)
    ][:12]
    return section


def _stress(answerer: Answerer, root: Path | None, dataset: ObjectDataset, split: str, n_images: int,
            severities: Sequence[int], seed: int) -> dict[str, Any]:
    if dataset.source != "shapes-world" or root is None:
        return not_available("stress tests render shapes-world scenes; pass --data DIR with a shapes-world dataset")
    fn, why = optional_function("stress", "run_stress")
    if fn is None:
        return not_available(why)
    return fn(answerer, root, split=split, limit=n_images, severities=severities,
              caption_scorer=chair_lib.shapes_world_chair_i, seed=seed)


def _attention(model: VisionLanguageModel, tokenizer: Tokenizer, records: list[dict], image_root: Path,
               correct: list[bool]) -> dict[str, Any]:
    fn, why = optional_function("attention", "attention_diagnostics")
    if fn is None:
        return not_available(why)
    size = model.config.vision.image_size
    if model.image_token_count(size, size) != model.connector_token_count(size, size):
        return not_available(f"fusion {model.config.fusion!r} keeps the image tokens out of the LM's sequence "
                             "(each image is one marker token), so there is no self-attention on them to measure")
    return fn(model, tokenizer, records, image_root, correct, max_new_tokens=16)


def _modality_gap(run_dir: Path, root: Path | None, limit: int) -> dict[str, Any]:
    clip_run = find_clip_run(run_dir)
    if clip_run is None:
        return not_available("the tower did not come from a clip-stage run (run.yaml vision_from / init_from, "
                             "or a sibling 'clip' run): there is no text tower to measure the gap against")
    if root is None or not (root / "captions_val.jsonl").is_file():
        return not_available("the modality gap needs a shapes-world data directory with captions_val.jsonl")
    fn, why = optional_function("attention", "modality_gap")
    if fn is None:
        return not_available(why)
    return {"clip_run": str(clip_run), **fn(resolve_model_dir(clip_run), root, split="val", limit=limit)}


def summary_markdown(report: dict[str, Any]) -> str:
    """The headline numbers of a report as a markdown table (metric | value)."""
    from vlmkit.eval.report_html import summary_rows

    return "\n".join(["| metric | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in summary_rows(report)])
