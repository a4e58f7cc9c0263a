"""Evaluate a trained VLM on a shapes-world style split: VQA, POPE, grounding, compositional, and the
two-image questions of ``multi_{split}_qa.jsonl`` and the clip questions of ``video_{split}_qa.jsonl``
when the data has them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

from vlmkit.eval.generation import Answerer
from vlmkit.eval.metrics import markdown_table, score
from vlmkit.hf.pretrained import load_for_inference
from vlmkit.io import read_jsonl, write_json_atomic
from vlmkit.models.speculative import Drafter
from vlmkit.models.vlm import VisionLanguageModel

# Held-out splits scored beside the asked one when the data has them: unseen colour-shape pairs, and
# training's pairs drawn differently (see vlmkit.data.shapes_world).
EXTRA_SPLITS = ("compositional", "variants")
log = logging.getLogger("vlmkit.eval")


def extra_splits(split: str) -> tuple[str, ...]:
    """The splits scored beside `split` when their question files exist: `EXTRA_SPLITS`, then
    ``multi_{split}``: questions about two images (`vlmkit synth --multi-image N`), and ``video_{split}``:
    questions about clips (`vlmkit synth --video N`; the model's `model.video` budget picks the frames)."""
    return (*EXTRA_SPLITS, f"multi_{split}", f"video_{split}")


def data_root_of(run_dir: Path) -> Path:
    """The data directory a run was trained on (from its run.yaml)."""
    run_yaml = run_dir / "run.yaml"
    if not run_yaml.is_file():
        raise FileNotFoundError(f"{run_yaml} not found: pass --data DIR (the directory holding {{split}}_qa.jsonl)")
    return Path(yaml.safe_load(run_yaml.read_text())["data"]["root"])


def evaluate(run_dir: str | Path, split: str = "test", data_root: str | Path | None = None,
             limit: int | None = None, batch_size: int = 64, device: str = "cpu",
             out: str | Path | None = None, token_merging: int | None = None, quantize: str | None = None,
             speculative: Drafter | None = None, precision: str = "bf16") -> dict:
    """Answer every question of `{split}_qa.jsonl` (and of the splits of `extra_splits` whose files are
    present, each its own entry of the result), score, write `eval.json` (to `out`, default the run
    directory) and return the results. Question records may name one image or a list of images.
    `token_merging`: merge that many vision tokens per block (ToMe; 0: off), whatever the model was trained
    with (recorded in the results as `token_merging_r`). `quantize` ("int8"), `speculative` (a drafter) and
    `precision` ("bf16" autocast or "fp32") change how answers are generated, not what is scored."""
    run_dir = Path(run_dir)
    root = Path(data_root) if data_root else data_root_of(run_dir)
    model, tokenizer, model_dir = load_for_inference(run_dir, device, quantize)
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"{model_dir} is a language model without a vision tower: eval needs a VLM")
    if token_merging is not None:
        model.set_token_merging(token_merging)
    answerer = Answerer(model, tokenizer, batch_size=batch_size, precision=precision, speculative=speculative)
    results: dict = {}
    samples: dict[str, list] = {}
    extra = extra_splits(split)
    for name in (split, *extra):
        path = root / f"{name}_qa.jsonl"
        if name != split and not path.is_file():
            continue
        if name == f"video_{split}" and answerer.processor.video is None:
            log.warning("%s not scored: this model takes no clips (model.image.anyres)", name)
            continue
        records = read_jsonl(path)[:limit]
        with torch.inference_mode():
            predictions = answerer.answer_records(records, root)
        results[name] = score(records, predictions)
        samples[name] = [{**r, "prediction": p} for r, p in zip(records, predictions)]
    final = {**results.pop(split), "split": split}
    if model.config.vision.merges_tokens:
        final["token_merging_r"] = model.config.vision.token_merging.r
    final.update({name: results[name] for name in extra if name in results})
    final["examples"] = samples[split][:20]
    write_json_atomic(Path(out) if out else run_dir / "eval.json", final)
    return final


def print_report(results: dict) -> None:
    """The markdown table of `evaluate`'s results: the asked split, then each further split scored."""
    split = results.get("split", "test")
    extra = {name: results[name] for name in extra_splits(split) if name in results}
    print(markdown_table(results, extra, name=split))
