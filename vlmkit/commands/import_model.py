"""`vlmkit import NAME [--out DIR] [--force]`: convert a packaged pretrained model to a HF directory."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vlmkit.hf.importers import SOURCES, models_cache_dir

    p.add_argument("name", choices=sorted(SOURCES), help="; ".join(f"{k}: {v.description}" for k, v in SOURCES.items()))
    p.add_argument("--out", help=f"output directory (default: {models_cache_dir()}/NAME)")
    p.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install missing packages; fail with the command to run instead")


def run(args: argparse.Namespace) -> int:
    import sys

    from vlmkit.hf.importers import import_model
    from vlmkit.hf.importers.packages import MissingPackageError

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout carries only the directory)
    try:
        target, written = import_model(args.name, args.out, force=args.force, install=not args.no_install, log=log)
    except MissingPackageError as err:
        raise ValueError(str(err)) from None
    if not written:
        log(f"{target} already exists; use --force to convert again")
    print(target)
    return 0
