"""Options shared by the commands that generate (chat, eval, profile): precision, `--quantize`, `--speculative`."""

from __future__ import annotations

import argparse


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """--precision, --quantize and --speculative, shared by chat, eval and profile."""
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (default) or fp32; tiny models decode faster in fp32 on CPU")
    p.add_argument("--quantize", choices=("int8",),
                   help="int8: weight-only int8 linear layers of the LM, quantized after loading")
    p.add_argument("--speculative", metavar="SPEC", type=_drafter,
                   help="greedy decoding with drafts checked by the model, same answers: ngram (prompt lookup), "
                        "ngram:tokens=8,max_ngram=2, early-exit:layers=N (the model's first N layers draft)")


def _drafter(spec: str):
    from vlmkit.models.speculative import parse_speculative

    try:
        return parse_speculative(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
