"""`vlmkit demo [--out DIR]`: synth -> tokenizer -> clip -> align -> instruct -> eval, offline, on CPU.

The recipe is `configs/demo.yaml`. Leaves DIR/data, DIR/clip, DIR/align, DIR/instruct (the final
model) and DIR/eval.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import vlmkit

DEFAULT_RECIPE = Path(vlmkit.__file__).resolve().parent.parent / "configs" / "demo.yaml"
STAGES = ("clip", "align", "instruct")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="the recipe (default: configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every stage, e.g. --set optim.batch_size=16")
    p.add_argument("--skip-synth", action="store_true", help="reuse DIR/data from an earlier run")


def tokenizer_texts(data_dir: Path):
    """Every text the model will read or write: conversations and captions of the training split."""
    for turn_record in json.loads((data_dir / "train.json").read_text()):
        for turn in turn_record["conversations"]:
            yield turn["value"].replace("<image>", "")
    for line in (data_dir / "captions_train.jsonl").read_text().splitlines():
        yield json.loads(line)["caption"]


def run(args: argparse.Namespace) -> int:
    from vlmkit.data.synthetic import write_dataset
    from vlmkit.data.tokenizer import train_tokenizer
    from vlmkit.eval.run_eval import evaluate, print_report
    from vlmkit.train.config import read_yaml
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    started = time.perf_counter()
    recipe = read_yaml(args.config)
    out = Path(args.out)
    data_dir, tok_dir = out / "data", out / "data" / "tokenizer"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if not args.skip_synth:
        summary = write_dataset(data_dir, **recipe.get("synth", {}))
        scenes = ", ".join(f"{split} {c['scenes']}" for split, c in summary["counts"].items())
        print(f"[demo] shapes-world scenes: {scenes} -> {data_dir} ({summary['seconds']:.0f}s)")
        tokenizer = train_tokenizer(tokenizer_texts(data_dir), **recipe.get("tokenizer_training", {}))
        tokenizer.save(tok_dir)
    timings["synth"] = time.perf_counter() - t

    previous: dict[str, Path] = {}
    for stage in STAGES:
        t = time.perf_counter()
        paths = {"out": str(out / stage), "tokenizer": str(tok_dir), "data.root": str(data_dir)}
        if stage == "align":
            paths["vision_from"] = str(previous["clip"])
        if stage == "instruct":
            paths["init_from"] = str(previous["align"])
        overrides = [f"{k}={v}" for k, v in paths.items()] + list(args.overrides)
        cfg = stage_config(recipe, stage, overrides, args.config)
        print(f"[demo] stage {stage}: {cfg.optim.steps} steps x {cfg.optim.batch_size * cfg.optim.grad_accum} samples")
        results = Trainer(cfg).fit()
        print(f"[demo] {stage} done in {time.perf_counter() - t:.0f}s: "
              + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
        previous[stage] = out / stage
        timings[stage] = time.perf_counter() - t

    t = time.perf_counter()
    eval_cfg = recipe.get("eval", {})
    results = evaluate(out / "instruct", split=eval_cfg.get("split", "test"), data_root=data_dir,
                       limit=eval_cfg.get("limit"), out=out / "eval.json")
    timings["eval"] = time.perf_counter() - t
    print_report(results)
    print("\nExamples (question | model | truth):")
    for ex in results["examples"][: recipe.get("examples", 12)]:
        mark = "ok " if ex["prediction"].strip().lower() == str(ex["answer"]).lower() else "   "
        print(f"  {mark}{ex['question']!r:60} | {ex['prediction']!r:28} | {ex['answer']!r}")
    total = time.perf_counter() - started
    print("\n[demo] wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    print(f"[demo] final model: {out / 'instruct'}; metrics: {out / 'eval.json'}")
    return 0
