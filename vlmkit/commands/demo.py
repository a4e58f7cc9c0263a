"""`vlmkit demo`: the built-in offline demo."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.config import ModelConfig
    from vlmkit.data.chat import ChatFormat
    from vlmkit.data.tokenizer import train_tokenizer
    from vlmkit.models.vlm import VisionLanguageModel

    # Foundation smoke run: tokenizer -> model -> checkpoint round trip -> cached generation.
    texts = ["a red star above a small blue circle", "what color is the square?", "how many objects?"] * 50
    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = VisionLanguageModel(ModelConfig.from_dict({"image_token_id": tokenizer.image_id,
                                                       "lm": {"vocab_size": tokenizer.vocab_size}}))
    out = Path(args.out) / "untrained"
    model.save_pretrained(out, tokenizer)
    model = VisionLanguageModel.from_pretrained(out).eval()
    chat = ChatFormat(tokenizer, model.tokens_per_image)
    prompt = chat.prompt("What color is the star?")
    pixels = torch.rand(1, 3, model.config.vision.image_size, model.config.vision.image_size)
    new = model.generate(torch.tensor([prompt.input_ids]), pixel_values=pixels, max_new_tokens=8,
                         eos_token_id=tokenizer.eos_id)[0]
    print(f"wrote {out}; an untrained model answers: {tokenizer.decode(new)!r}")
    return 0
