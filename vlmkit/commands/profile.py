"""`vlmkit profile MODEL_DIR --image IMG --prompt "..."`: where a request's time goes, and what images cost.

Prints a markdown table (ms, median and min over `--repeats` requests after a warm-up, per `--batch`
size) of image preprocessing, vision encoder, connector, prefill, time to first token, decode time per
token and the total, then each image size's tokens and KV-cache bytes; `--json OUT` keeps it all.
MODEL_DIR is a vlmkit model or run directory, or a Hugging Face language model (no `--image` then).
See vlmkit/eval/profile.py for what each stage covers.
"""

from __future__ import annotations

import argparse

from vlmkit.commands.inference_options import add_inference_options


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a vlmkit model or run directory, or an HF language model directory")
    p.add_argument("--image", help="an image file (left out: a text-only request)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--repeats", type=int, default=5, help="requests per batch size after one warm-up (default 5)")
    p.add_argument("--batch", type=_ints, default=[1, 8], metavar="N,N,...", help="batch sizes (default 1,8)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per row (no end-of-turn stop)")
    p.add_argument("--image-sizes", type=_ints, metavar="PX,PX,...",
                   help="image sizes for the token / KV-cache table (default: 0.5, 1, 2, 4 x the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    add_inference_options(p)


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from vlmkit.cli import UserError
    from vlmkit.device import resolve_device
    from vlmkit.eval.profile import image_costs, kv_bytes_per_token, markdown, profile_latency
    from vlmkit.hf.pretrained import load_for_inference
    from vlmkit.io import write_json_atomic
    from vlmkit.models.vlm import VisionLanguageModel

    device = resolve_device(args.device)
    model, tokenizer, _ = load_for_inference(args.model_dir, device, args.quantize)
    if args.image and not isinstance(model, VisionLanguageModel):
        raise UserError(f"{args.model_dir} is a language model without a vision tower: profile it without --image")
    from vlmkit.data.processor import VLMProcessor

    processor = VLMProcessor.for_model(model, tokenizer)
    latency = profile_latency(model, processor, args.prompt, args.image, args.batch, args.repeats,
                              args.max_new_tokens, args.precision, args.speculative,
                              on_run=lambda b, r: print(f"batch {b}: request {r + 1}/{args.repeats + 1}",
                                                        file=sys.stderr, flush=True))
    kv_dtype = torch.bfloat16 if args.precision == "bf16" else next(model.parameters()).dtype
    text_tokens = len(processor.prompt(args.prompt, image_sizes=[]).input_ids)  # the prompt without its image
    report = {
        "model_dir": str(args.model_dir), "image": args.image, "prompt": args.prompt, "device": str(device),
        "precision": args.precision, "quantize": args.quantize,
        "speculative": None if args.speculative is None else args.speculative.name,
        "max_new_tokens": args.max_new_tokens, "latency": latency,
        "kv_dtype": str(kv_dtype).removeprefix("torch."), "kv_bytes_per_token": kv_bytes_per_token(model, kv_dtype),
        "text_tokens": text_tokens,
        "image_costs": image_costs(model, kv_dtype, args.image_sizes, text_tokens, args.max_new_tokens),
    }
    if args.speculative is not None:
        report["speculative_stats"] = args.speculative.stats.as_dict()
    print(markdown(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0
