"""`vlmkit <command>`: each command is a module exposing `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlmkit import __version__

# command name -> (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vlmkit.commands.synth", "generate the shapes-world dataset"),
    "train": ("vlmkit.commands.train", "train a stage (clip, align, instruct) from a config"),
    "eval": ("vlmkit.commands.eval", "evaluate a trained model on a split"),
    "chat": ("vlmkit.commands.chat", "ask a trained model a question (optionally about an image)"),
    "info": ("vlmkit.commands.info", "describe a model checkpoint directory"),
    "tokens": ("vlmkit.commands.tokens", "plan a token budget: visual tokens, KV cache, attention cost, frames"),
    "profile": ("vlmkit.commands.profile", "time each stage of a request (preprocess, vision, prefill, decode)"),
    "import": ("vlmkit.commands.import_model", "convert a packaged pretrained model to a HF-format directory"),
    "export": ("vlmkit.commands.export", "write a trained model in transformers' Llava / LLaVA-NeXT format"),
    "merge": ("vlmkit.commands.merge", "fold a run's LoRA adapters into a plain vlmkit model"),
    "demo": ("vlmkit.commands.demo", "run the built-in offline demo end to end"),
    "serve": ("vlmkit.commands.serve", "serve a model over HTTP (OpenAI Chat Completions API, web page)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and stress-test VLMs.")
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


class UserError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (UserError, ValueError, FileNotFoundError, ImportError) as err:
        if os.environ.get("VLMKIT_DEBUG"):  # full traceback when chasing a bug
            raise
        print(f"vlmkit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlmkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
