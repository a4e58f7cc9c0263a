"""`vlmkit eval RUN_DIR [--split test]`: batched generation on a split, metrics to RUN_DIR/eval.json."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (or a model directory with --data)")
    p.add_argument("--split", default="test", help="which {split}_qa.jsonl to answer (default: test)")
    p.add_argument("--data", help="data directory (default: the one the run was trained on)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="where to write eval.json (default: RUN_DIR/eval.json)")


def run(args: argparse.Namespace) -> int:
    from vlmkit.device import resolve_device
    from vlmkit.eval.run_eval import evaluate, print_report

    results = evaluate(args.run_dir, args.split, args.data, args.limit, args.batch_size,
                       str(resolve_device(args.device)), args.out)
    print_report(results)
    return 0
