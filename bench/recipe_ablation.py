"""What holds a from-zero VLM back? Variants of the demo recipe, each trained for the same wall time.

Every variant changes one thing of the built-in demo recipe, vlmkit/recipes/demo.yaml (the `before` row is
the demo recipe of an earlier release, kept in bench/recipes/). For each variant the script

1. makes its data (shapes-world + tokenizer; variants that share the data share one directory),
2. times a few steps of each of its stages (random weights: speed does not depend on them),
3. scales the stages' step counts so that steps x measured step time fills the budget (each stage
   keeps its share of the recipe's own plan), trains them in order and
4. scores the final model on the test split (and the held-out `compositional` / `variants` splits).

Results go to RUN/results.json and a markdown table (default docs/recipe_ablation.md) with the
command that produced it, per-type accuracy, POPE, grounding, and where the step time went.

    python bench/recipe_ablation.py [--budget 420] [--variants final,patchify,...] [--out runs/ablation]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from doc_tables import write_table_section

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "vlmkit" / "recipes" / "demo.yaml"
BEFORE = ROOT / "bench" / "recipes" / "demo_before.yaml"
BEGIN, END = "<!-- table: bench/recipe_ablation.py -->", "<!-- end of table -->"
CALIBRATION_STEPS = 12  # timed after WARMUP_STEPS untimed ones
WARMUP_STEPS = 3

Recipe = dict


def _set(recipe: Recipe, dotted: str, value) -> Recipe:
    node = recipe
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return recipe


def edit(**changes) -> Callable[[Recipe], Recipe]:
    """A variant that sets dotted keys of the recipe (``stages.instruct.optim.lr=...``)."""
    def apply(recipe: Recipe) -> Recipe:
        for dotted, value in changes.items():
            _set(recipe, dotted.replace("__", "."), value)
        return recipe
    return apply


def clip_instead_of_dense(recipe: Recipe) -> Recipe:
    """The tower pretrained by the earlier demo's contrastive clip stage instead of the dense stage."""
    before = yaml.safe_load(BEFORE.read_text())
    stages = {"clip": before["stages"]["clip"], **{k: v for k, v in recipe["stages"].items() if k != "dense"}}
    stages["clip"]["optim"]["steps"] = recipe["stages"]["dense"]["optim"]["steps"]
    for stage in stages.values():
        if stage.get("vision_from") == "dense":
            stage["vision_from"] = "clip"
    recipe["stages"] = stages
    return recipe


def no_vision_pretraining(recipe: Recipe) -> Recipe:
    """No tower pretraining at all: the instruct stage trains a random tower with the LM."""
    instruct = recipe["stages"]["instruct"]
    instruct.pop("vision_from", None)
    instruct["optim"]["train_vision"] = True
    recipe["stages"] = {"instruct": instruct}
    return recipe


def earlier_demo(_: Recipe) -> Recipe:
    return yaml.safe_load(BEFORE.read_text())


VARIANTS: dict[str, tuple[str, Callable[[Recipe], Recipe]]] = {
    "final": ("the demo recipe as shipped", lambda r: r),
    "before": ("the earlier demo: clip + align + instruct, patchify ViT, mixed records, lr 1.5e-3", earlier_demo),
    "patchify": ("one 8x8 patchify conv instead of the conv stem", edit(model__vision__stem="patchify")),
    "clip_tower": ("the tower pretrained contrastively (clip stage) instead of densely", clip_instead_of_dense),
    "no_tower_training": ("no tower pretraining; the tower trains with the LM", no_vision_pretraining),
    "box_bins": ("dense stage also classifies each box edge into 65 bins", edit(stages__dense__dense={"box_bins": 65})),
    "no_recolor": ("dense stage without recoloured / reshaped objects (only the pairs the VQA split has)",
                   edit(stages__dense__data__recolor=0.0, stages__dense__data__other_shapes=0.0)),
    "digit_tokens": ("numbers split into digit tokens (one token per digit)",
                     edit(tokenizer_training__split_digits=True)),
    "no_object_lists": ("no object-list records (Pix2Seq-style name + box lists)",
                        edit(synth__object_lists=False)),
    "dialogues": ("all questions of an image as one multi-turn conversation instead of one record each",
                  edit(synth__records="dialogue")),
    "lr_1.5e-3": ("instruct learning rate 1.5e-3 (the earlier demo's) instead of 6e-4",
                  edit(stages__instruct__optim__lr=1.5e-3)),
    "tokens_64": ("64 image tokens (mlp2x_gelu) instead of 16 (pixel_shuffle 2x2)",
                  edit(model__connector={"name": "mlp2x_gelu"})),
}


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def make_data(recipe: Recipe, out: Path) -> Path:
    """The variant's shapes-world data and tokenizer (shared by variants with the same settings)."""
    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.shapes_world import write_dataset
    from vlmkit.data.tokenizer import train_tokenizer

    settings = {"synth": recipe.get("synth", {}), "tokenizer": recipe.get("tokenizer_training", {})}
    root = out / f"data-{_digest(settings)}"
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        write_dataset(root, **settings["synth"])
        train_tokenizer(tokenizer_texts(root), **settings["tokenizer"]).save(root / "tokenizer")
    return root


