"""Does input resolution matter? Fixed resize vs AnyRes tiling on shapes-world's high-resolution task.

The task (`vlmkit synth --hires`): 256 px scenes whose objects are the default 64 px scenes' objects (10
and 19 px), so resizing the image to the tower's 64 px leaves them 2-5 px wide. Every row trains the same
instruct stage (same data, steps, batch, learning rate, seed) with the same frozen tower and changes only
how an image reaches the tower. With `--demo RUN` (a `vlmkit demo` run: its conv-stem tower and its
instruct model, which answer questions about default 64 px scenes) every row starts from that model and is
fine-tuned on the task (AnyRes adds a newline embedding, started at random); the first row is the demo
model as it is, on images resized to 64 px. Without `--demo` every row starts from zero on a tower
trained once by the `dense` stage on default 64 px scenes (the LM then needs thousands of steps to
learn to look things up, see docs/recipe_ablation.md). The variants:

    resize_64     the image resized to 64 px (one 8 x 8 patch grid; 16 tokens after pixel_shuffle 2x2)
    anyres_2x2    AnyRes with grids up to 2 x 2 tiles of 64 px: the image at 128 px, plus a 64 px thumbnail
    anyres_4x4    AnyRes with grids up to 4 x 4 tiles: the image at full resolution, plus the thumbnail
    resize_256    (optional) the tower run at 256 px, its position embeddings interpolated

Each model is scored with `vlmkit eval`'s scorer on the test split (VQA accuracy by question type) and
timed (training wall time; the machine may be shared, so compare times within one run only).

    python bench/resolution.py --demo runs/demo [--scenes 1000] [--steps 150] [--batch-size 16]
                               [--variants resize_64,anyres_2x2,anyres_4x4] [--out runs/resolution]

Writes RUN/results.json and a markdown table between markers in the doc (the prose around it is kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml
from doc_tables import write_table_section

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "vlmkit" / "recipes" / "demo.yaml"
BEGIN, END = "<!-- table: bench/resolution.py -->", "<!-- end of table -->"
TYPES = ("color", "shape", "count", "exists", "spatial", "size", "identify")
TILE = 64  # the tower's input size, and the AnyRes tile side


def grids(largest: int) -> list[list[int]]:
    """LLaVA-NeXT-style pinpoints: every grid of up to `largest` x `largest` tiles but the single tile."""
    return [[r * TILE, c * TILE] for r in range(1, largest + 1) for c in range(1, largest + 1) if r * c > 1]


# name -> (what it is, model section overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "resize_64": ("the 256 px image resized to the tower's 64 px", {}),
    "anyres_2x2": ("AnyRes, grids up to 2x2 of 64 px tiles + a 64 px thumbnail",
                   {"image": {"anyres": {"grid_pinpoints": grids(2)}}}),
    "anyres_4x4": ("AnyRes, grids up to 4x4 of 64 px tiles + a 64 px thumbnail",
                   {"image": {"anyres": {"grid_pinpoints": grids(4)}}}),
    "resize_256": ("the tower run at 256 px (position embeddings interpolated)",
                   {"vision": {"image_size": 256, "native_image_size": 64}}),
}
DEFAULT_VARIANTS = ("resize_64", "anyres_2x2", "anyres_4x4")


def make_data(out: Path, scenes: int, max_objects: int, tokenizer: bool = True) -> tuple[Path, Path]:
    """The high-resolution task (+ a tokenizer), and a default (64 px) data directory for the dense stage."""
    from dataclasses import replace

    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.shapes_world import hires_spec, write_dataset
    from vlmkit.data.tokenizer import train_tokenizer

    data, tower_data = out / f"data-{scenes}-{max_objects}", out / "tower-data"
    if not (data / "meta.json").is_file():
        # One question per record; no held-out pairs (the comparison is about resolution, not composition).
        spec = replace(hires_spec(), max_objects=max_objects)
        write_dataset(data, seed=0, n=scenes, spec=spec, records="questions", holdout_pairs=())
    if tokenizer and not (data / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(tokenizer_texts(data), vocab_size=1024, split_digits=False).save(data / "tokenizer")
    if not (tower_data / "meta.json").is_file():
        write_dataset(tower_data, seed=0, n=20)  # its spec (meta.json) is what the dense stage draws from
    return data, tower_data


def base_recipe(steps: int, batch_size: int, dense_steps: int, downsample: int) -> dict:
    """The demo recipe (tower, LM, learning rates), with the bench's step counts and connector."""
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["log_every"], recipe["save_every"] = 25, 10**9
    recipe["model"]["lm"]["max_position_embeddings"] = 1024
    recipe["model"]["connector"] = {"name": "pixel_shuffle", "downsample": downsample}
    dense = recipe["stages"]["dense"]
    dense["data"]["fresh_scenes"] = max(dense_steps * 64, 1)
    dense["optim"].update(steps=dense_steps, batch_size=64, warmup_steps=min(30, dense_steps))
    instruct = recipe["stages"]["instruct"]
    instruct["data"].update(max_length=400)
    instruct["optim"].update(steps=steps, batch_size=batch_size, warmup_steps=min(50, steps // 5 + 1))
    return recipe


def train_tower(recipe: dict, tower_data: Path, out: Path) -> Path:
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    run = out / f"tower-{recipe['stages']['dense']['optim']['steps']}"
    if not (run / "model").is_dir():
        Trainer(stage_config(recipe, "dense", [f"out={run}", f"data.root={tower_data}"])).fit()
    return run


def start_from(name: str, base: Path, out: Path) -> Path:
    """The trained model `base` with the variant's image settings, saved: every weight is `base`'s (AnyRes'
    newline embedding, which it lacks, starts at random)."""
    from vlmkit.config import ModelConfig, to_dict
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.models.vlm import VisionLanguageModel

    path = out / "start" / name
    if not (path / "config.json").is_file():
        trained = VisionLanguageModel.from_pretrained(base)
        cfg = to_dict(trained.config)
        for section, value in VARIANTS[name][1].items():
            cfg[section] = {**cfg[section], **value}
        model = VisionLanguageModel(ModelConfig.from_dict(cfg))
        missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
        if unexpected or set(missing) - {"anyres.image_newline"}:
            raise RuntimeError(f"{base}: cannot start {name} from it (missing {missing}, unexpected {unexpected})")
        model.save_pretrained(path, Tokenizer.load(base))
    return path


def score(model: Path, data: Path, eval_limit: int | None, out: Path) -> tuple[dict, float]:
    from vlmkit.eval.run_eval import evaluate

    start = time.perf_counter()
    results = evaluate(model, data_root=data, limit=eval_limit, out=out)
    return {k: v for k, v in results.items() if k != "examples"}, time.perf_counter() - start


def baseline_row(base: Path, data: Path, out: Path, eval_limit: int | None) -> dict:
    """The demo model as it is: the task's images resized to its 64 px."""
    from vlmkit.models.vlm import VisionLanguageModel

    results, eval_seconds = score(base, data, eval_limit, out / "demo_as_is" / "eval.json")
    return {"variant": "demo_as_is", "what": "the demo model, not fine-tuned, on the images resized to 64 px",
            "model": {}, "tokens_per_image": VisionLanguageModel.from_pretrained(base).tokens_per_image, "steps": 0,
            "batch_size": 0, "train_seconds": 0.0, "eval_seconds": eval_seconds, "results": results}


def run_variant(name: str, recipe: dict, start: Path, data: Path, out: Path, eval_limit: int | None,
                from_model: bool) -> dict:
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    what, model = VARIANTS[name]
    run = out / name
    overrides = [f"out={run}", f"data.root={data}"]
    if from_model:  # a trained model with the variant's settings (its tokenizer too)
        overrides += [f"init_from={start}", "vision_from=null"]
    else:
        overrides += [f"tokenizer={data / 'tokenizer'}", f"vision_from={start}",
                      *(f"model.{section}={json.dumps({**recipe['model'].get(section, {}), **value})}"
                        for section, value in model.items())]
    start_time = time.perf_counter()
    trainer = Trainer(stage_config(recipe, "instruct", overrides))
    anyres = trainer.model.anyres is not None
    tokens = trainer.model.image_token_count(256, 256) if anyres else trainer.model.tokens_per_image
    trainer.fit()
    train_seconds = time.perf_counter() - start_time  # tower features included: they are part of the cost
    results, eval_seconds = score(run, data, eval_limit, run / "eval.json")
    return {"variant": name, "what": what, "model": model, "tokens_per_image": tokens,
            "steps": recipe["stages"]["instruct"]["optim"]["steps"],
            "batch_size": recipe["stages"]["instruct"]["optim"]["batch_size"],
            "train_seconds": train_seconds, "eval_seconds": eval_seconds, "results": results}


def table(rows: list[dict]) -> str:
    head = ("| variant | what | tokens / image | VQA | " + " | ".join(TYPES) +
            " | POPE F1 (yes) | questions | train s | eval s |")
    lines = [head, "|---|---|" + "---:|" * (len(TYPES) + 6)]
    for row in rows:
        r = row["results"]
        by_type, pope = r.get("vqa_accuracy_by_type", {}), r.get("pope", {})
        cells = [row["variant"], row["what"], str(row["tokens_per_image"]), f"{r['vqa_accuracy']:.3f}",
                 *(f"{by_type.get(t, float('nan')):.2f}" for t in TYPES),
                 f"{pope.get('f1', 0):.2f} ({pope.get('yes_ratio', 0):.2f})", str(r.get("n_samples", "")),
                 f"{row['train_seconds']:.0f}", f"{row['eval_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(doc: Path, rows: list[dict], command: str, note: str) -> None:
    write_table_section(doc, BEGIN, END, f"{note}Made by `{command}`.\n\n{table(rows)}",
                        "Resolution: fixed resize vs AnyRes")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", metavar="RUN", help="a `vlmkit demo` run directory (dense/ and instruct/): every "
                                                 "variant is fine-tuned from its model (default: from zero)")
    p.add_argument("--scenes", type=int, default=1000, help="train+val+test scenes of the high-resolution task")
    p.add_argument("--steps", type=int, default=150, help="instruct steps per variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="instruct learning rate (default: 3e-4 from --demo, "
                                                         "else the demo recipe's)")
    p.add_argument("--dense-steps", type=int, default=300, help="steps of the shared tower's dense stage")
    p.add_argument("--max-objects", type=int, default=5, help="objects per scene: 1 to this (hires default: 5)")
    p.add_argument("--downsample", type=int, default=2, help="pixel_shuffle: r x r patches per token (a 64 px tile "
                                                            "is 8 x 8 patches: 2 gives 16 tokens, 4 gives 4)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, from: " +
                   ", ".join(VARIANTS))
    p.add_argument("--eval-limit", type=int, default=None, help="test questions scored (default: all)")
    p.add_argument("--out", default="runs/resolution")
    p.add_argument("--doc", default="docs/resolution.md")
    p.add_argument("--smoke", action="store_true", help="label the table as a smoke run (too small to mean much)")
    args = p.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, tower_data = make_data(out, args.scenes, args.max_objects, tokenizer=not args.demo)
    recipe = base_recipe(args.steps, args.batch_size, args.dense_steps, args.downsample)
    if args.lr or args.demo:
        recipe["stages"]["instruct"]["optim"]["lr"] = args.lr or 3e-4
    rows = []
    if args.demo:
        from vlmkit.models.vlm import resolve_model_dir

        base = resolve_model_dir(Path(args.demo) / "instruct")
        rows.append(baseline_row(base, data, out, args.eval_limit))
        print(table(rows[-1:]), flush=True)
    else:
        tower = train_tower(recipe, tower_data, out)
    print(f"[resolution] data and starting point ready after {time.perf_counter() - started:.0f} s", flush=True)
    for name in names:
        print(f"[resolution] {name}: {VARIANTS[name][0]}", flush=True)
        start = start_from(name, base, out) if args.demo else tower
        rows.append(run_variant(name, recipe, start, data, out, args.eval_limit, from_model=bool(args.demo)))
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        print(table(rows[-1:]), flush=True)
    total = time.perf_counter() - started
    print(f"[resolution] total {total:.0f} s")
    command = ("python bench/resolution.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip()
    note = ("**Smoke run** (sizes far too small for the numbers to mean anything; it shows the script works). "
            if args.smoke else "")
    lr = recipe["stages"]["instruct"]["optim"]["lr"]
    if args.demo:
        note += (f"{args.scenes} scenes of 1-{args.max_objects} objects; every variant fine-tuned from the demo model "
                 f"({args.demo}) for {args.steps} instruct steps x batch {args.batch_size} at lr {lr:g}; ")
    else:
        note += (f"{args.scenes} scenes of 1-{args.max_objects} objects, from zero: pixel_shuffle "
                 f"{args.downsample}x{args.downsample}, {args.steps} instruct steps x batch {args.batch_size} at lr "
                 f"{lr:g} per variant, tower: {args.dense_steps} dense steps; ")
    note += f"{total:.0f} s in all (train s: tower features included).\n"
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_doc(doc, rows, command, note)
    print(f"[resolution] table written to {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
