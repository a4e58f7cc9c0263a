"""`vlmkit tokens`: plan a token budget before building anything (arithmetic in vlmkit/budget.py).

    vlmkit tokens --image-size 336 672 --patch-size 14           # 576 and 2,304 tokens; 16x the attention
    vlmkit tokens --image-size 336 --patch-size 14 --anyres 336x672,672x336,672x672 --original-size 800x600
    vlmkit tokens --image-size 384 --patch-size 16 --connector pixel_shuffle --downsample 2 --frames 8 --lm DIR
    vlmkit tokens --model runs/instruct --original-size 256x256   # a trained model's own settings

Per image: the connector's tokens (AnyRes: N tiles of P_t tokens plus a P_0 thumbnail, then unpadded with a
newline per row); per sample: `--frames` images plus `--text-tokens`; with an LM (`--lm`, or `--model`):
the KV cache those tokens fill, and how many frames fit its context (f_max = B / P, B = `--budget` or the
LM's max_position_embeddings less the text). Attention cost is relative to the first row (tokens^2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    """'336' or '336x672' (height x width) -> (h, w)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}")
    return (parts[0], parts[-1])


def _pinpoints(text: str) -> list[tuple[int, int]]:
    return [_size(item) for item in text.split(",") if item.strip()]


MODEL_ONLY = ("patch_size", "connector", "downsample", "queries", "keep_cls", "fusion", "anyres", "base")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="a vlmkit model or run directory: its tower, connector, AnyRes and "
                                                  "LM settings (the options marked * then come from it)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                   help="the square size the tower sees; several: one row each (default: the model's)")
    p.add_argument("--patch-size", type=int, help="* the tower's patch size")
    p.add_argument("--connector", default=None, help="* linear, mlp2x_gelu (default), pixel_shuffle, c_abstractor, "
                                                     "perceiver, qformer")
    p.add_argument("--downsample", type=int, help="* pixel_shuffle: r x r patches per token (default 2)")
    p.add_argument("--queries", type=int, help="* perceiver / qformer / c_abstractor: K tokens (default 64)")
    p.add_argument("--keep-cls", action="store_true", default=None, help="* the tower's CLS token is passed on")
    p.add_argument("--fusion", choices=("splice", "cross_attention"), default=None,
                   help="* splice (default): every image token is in the sequence; cross_attention: one per image")
    p.add_argument("--anyres", type=_pinpoints, metavar="HxW,HxW,...", help="* AnyRes grid pinpoints (px)")
    p.add_argument("--base", type=int, help="* AnyRes tile side (default: the first --image-size)")
    p.add_argument("--original-size", type=_size, nargs="+", default=[], metavar="HxW",
                   help="AnyRes: original image sizes to count exactly (default: each pinpoint's size)")
    p.add_argument("--frames", type=int, default=1, help="images (or video frames) per sample (default 1)")
    p.add_argument("--text-tokens", type=int, default=0, help="text tokens per sample (default 0)")
    p.add_argument("--budget", type=int, help="tokens available for images per sample, for f_max = B / P "
                                              "(default: the LM's context less the text)")
    p.add_argument("--lm", metavar="DIR|FILE", help="the LM: a vlmkit or Hugging Face model directory, or a "
                                                     "JSON/YAML file of vlmkit.config.LanguageConfig fields")
    p.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached value (bf16/fp16: 2, fp32: 4, int8: 1)")


def _read_mapping(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of LanguageConfig fields")
    return data


def load_lm_config(path: str):
    """A LanguageConfig from a vlmkit model / run directory, an HF LM directory, or a JSON/YAML file."""
    from vlmkit.config import LanguageConfig, from_dict
    from vlmkit.hf.hub import lm_config_from_hf
    from vlmkit.models.checkpoint import resolve_model_dir

    target = Path(path)
    if target.is_dir():
        config = resolve_model_dir(target) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} not found: --lm takes a model directory or a config file")
        data = json.loads(config.read_text())
        if data.get("format") == "vlmkit":
            return from_dict(LanguageConfig, data["model"]["lm"], f"{config}: model.lm")
        return lm_config_from_hf(data, str(config))
    if not target.is_file():
        raise FileNotFoundError(f"--lm {path}: no such directory or file")
    data = _read_mapping(target)
    if "model_type" in data:
        return lm_config_from_hf(data, str(target))
    return from_dict(LanguageConfig, data, str(target))


def _spec_and_lm(args: argparse.Namespace):
    from vlmkit.budget import TokenSpec
    from vlmkit.config import ModelConfig, from_dict
    from vlmkit.models.checkpoint import read_model_meta, resolve_model_dir

    lm = load_lm_config(args.lm) if args.lm else None
    if args.model:
        given = [f"--{name.replace('_', '-')}" for name in MODEL_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: these come from --model {args.model}; leave them out")
        directory = resolve_model_dir(args.model)
        meta = read_model_meta(directory)
        if meta.get("format") != "vlmkit":
            raise ValueError(f"--model {args.model}: not a vlmkit model directory")
        cfg = from_dict(ModelConfig, meta["model"], f"{directory / 'config.json'}: model")
        sizes = args.image_size or [cfg.vision.image_size]
        return TokenSpec.from_model_config(cfg), sizes, lm or cfg.lm
    if args.patch_size is None or not args.image_size:
        raise ValueError("give --image-size and --patch-size (or --model DIR)")
    anyres = args.anyres is not None
    spec = TokenSpec(patch_size=args.patch_size, connector=args.connector or "mlp2x_gelu",
                     downsample=args.downsample or 2, queries=args.queries or 64,
                     prefix_tokens=1 if args.keep_cls else 0, fusion=args.fusion or "splice",
                     grid_pinpoints=tuple(args.anyres) if anyres else None,
                     base=(args.base or args.image_size[0]) if anyres else None)
    return spec, args.image_size, lm


def _table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def run(args: argparse.Namespace) -> int:
    from vlmkit.budget import attention_cost, format_bytes, kv_cache_bytes, max_frames

    if args.frames < 1 or args.text_tokens < 0 or args.kv_bytes < 1:
        raise ValueError("--frames and --kv-bytes must be >= 1, --text-tokens >= 0")
    spec, sizes, lm = _spec_and_lm(args)
    what = f"patch {spec.patch_size}, connector {spec.connector}"
    what += {"pixel_shuffle": f" (downsample {spec.downsample})", "perceiver": f" ({spec.queries} queries)",
             "qformer": f" ({spec.queries} queries)",
             "c_abstractor": f" ({spec.queries} tokens)"}.get(spec.connector, "")
    what += ", CLS kept" if spec.prefix_tokens else ""
    what += ", cross-attention fusion (1 placeholder per image)" if spec.fusion == "cross_attention" else ""
    print(f"visual tokens: {what}")

    if spec.anyres:
        th, tw = spec.tile_tokens
        print(f"\nAnyRes: {spec.base} px tiles of P_t = {th * tw} tokens ({th}x{tw}), a P_0 = {th * tw} token "
              "thumbnail, and a newline ending each row of the tiles' token grid; unpadding removes the rows or "
              "columns that show only padding")
        bounds = [(p, spec.anyres_bound(p)) for p in spec.grid_pinpoints]
        print(_table(["grid pinpoint", "tiles N", "N x P_t + P_0", "+ newlines: most tokens"],
                     [[f"{p[0]}x{p[1]}", b["tiles"], f"{b['tiles']} x {b['tile_tokens']} + {b['thumbnail_tokens']} = "
                       f"{b['tiles_and_thumbnail']}", b["max_tokens"]] for p, b in bounds]))
        images = args.original_size or [tuple(p) for p in spec.grid_pinpoints]
        label = "original image"
    else:
        images = [(s, s) for s in sizes]
        label = "image"

    rows, first = [], None
    for h, w in images:
        per_image = spec.image_tokens(h, w)
        sequence = args.frames * spec.placeholders(h, w) + args.text_tokens
        first = first or sequence
        row = [f"{h}x{w}"]
        if spec.anyres:
            p = spec.chosen_pinpoint(h, w)
            row.append(f"{p[0] // spec.base}x{p[1] // spec.base} tiles")
        else:
            row.append("x".join(str(v // spec.patch_size) for v in (h, w)))
        relative = attention_cost(sequence) / attention_cost(first)
        row += [per_image, args.frames * per_image, sequence, f"{relative:.1f}x"]
        if lm is not None:
            row.append(format_bytes(kv_cache_bytes(sequence, lm.num_layers, lm.num_kv_heads, lm.head_dim,
                                                   args.kv_bytes)))
        rows.append(row)
    header = [label, "tiles" if spec.anyres else "patch grid", "tokens / image",
              f"tokens / sample ({args.frames} image{'s' if args.frames > 1 else ''})",
              f"sequence (+{args.text_tokens} text)", "attention cost"]
    if lm is not None:
        header.append(f"KV cache ({lm.num_layers} layers x {lm.num_kv_heads} kv heads x {lm.head_dim}, "
                      f"{args.kv_bytes} B)")
    print()
    print(_table(header, rows))

    budget = args.budget
    if budget is None and lm is not None:
        budget = lm.max_position_embeddings - args.text_tokens
    if budget is not None:
        h, w = images[0]
        per_frame = spec.placeholders(h, w)
        print(f"\nframes that fit: f_max = B / P = {budget} / {per_frame} = {max_frames(budget, per_frame)} "
              f"({h}x{w} images{'' if args.budget else ', B: the LM context less the text'})")
    return 0
