"""`vlmkit export [--format llava-hf|llava-next-hf] RUN_DIR OUT`: write a trained model in another library's format."""

from __future__ import annotations

import argparse

FORMATS = {
    "llava-hf": "transformers' LlavaForConditionalGeneration (config, safetensors, tokenizer, processor)",
    "llava-next-hf": "transformers' LlavaNextForConditionalGeneration, for AnyRes models (model.image.anyres)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a model directory or a training run directory")
    p.add_argument("out", help="the directory to write (replaced atomically if it exists)")
    p.add_argument("--format", choices=sorted(FORMATS),
                   help="; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + " (default: llava-next-hf for an AnyRes "
                        "model, else llava-hf)")


def run(args: argparse.Namespace) -> int:
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.hf.llava import FORMATS as CLASSES
    from vlmkit.hf.llava import export_llava_hf
    from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

    model_dir = resolve_model_dir(args.model_dir)
    model = VisionLanguageModel.from_pretrained(model_dir)
    fmt = args.format or ("llava-next-hf" if model.config.image.anyres is not None else "llava-hf")
    out = export_llava_hf(model, Tokenizer.load(model_dir), args.out, fmt)
    print(f"wrote {out} ({fmt}): load it with transformers.{CLASSES[fmt]}.from_pretrained")
    return 0
