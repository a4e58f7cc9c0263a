"""`vlmkit info MODEL_DIR`: what a checkpoint holds (architecture, sizes, tokens per image)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a vlmkit model directory (config.json + model.safetensors)")


def run(args: argparse.Namespace) -> int:
    from vlmkit.models.vlm import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.model_dir)
    cfg = model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"model directory   {args.model_dir}")
    print(f"vision tower      {cfg.vision.num_layers} layers x {cfg.vision.hidden_size}, "
          f"{cfg.vision.image_size}px / patch {cfg.vision.patch_size}, select_layer {cfg.vision.select_layer}: "
          f"{count(model.vision) / 1e6:.2f}M params")
    size = cfg.vision.image_size
    print(f"connector         {cfg.connector.name}: {count(model.connector) / 1e6:.2f}M params, "
          f"{model.connector_token_count(size, size)} tokens per image")
    anyres = cfg.image.anyres
    if anyres is not None:
        th, tw = model.tile_token_grid
        largest = max(anyres.grid_pinpoints, key=lambda p: p[0] * p[1])
        print(f"AnyRes tiling     {anyres.base}px tiles of {th * tw} tokens + a thumbnail, grids "
              f"{', '.join(f'{h // anyres.base}x{w // anyres.base}' for h, w in anyres.grid_pinpoints)}: "
              f"{model.image_token_count(*largest)} tokens for a {largest[0]}x{largest[1]} image "
              "(the count follows each image's size; `vlmkit tokens --model` for others)")
    print(f"fusion            {cfg.fusion}: {count(model.fusion) / 1e6:.2f}M params, "
          f"{model.tokens_per_image} placeholder token(s) per <image>"
          f"{f' of {size}x{size} px' if anyres is not None else ''}")
    print(f"language model    {cfg.lm.num_layers} layers x {cfg.lm.hidden_size}, vocab {cfg.lm.vocab_size}: "
          f"{count(model.lm) / 1e6:.2f}M params")
    return 0
