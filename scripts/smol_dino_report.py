"""What a VLM trained from pretrained parts (vlmkit/recipes/smol-dino.yaml) learned, and what its LM kept.

Prints, and writes as JSON:
  * captions generated for held-out pictures (emoji and Tux Paint stamps) next to the truth;
  * yes/no accuracy on the held-out real-picture questions;
  * shapes-world VQA accuracy (the same scoring as `vlmkit eval`);
  * answers to text-only questions from the original LM and from the trained VLM's LM.

    python scripts/smol_dino_report.py runs/smol-dino/instruct --lm models/smollm2 \
        --real data/real --shapes data/shapes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmkit.eval.generation import Answerer
from vlmkit.eval.metrics import parse_yes_no, score
from vlmkit.eval.run_eval import read_jsonl
from vlmkit.hf.pretrained import load_language_model, load_tokenizer
from vlmkit.io import write_json_atomic
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

TEXT_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 7 plus 5?",
    "Name a primary colour.",
    "Write one sentence about the sea.",
)


def held_out_captions(real: Path, n: int) -> list[dict]:
    """The first n/2 emoji and n/2 stamps of the held-out caption pairs (the file is in a fixed order)."""
    pairs = read_jsonl(real / "captions_test.jsonl")
    emoji = [p for p in pairs if p.get("source") == "emoji"]
    stamps = [p for p in pairs if p.get("source") == "stamps"]
    return emoji[: n - n // 2] + stamps[: n // 2]


def yes_no_records(real: Path) -> list[dict]:
    records = []
    for rec in json.loads((real / "instruct_test.json").read_text()):
        question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        if answer in ("yes", "no"):
            question = question.replace("<image>", "").strip()
            records.append({"image": rec["image"], "question": question, "answer": answer})
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the instruct run (or its model directory)")
    p.add_argument("--lm", required=True, help="the original language model directory (for the before answers)")
    p.add_argument("--real", required=True, help="data written by scripts/prepare_real_data.py")
    p.add_argument("--shapes", required=True, help="a shapes-world dataset (vlmkit synth)")
    p.add_argument("--captions", type=int, default=10)
    p.add_argument("--vqa-limit", type=int, default=300)
    p.add_argument("--out", help="JSON output (default RUN_DIR/smol_dino_report.json)")
    args = p.parse_args()

    model_dir = resolve_model_dir(args.run_dir)
    vlm = VisionLanguageModel.from_pretrained(model_dir)
    answerer = Answerer(vlm, load_tokenizer(model_dir), batch_size=16, max_new_tokens=32)
    real, shapes = Path(args.real), Path(args.shapes)
    report: dict = {}
    with torch.inference_mode():
        pairs = held_out_captions(real, args.captions)
        generated = answerer.answer_records([{"image": c["image"], "question": "Describe the image."} for c in pairs],
                                            real)
        report["captions"] = [{"image": c["image"], "truth": c["caption"], "generated": g}
                              for c, g in zip(pairs, generated)]

        yes_no = yes_no_records(real)
        predictions = answerer.answer_records(yes_no, real)
        parsed = [parse_yes_no(pred) for pred in predictions]
        n = max(len(yes_no), 1)
        report["real_yes_no"] = {"n": len(yes_no),
                                 "accuracy": sum(p == r["answer"] for p, r in zip(parsed, yes_no)) / n,
                                 "yes_ratio": sum(p == "yes" for p in parsed) / n}

        vqa = read_jsonl(shapes / "test_qa.jsonl")[: args.vqa_limit]
        scored = score(vqa, answerer.answer_records(vqa, shapes))
        report["shapes_vqa"] = {k: scored[k] for k in ("vqa_accuracy", "vqa_accuracy_by_type", "n_samples")}

        after = answerer.answer(list(TEXT_QUESTIONS), [None] * len(TEXT_QUESTIONS))
        base = Answerer(load_language_model(args.lm), load_tokenizer(args.lm), batch_size=8, max_new_tokens=32)
        before = base.answer(list(TEXT_QUESTIONS), [None] * len(TEXT_QUESTIONS))
        report["text_only"] = [{"question": q, "before": b, "after": a}
                               for q, b, a in zip(TEXT_QUESTIONS, before, after)]

    write_json_atomic(Path(args.out) if args.out else Path(args.run_dir) / "smol_dino_report.json", report)
    print("Held-out captions (generated | truth):")
    for c in report["captions"]:
        print(f"  {c['generated']!r:50} | {c['truth']!r}")
    yn = report["real_yes_no"]
    print(f"\nReal-picture yes/no: accuracy {yn['accuracy']:.3f} over {yn['n']} (yes-ratio {yn['yes_ratio']:.2f})")
    sv = report["shapes_vqa"]
    by_type = ", ".join(f"{k} {v:.2f}" for k, v in sv["vqa_accuracy_by_type"].items() if v is not None)
    print(f"Shapes-world VQA: {sv['vqa_accuracy']:.3f} over {sv['n_samples']} ({by_type})")
    print("\nText-only (before | after):")
    for t in report["text_only"]:
        print(f"  {t['question']}\n    before: {t['before']!r}\n    after:  {t['after']!r}")


if __name__ == "__main__":
    main()
