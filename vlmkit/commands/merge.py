"""`vlmkit merge RUN OUT`: fold a run's LoRA adapters into its weights, giving a plain vlmkit model."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a training run (or model directory) trained with optim.lora")
    p.add_argument("out", help="the directory to write (replaced atomically if it exists)")


def run(args: argparse.Namespace) -> int:
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.models import lora
    from vlmkit.models.checkpoint import read_model_meta
    from vlmkit.models.clip import DualEncoder
    from vlmkit.models.dense import DenseTower
    from vlmkit.models.qformer_pretraining import QFormerPretrainer
    from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

    model_dir = resolve_model_dir(args.model_dir)
    if not lora.has_adapter_files(model_dir):
        raise ValueError(f"{model_dir} holds no LoRA adapters ({lora.ADAPTER_CONFIG}): it is a plain model already")
    classes = {cls.FORMAT: cls for cls in (VisionLanguageModel, DualEncoder, DenseTower, QFormerPretrainer)}
    fmt = read_model_meta(model_dir).get("format")
    if fmt not in classes:
        raise ValueError(f"{model_dir}: unknown model format {fmt!r} (known: {sorted(classes)})")
    model = classes[fmt].from_pretrained(model_dir)  # folds the adapters in
    tokenizer = Tokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    model.save_pretrained(args.out, tokenizer)
    summary = lora.adapter_summary(model_dir)
    print(f"merged the LoRA adapters (r={summary['r']}, alpha={summary['alpha']}, "
          f"{len(summary['layers'])} layers) of {model_dir} into {args.out}")
    return 0
