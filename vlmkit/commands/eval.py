"""`vlmkit eval RUN_DIR [--split test]`: batched generation on a split, metrics to RUN_DIR/eval.json.

`vlmkit eval RUN_DIR --suite reliability`: POPE, CHAIR, blind/swap probes, stress, attention and the
modality gap, to RUN_DIR/report.json and RUN_DIR/report.html (see vlmkit.eval.reliability).
"""

from __future__ import annotations

import argparse

from vlmkit.commands.inference_options import add_inference_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run directory (or a model directory with --data)")
    p.add_argument("--suite", choices=("standard", "reliability"), default="standard",
                   help="standard: VQA/POPE/grounding to eval.json; reliability: report.json + report.html")
    p.add_argument("--split", default="test",
                   help="which {split}_qa.jsonl to answer (default: test); the held-out splits and the two-image "
                        "questions of multi_{split}_qa.jsonl are scored beside it when present")
    p.add_argument("--data", help="data directory (default: the one the run was trained on)")
    p.add_argument("--limit", type=int, help="standard: only the first N questions; reliability: N images or "
                                             "questions per probe instead of the defaults")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="standard: where to write eval.json (default: RUN_DIR/eval.json); "
                                 "reliability: the directory for report.json/report.html (default: RUN_DIR)")
    p.add_argument("--instances", help="reliability: a COCO-style instances JSON for POPE and CHAIR")
    p.add_argument("--images", help="reliability: the image directory the --instances file names are relative to")
    p.add_argument("--chair-lexicon", help="reliability: JSON {object: [synonyms, plurals]} for CHAIR "
                                           "(default: built in for shapes-world, category names for --instances)")
    p.add_argument("--stress-severities", type=_severities, default=(0, 1, 2, 3, 4, 5), metavar="S,S,...",
                   help="reliability: corruption/shift severities to measure, e.g. 0,3,5 (default: 0,1,2,3,4,5)")
    p.add_argument("--seed", type=int, default=0, help="reliability: seed of every sampled probe")
    p.add_argument("--token-merging", type=int, metavar="R",
                   help="standard: merge R vision tokens per tower block (ToMe) whatever the model was trained with; "
                        "0 switches it off (needs a connector that takes any number of tokens)")
    add_inference_options(p)  # standard suite


def _severities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers 0..5, got {text!r}") from None
    if not values or any(not 0 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"severities must be in 0..5, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from vlmkit.device import resolve_device

    device = str(resolve_device(args.device))
    if args.suite == "reliability" and args.token_merging is not None:
        raise ValueError("--token-merging applies to the standard suite only")
    if args.suite == "reliability":
        if args.quantize or args.speculative or args.precision != "bf16":
            raise ValueError("--quantize, --speculative and --precision apply to the standard suite (eval.json) only")
        from vlmkit.eval.reliability import run_reliability, summary_markdown

        report = run_reliability(args.run_dir, data_root=args.data, split=args.split, limit=args.limit,
                                 instances=args.instances, images=args.images, chair_lexicon=args.chair_lexicon,
                                 stress_severities=args.stress_severities, device=device,
                                 batch_size=args.batch_size, seed=args.seed, out_dir=args.out)
        print(summary_markdown(report))
        return 0
    for flag in ("instances", "images", "chair_lexicon"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} only applies with --suite reliability")
    if args.token_merging is not None and args.token_merging < 0:
        raise ValueError(f"--token-merging must be >= 0, got {args.token_merging}")
    from vlmkit.eval.run_eval import evaluate, print_report

    results = evaluate(args.run_dir, args.split, args.data, args.limit, args.batch_size, device, args.out,
                       token_merging=args.token_merging, quantize=args.quantize, speculative=args.speculative,
                       precision=args.precision)
    print_report(results)
    return 0
