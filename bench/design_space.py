"""Connectors and fusions side by side: the demo recipe's instruct stage, one design per row, equal budget.

Every row trains the same instruct stage of vlmkit/recipes/demo.yaml (same data, steps, batch, learning
rate, seed) on the same frozen tower (the recipe's dense stage, trained once and shared), and changes only
`model.connector` and `model.fusion`. The training data is the demo's single-image records plus a
shapes-world two-image task (`vlmkit synth --multi-image`), shuffled together. Each model is scored on
the test split (VQA by type, POPE, grounding) and the two-image test split, and timed: training samples/s
(the stage's own log) and greedy decode tokens/s (a batch of prompts, KV cache on).

    python bench/design_space.py [--steps 1000] [--designs pixel_shuffle,perceiver_16,...] [--out runs/design_space]

Writes RUN/results.json, a markdown table between markers in docs/design_space.md (the prose around it
is kept) and docs/design_space.png (accuracy against image tokens per image).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shlex
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_tables import write_table_section  # noqa: E402
from recipe_ablation import DEMO, make_data, stage_overrides  # noqa: E402

BEGIN, END = "<!-- table: bench/design_space.py -->", "<!-- end of table -->"
MULTI_IMAGE_SCENES = 3000  # two-image training pairs added to the demo's data
DECODE_BATCH, DECODE_TOKENS = 16, 24

# name -> (what it is, model.connector, model.fusion)
DESIGNS: dict[str, tuple[str, dict, str]] = {
    "mlp2x_gelu": ("LLaVA-1.5 MLP, one token per patch", {"name": "mlp2x_gelu"}, "splice"),
    "pixel_shuffle": ("2x2 space-to-depth + MLP (the demo's)", {"name": "pixel_shuffle", "downsample": 2}, "splice"),
    "perceiver_16": ("Perceiver Resampler, 16 latents", {"name": "perceiver", "num_queries": 16}, "splice"),
    "perceiver_64": ("Perceiver Resampler, 64 latents", {"name": "perceiver", "num_queries": 64}, "splice"),
    "qformer": ("Q-Former, 16 queries, no stage-1 pretraining",
                {"name": "qformer", "num_queries": 16, "num_layers": 2}, "splice"),
    "c_abstractor": ("C-Abstractor, 4x4 pooled grid", {"name": "c_abstractor", "num_queries": 16}, "splice"),
    "perceiver_xattn": ("Perceiver (16) read by gated cross-attention in every LM layer",
                        {"name": "perceiver", "num_queries": 16}, "cross_attention"),
}
TYPES = ("color", "shape", "count", "exists", "spatial", "size", "identify")


def with_multi_image(recipe: dict, out: Path) -> Path:
    """The demo's data with a two-image task, and a training file that mixes both (shuffled, seeded)."""
    recipe = copy.deepcopy(recipe)
    recipe.setdefault("synth", {})["multi_image"] = MULTI_IMAGE_SCENES
    data = make_data(recipe, out)
    mixed = data / "design_train.json"
    if not mixed.is_file():
        records = json.loads((data / "train.json").read_text()) + json.loads((data / "multi_train.json").read_text())
        random.Random(0).shuffle(records)
        mixed.write_text(json.dumps(records))
    return data


def train_tower(recipe: dict, data: Path, out: Path) -> Path:
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    tower = out / "tower"
    if not (tower / "dense" / "model").is_dir():
        Trainer(stage_config(recipe, "dense", stage_overrides(recipe, "dense", tower, data))).fit()
    return tower / "dense"


def decode_tokens_per_second(run: Path, data: Path) -> float:
    """Greedy decoding of DECODE_TOKENS new tokens (no early stop) for DECODE_BATCH test questions at once,
    KV cache on, bf16 autocast as `vlmkit eval`; the prefill (tower + connector + prompt) is included."""
    import torch

    from vlmkit.data.images import load_image
    from vlmkit.data.processor import VLMProcessor
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.device import autocast
    from vlmkit.eval.generation import left_pad
    from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir

    model_dir = resolve_model_dir(run)
    model = VisionLanguageModel.from_pretrained(model_dir).eval()
    processor = VLMProcessor.for_model(model, Tokenizer.load(model_dir))
    records = [json.loads(line) for line in (data / "test_qa.jsonl").read_text().splitlines()][:DECODE_BATCH]
    pixels = torch.stack([processor.preprocess(load_image(data / r["image"])) for r in records])
    ids, mask = left_pad([processor.prompt(r["question"]).input_ids for r in records], processor.tokenizer.pad_id)

    def decode(new_tokens: int) -> None:
        with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
            model.generate(ids, mask, pixel_values=pixels, max_new_tokens=new_tokens)

    decode(2)  # warm-up
    start = time.perf_counter()
    decode(DECODE_TOKENS)
    return DECODE_BATCH * DECODE_TOKENS / (time.perf_counter() - start)


