"""`vlmkit train --config X.yaml [--set key=value ...]` or `vlmkit train --resume RUN_DIR`.

On several devices: `torchrun --nproc_per_node N -m vlmkit train ...` (see vlmkit/train/distributed.py)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config",
                   help="a run config or recipe YAML, or a built-in recipe's name (demo, smol-dino, flamingo)")
    p.add_argument("--stage", help="which stage of a multi-stage recipe (see --list-stages)")
    p.add_argument("--list-stages", action="store_true", help="print the registered stages and exit")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--strict", action="store_true", help="bad data records are errors instead of skipped")


def run(args: argparse.Namespace) -> int:
    from vlmkit.train.recipe import load_run_config
    from vlmkit.train.stages import stage_table
    from vlmkit.train.trainer import Trainer, resume

    if args.list_stages:
        print(stage_table())
        return 0
    overrides = args.overrides + (["data.strict=true"] if args.strict else [])
    if bool(args.config) == bool(args.resume):
        raise ValueError("give exactly one of --config X.yaml or --resume RUN_DIR")
    if args.resume:
        trainer = resume(args.resume, overrides)
    else:
        trainer = Trainer(load_run_config(args.config, overrides, args.stage))
    try:
        results = trainer.fit()
    finally:
        trainer.dist.close()
    if trainer.dist.is_main:  # under torchrun, the other processes stay quiet
        print(json.dumps(results, indent=2))
        print(f"model written to {trainer.run_dir / 'model'}")
    return 0
