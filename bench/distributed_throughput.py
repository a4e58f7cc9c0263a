"""Training throughput on N processes (torchrun, `strategy: ddp` or `fsdp`) against one process, same run.

Both train the instruct stage of a small shapes-world dataset with the same config, global batch and
steps (the N-process run splits each batch into N shares); samples/s is read from each run's
metrics.jsonl (the first log window, which holds the start-up, left out). Also reports whether the two
loss curves agree (they should, to float rounding). On CPU the processes talk through gloo.

    python bench/distributed_throughput.py [--nproc 2] [--strategy ddp] [--steps 40] [--batch-size 16] [--demo-model]

Without --demo-model the model is tiny (the tests' sizes: 2-layer ViT and LM, width 32); with it, the
demo recipe's model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY_MODEL = {
    "vision": {"image_size": 48, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
               "intermediate_size": 64},
    "lm": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64},
    "connector": {"name": "mlp2x_gelu"},
}


def make_data(root: Path, image_size: int) -> None:
    from vlmkit.commands.demo import tokenizer_texts
    from vlmkit.data.shapes_world import write_dataset
    from vlmkit.data.tokenizer import train_tokenizer

    write_dataset(root, seed=3, n=200, image_size=image_size)
    train_tokenizer(tokenizer_texts(root), vocab_size=300).save(root / "tokenizer")


def train(root: Path, out: Path, nproc: int, args: argparse.Namespace) -> float:
    """Wall seconds of one `vlmkit train` (under torchrun when nproc > 1)."""
    sets = {"out": out, "tokenizer": root / "tokenizer", "data.root": root, "data.train": "train.json",
            "data.val": None, "data.num_workers": 0, "optim.steps": args.steps, "optim.batch_size": args.batch_size,
            "optim.grad_accum": 1, "optim.warmup_steps": 5, "log_every": args.log_every, "save_every": 10**6,
            "device": "cpu", "precision": "fp32" if args.fp32 else "bf16",
            "strategy": args.strategy if nproc > 1 else "none"}
    overrides = [x for key, value in sets.items() for x in ("--set", f"{key}={'null' if value is None else value}")]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    started = time.perf_counter()
    subprocess.run([*launcher, "-m", "vlmkit", "train", "--config", str(root / "recipe.yaml"), "--stage", "instruct",
                    *overrides], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - started


def read(out: Path) -> tuple[float, list[float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["samples_per_s"] for r in rows[1:]), [r["loss"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    parser.add_argument("--demo-model", action="store_true", help="the demo recipe's model instead of the tiny one")
    args = parser.parse_args()

    from vlmkit.train.recipe import read_recipe

    model = read_recipe("demo")["model"] if args.demo_model else TINY_MODEL
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", model["vision"]["image_size"])
        (root / "data" / "recipe.yaml").write_text(yaml.safe_dump({"model": model, "stages": {"instruct": {}}}))
        rows = []
        for nproc in (1, args.nproc):
            out = root / f"run{nproc}"
            wall = train(root / "data", out, nproc, args)
            rows.append((nproc, wall, *read(out)))
    (_, _, one, losses_one), (_, _, many, losses_many) = rows
    print(f"{'processes':>9} | {'strategy':>8} | {'samples/s':>9} | {'wall s':>6}")
    for nproc, wall, rate, _ in rows:
        print(f"{nproc:>9} | {args.strategy if nproc > 1 else 'none':>8} | {rate:9.1f} | {wall:6.1f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses_one, losses_many))
    print(f"\n{args.nproc} processes / 1: {many / one:.2f}x samples/s; largest relative loss difference {worst:.1e}")
    print(f"(global batch {args.batch_size}, {args.steps} steps, {'fp32' if args.fp32 else 'bf16'}, "
          f"{os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
