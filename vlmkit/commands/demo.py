"""`vlmkit demo [--out DIR] [--recipe NAME|FILE]`: synth -> tokenizer -> the recipe's stages in order -> eval.

Offline, on CPU. The recipe is the built-in `demo` (vlmkit/recipes/demo.yaml) unless another is named.
Leaves DIR/data, one run directory per stage (DIR/<stage>; the last one holds the final model) and
DIR/eval.json. A stage starts from an earlier one when a key it declares in `starts_from` (e.g.
`vision_from: dense`) names that stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--recipe", "--config", dest="recipe", default="demo",
                   help="a built-in recipe's name or a recipe YAML (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every stage, e.g. --set optim.batch_size=16")
    p.add_argument("--skip-synth", action="store_true", help="reuse DIR/data from an earlier run")


def tokenizer_texts(data_dir: Path):
    """Every text the model will read or write: conversations and captions of the training split (and
    of the two-image training records, when the data has them)."""
    for name in ("train.json", "multi_train.json"):
        if name != "train.json" and not (data_dir / name).is_file():
            continue
        for turn_record in json.loads((data_dir / name).read_text()):
            for turn in turn_record["conversations"]:
                yield turn["value"].replace("<image>", "")
    for line in (data_dir / "captions_train.jsonl").read_text().splitlines():
        yield json.loads(line)["caption"]


def run(args: argparse.Namespace) -> int:
    from vlmkit.data.shapes_world import write_dataset
    from vlmkit.data.tokenizer import train_tokenizer
    from vlmkit.eval.run_eval import evaluate, print_report
    from vlmkit.train.recipe import read_recipe, recipe_stages, stage_config, stage_paths
    from vlmkit.train.trainer import Trainer

    started = time.perf_counter()
    recipe = read_recipe(args.recipe)
    out = Path(args.out)
    data_dir = out / "data"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if not args.skip_synth:
        summary = write_dataset(data_dir, **recipe.get("synth", {}))
        scenes = ", ".join(f"{split} {c['scenes']}" for split, c in summary["counts"].items())
        print(f"[demo] shapes-world scenes: {scenes} -> {data_dir} ({summary['seconds']:.0f}s)")
        tokenizer = train_tokenizer(tokenizer_texts(data_dir), **recipe.get("tokenizer_training", {}))
        tokenizer.save(data_dir / "tokenizer")
    timings["synth"] = time.perf_counter() - t

    stages = recipe_stages(recipe, args.recipe)
    for stage in stages:
        t = time.perf_counter()
        overrides = stage_paths(recipe, stage, out, data_dir) + list(args.overrides)
        cfg = stage_config(recipe, stage, overrides, args.recipe)
        print(f"[demo] stage {stage}: {cfg.optim.steps} steps x {cfg.optim.batch_size * cfg.optim.grad_accum} samples")
        results = Trainer(cfg).fit()
        print(f"[demo] {stage} done in {time.perf_counter() - t:.0f}s: "
              + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
        timings[stage] = time.perf_counter() - t

    t = time.perf_counter()
    eval_cfg = recipe.get("eval", {})
    final = out / stages[-1]
    results = evaluate(final, split=eval_cfg.get("split", "test"), data_root=data_dir,
                       limit=eval_cfg.get("limit"), out=out / "eval.json")
    timings["eval"] = time.perf_counter() - t
    print_report(results)
    print("\nExamples (question | model | truth):")
    for ex in results["examples"][: recipe.get("examples", 12)]:
        mark = "ok " if ex["prediction"].strip().lower() == str(ex["answer"]).lower() else "   "
        print(f"  {mark}{ex['question']!r:60} | {ex['prediction']!r:28} | {ex['answer']!r}")
    total = time.perf_counter() - started
    print("\n[demo] wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    print(f"[demo] final model: {final}; metrics: {out / 'eval.json'}")
    return 0