def stage_overrides(recipe: Recipe, stage: str, run: Path, data: Path) -> list[str]:
    from vlmkit.train.recipe import stage_paths

    return stage_paths(recipe, stage, run, data) + ["log_every=10", f"save_every={10**9}"]


def seconds_per_step(recipe: Recipe, stage: str, data: Path, scratch: Path) -> float:
    """Median-free, simple: the mean wall time of CALIBRATION_STEPS steps after WARMUP_STEPS, random weights."""
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    overrides = stage_overrides(recipe, stage, scratch, data) + ["vision_from=null", "init_from=null",
                                                                 f"optim.steps={CALIBRATION_STEPS + WARMUP_STEPS}"]
    trainer = Trainer(stage_config(recipe, stage, overrides))
    trainer.stage.train_mode(trainer.model)
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):
        trainer.train_step()
    return (time.perf_counter() - start) / CALIBRATION_STEPS


def run_variant(name: str, recipe: Recipe, budget: float, out: Path, eval_limit: int | None) -> dict:
    from vlmkit.eval.run_eval import evaluate
    from vlmkit.train.recipe import recipe_stages, stage_config
    from vlmkit.train.trainer import Trainer

    run = out / name
    data = make_data(recipe, out)
    stages = recipe_stages(recipe)
    per_step = {s: seconds_per_step(recipe, s, data, out / "calibration" / name) for s in stages}
    planned = {s: recipe["stages"][s]["optim"]["steps"] for s in stages}
    scale = budget / sum(planned[s] * per_step[s] for s in stages)
    steps = {s: max(10, round(planned[s] * scale)) for s in stages}
    timings, phases = {}, {}
    for stage in stages:
        optim = recipe["stages"][stage]["optim"]
        warmup = min(optim.get("warmup_steps", 50), steps[stage] // 10)
        cfg = stage_config(recipe, stage, stage_overrides(recipe, stage, run, data)
                           + [f"optim.steps={steps[stage]}", f"optim.warmup_steps={warmup}"])
        start = time.perf_counter()
        Trainer(cfg).fit()
        timings[stage] = time.perf_counter() - start
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        phases[stage] = {k: round(sum(r["ms_per_step"][k] for r in rows) / len(rows), 1)
                         for k in rows[-1]["ms_per_step"]}
    start = time.perf_counter()
    results = evaluate(run / stages[-1], data_root=data, limit=eval_limit, out=run / "eval.json")
    return {"variant": name, "what": VARIANTS[name][0], "steps": steps, "seconds_per_step": per_step,
            "train_seconds": timings, "eval_seconds": time.perf_counter() - start, "ms_per_step": phases,
            "results": {k: v for k, v in results.items() if k != "examples"}}


COLUMNS = ("color", "shape", "count", "exists", "spatial", "size", "identify")


def table(rows: list[dict]) -> str:
    head = ("| variant | what changed | steps | VQA | " + " | ".join(COLUMNS)
            + " | POPE F1 (yes) | ground@0.5 | comp. VQA | variants VQA | train s | ms/step (data/fwd/bwd/opt) |")
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(COLUMNS) + 7)]
    for row in rows:
        r = row["results"]
        by_type = r.get("vqa_accuracy_by_type", {})
        pope = r.get("pope", {})
        last = list(row["steps"])[-1]
        ms = row["ms_per_step"][last]
        cells = [row["variant"], row["what"], " + ".join(f"{s} {n}" for s, n in row["steps"].items()),
                 f"{r['vqa_accuracy']:.3f}", *(f"{by_type.get(t, float('nan')):.2f}" for t in COLUMNS),
                 f"{pope.get('f1', 0):.3f} ({pope.get('yes_ratio', 0):.2f})",
                 f"{r.get('grounding', {}).get('acc50', 0):.3f}",
                 f"{r.get('compositional', {}).get('vqa_accuracy', float('nan')):.3f}",
                 f"{r.get('variants', {}).get('vqa_accuracy', float('nan')):.3f}",
                 f"{sum(row['train_seconds'].values()):.0f}",
                 f"{last}: " + "/".join(f"{ms.get(k, 0):.0f}" for k in ("data", "forward", "backward", "optimizer"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=420.0, help="training seconds per variant (all stages)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--doc", default="docs/recipe_ablation.md")
    p.add_argument("--eval-limit", type=int, default=None, help="questions per split (default: all)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    results_path = out / "results.json"
    done = {r["variant"]: r for r in json.loads(results_path.read_text())} if results_path.is_file() else {}
    base = yaml.safe_load(DEMO.read_text())
    for name in names:
        if name in done:
            print(f"[ablation] {name}: already in {results_path}")
            continue
        print(f"[ablation] {name}: {VARIANTS[name][0]}", flush=True)
        done[name] = run_variant(name, VARIANTS[name][1](copy.deepcopy(base)), args.budget, out, args.eval_limit)
        results_path.write_text(json.dumps(list(done.values()), indent=2))
        print(table([done[name]]), flush=True)
    rows = [done[n] for n in names if n in done]
    command = "python bench/recipe_ablation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = f"Made by `{command.strip()}` ({args.budget:.0f} s of training per variant).\n\n{table(rows)}"
    write_table_section(Path(args.doc), BEGIN, END, body, "Recipe ablation")
    print(f"[ablation] table written to {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
