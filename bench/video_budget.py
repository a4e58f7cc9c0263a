"""Accuracy against the token budget on the moving-shapes clips: one short instruct run per budget.

Each run starts from the demo's final model (`--init-from`, e.g. runs/demo/instruct: its frozen
dense-trained tower, pixel_shuffle connector (16 tokens per frame) and LM), trains connector + LM on
the clips' questions (bench/recipes/video.yaml; only `model.video` differs between runs) and is scored
on the test clips (`vlmkit eval RUN --split video_test`). The data comes from
`vlmkit synth --out DATA --n 10 --video 1500` (made here when DATA has no video_train.json).

    python bench/video_budget.py --init-from runs/demo/instruct --data runs/video/data --out runs/video \\
        [--budgets 32,128] [--sampling uniform] [--temporal-pool 1] [--steps 400]

Prints every command it runs, then a markdown table (accuracy per question type per budget); writes
OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vlmkit.models.vlm import VisionLanguageModel

RECIPE = Path(__file__).resolve().parent / "recipes" / "video.yaml"
TYPES = ("video_direction", "video_last", "video_leave")


def run(command: list[str]) -> float:
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init-from", required=True, help="the demo's instruct run (or its model directory)")
    p.add_argument("--data", required=True, help="a shapes-world directory with the clips (made when missing)")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=1500, help="clips to synthesise when --data has none")
    p.add_argument("--budgets", default="32,128", help="image tokens per clip, one run each")
    p.add_argument("--sampling", default="uniform", choices=("uniform", "change"))
    p.add_argument("--temporal-pool", type=int, default=1)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    vlmkit = [sys.executable, "-m", "vlmkit.cli"]
    data, out = Path(args.data), Path(args.out)
    seconds = {}
    if not (data / "video_train.json").is_file():
        seconds["synth"] = run([*vlmkit, "synth", "--out", str(data), "--n", "10", "--video", str(args.clips)])
    model_dir = Path(args.init_from)
    model_dir = model_dir / "model" if (model_dir / "model").is_dir() else model_dir
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        name = f"budget{budget}_{args.sampling}_pool{args.temporal_pool}"
        run_dir = out / name
        train = run([*vlmkit, "train", "--config", str(RECIPE), "--set", f"out={run_dir}",
                     "--set", f"init_from={model_dir}", "--set", f"tokenizer={model_dir}",
                     "--set", f"data.root={data}", "--set", f"optim.steps={args.steps}",
                     "--set", f"model.video.budget={budget}", "--set", f"model.video.sampling={args.sampling}",
                     "--set", f"model.video.temporal_pool={args.temporal_pool}"])
        evaluate = run([*vlmkit, "eval", str(run_dir), "--split", "video_test"])
        result = json.loads((run_dir / "eval.json").read_text())
        model = VisionLanguageModel.from_pretrained(run_dir)
        size = model.config.vision.image_size
        frames = (budget // model.connector_token_count(size, size)) * args.temporal_pool
        rows.append({"budget": budget, "frames": frames, "sampling": args.sampling,
                     "temporal_pool": args.temporal_pool, "accuracy": result["vqa_accuracy"],
                     "clip_frames": json.loads((data / "meta.json").read_text())["video_frames"],
                     "by_type": result["vqa_accuracy_by_type"], "n": result["n_samples"],
                     "train_seconds": round(train), "eval_seconds": round(evaluate)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=2))
    print("\n| budget (tokens) | frames kept | sampling | pool | accuracy | direction | appears last | leave count "
          "| train s | eval s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["by_type"]
        print(f"| {r['budget']} | {min(r['frames'], r['clip_frames'])} | {r['sampling']} | {r['temporal_pool']} | "
              f"{r['accuracy']:.3f} | " + " | ".join(f"{t.get(k, 0):.3f}" for k in TYPES) +
              f" | {r['train_seconds']} | {r['eval_seconds']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