def run_design(name: str, recipe: dict, tower: Path, data: Path, steps: int, out: Path, eval_limit: int | None) -> dict:
    from vlmkit.eval.run_eval import evaluate
    from vlmkit.train.recipe import stage_config
    from vlmkit.train.trainer import Trainer

    what, connector, fusion = DESIGNS[name]
    run = out / name
    overrides = stage_overrides(recipe, "instruct", run, data) + [
        f"vision_from={tower}", "data.train=design_train.json", f"optim.steps={steps}",
        f"model.connector={json.dumps(connector)}", f"model.fusion={fusion}"]
    trainer = Trainer(stage_config(recipe, "instruct", overrides))
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = model.config.vision.image_size
    tokens = model.connector_token_count(size, size)
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "instruct" / "metrics.jsonl").read_text().splitlines()]
    samples_per_s = sum(r["samples_per_s"] for r in rows[1:]) / max(1, len(rows) - 1)  # the first includes start-up
    results = evaluate(run / "instruct", data_root=data, limit=eval_limit, out=run / "eval.json")
    return {"design": name, "what": what, "connector": connector, "fusion": fusion, "steps": steps,
            "tokens_per_image": tokens, "sequence_tokens_per_image": model.image_token_count(size, size),
            "trainable_params": trainable, "train_seconds": train_seconds, "train_samples_per_s": samples_per_s,
            "decode_tokens_per_s": decode_tokens_per_second(run / "instruct", data),
            "results": {k: v for k, v in results.items() if k != "examples"}}


def table(rows: list[dict]) -> str:
    head = ("| design | what | tokens / image (in sequence) | trainable params | VQA | " + " | ".join(TYPES)
            + " | POPE F1 (yes) | ground@0.5 | two-image | train samples/s | decode tok/s |")
    lines = [head, "|---|---|" + "---:|" * (len(TYPES) + 8)]
    for row in rows:
        r = row["results"]
        by_type, pope = r.get("vqa_accuracy_by_type", {}), r.get("pope", {})
        multi = r.get("multi_test", {}).get("vqa_accuracy", float("nan"))
        cells = [row["design"], row["what"], f"{row['tokens_per_image']} ({row['sequence_tokens_per_image']})",
                 f"{row['trainable_params'] / 1e6:.2f}M", f"{r['vqa_accuracy']:.3f}",
                 *(f"{by_type.get(t, float('nan')):.2f}" for t in TYPES),
                 f"{pope.get('f1', 0):.3f} ({pope.get('yes_ratio', 0):.2f})",
                 f"{r.get('grounding', {}).get('acc50', 0):.3f}", f"{multi:.3f}",
                 f"{row['train_samples_per_s']:.0f}", f"{row['decode_tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("[design] matplotlib is not installed: no figure (pip install 'vlmkit[report]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, row in enumerate(rows):
        r = row["results"]
        marker = "s" if row["fusion"] == "cross_attention" else "o"
        ax.scatter(row["tokens_per_image"], r["vqa_accuracy"], marker=marker, s=40)
        ax.annotate(row["design"], (row["tokens_per_image"], r["vqa_accuracy"]), textcoords="offset points",
                    xytext=(5, 4 - 9 * (i % 3)), fontsize=8)  # designs often share a token count
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image tokens per image (connector output)")
    ax.set_ylabel("test VQA accuracy")
    ax.set_title(f"Equal budget: {rows[0]['steps']} instruct steps (squares: cross-attention)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_doc(doc: Path, rows: list[dict], command: str) -> None:
    write_table_section(doc, BEGIN, END, f"Made by `{command}`.\n\n{table(rows)}", "Connector and fusion design space")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="instruct steps per design (batch as the demo's)")
    p.add_argument("--designs", default=",".join(DESIGNS), help="comma-separated, from: " + ", ".join(DESIGNS))
    p.add_argument("--out", default="runs/design_space")
    p.add_argument("--doc", default="docs/design_space.md")
    p.add_argument("--eval-limit", type=int, default=None, help="questions per split (default: all)")
    args = p.parse_args()
    names = [n.strip() for n in args.designs.split(",") if n.strip()]
    unknown = [n for n in names if n not in DESIGNS]
    if unknown:
        p.error(f"unknown design(s) {unknown}; choose from {list(DESIGNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(DEMO.read_text())
    data = with_multi_image(recipe, out)
    tower = train_tower(recipe, data, out)
    results_path = out / "results.json"
    done = {r["design"]: r for r in json.loads(results_path.read_text())} if results_path.is_file() else {}
    for name in names:
        if name in done and done[name]["steps"] == args.steps:
            print(f"[design] {name}: already in {results_path}")
            continue
        print(f"[design] {name}: {DESIGNS[name][0]}", flush=True)
        done[name] = run_design(name, recipe, tower, data, args.steps, out, args.eval_limit)
        results_path.write_text(json.dumps(list(done.values()), indent=2))
        print(table([done[name]]), flush=True)
    rows = [done[n] for n in names if n in done]
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_doc(doc, rows, ("python bench/design_space.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip())
    if plot(rows, doc.with_suffix(".png")):
        print(f"[design] figure written to {doc.with_suffix('.png')}")
    print(f"[design] table written to {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
