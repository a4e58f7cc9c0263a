"""The training efficiency options, each against its absence, measured in one run on this machine.

    python bench/train_features.py packing --data DIR [--steps 40]      # data.packing on the demo's instruct stage
    python bench/train_features.py checkpointing [--steps 3]            # optim.activation_checkpointing, mid config
    python bench/train_features.py lora [--lm DIR] [--steps 3]          # optim.lora vs full fine-tuning

- packing: two trainers of the built-in demo recipe's instruct stage (DIR: `vlmkit demo`'s data, with
  its tokenizer in DIR/tokenizer; the tower is random and frozen, so its features are computed once),
  alike but for `data.packing`, take turns step by step over the same batches. Reports samples/s,
  tokens/s (real tokens), the padding share of the padded batches and how far the losses differ.
- checkpointing: the mid config of bench/train_throughput.py (image 96 / patch 8, ViT 384 x 6, LM 512 x 8,
  batch 16, ~272 tokens per sample), everything trained, with and without checkpointing, each in its own
  process: the peak resident memory of the process during the timed steps (Linux: VmHWM, restarted after a
  warm-up step and after freed memory went back to the OS), what it held between steps (weights,
  gradients, optimizer state), and the step time. (tracemalloc does not see torch's CPU tensors.)
- lora: a VLM around SmolLM2-135M (`vlmkit import smollm2`; --lm DIR, else the mid config's LM) trained
  in full or with LoRA (r 8 on every linear layer of the LM, the connector trained in full), each in its
  own process: trainable parameters, step time, peak memory.

Step times are CPU seconds of the process when torch runs one thread (the machine may be shared; see
bench/train_throughput.py), else wall time. Processes alternate (A B A B ...) and the median is kept.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, clock, make_batch, model_config  # noqa: E402

from vlmkit.train.config import OptimConfig  # noqa: E402

# -- packing --------------------------------------------------------------------------------------


def packing(args) -> None:
    from vlmkit.train.recipe import read_recipe, stage_config
    from vlmkit.train.trainer import Trainer

    recipe = read_recipe("demo")
    tmp = Path(tempfile.mkdtemp(prefix="vlmkit-packing-"))
    trainers = {}
    for packed in (False, True):
        cfg = stage_config(recipe, "instruct", [
            f"out={tmp / str(packed)}", f"data.root={args.data}", f"tokenizer={Path(args.data) / 'tokenizer'}",
            "vision_from=null", f"data.feature_cache={tmp / 'features'}", "data.num_workers=0", "device=cpu",
            f"data.packing={str(packed).lower()}", f"optim.steps={args.steps + 3}"])
        trainers[packed] = Trainer(cfg)
        trainers[packed].stage.train_mode(trainers[packed].model)
    lengths = trainers[False].train_set.lengths
    real = padded = 0
    seconds = {packed: 0.0 for packed in trainers}
    totals = {packed: [0, 0] for packed in trainers}
    worst = 0.0
    for step in range(args.steps + 3):
        losses = {}
        for packed, trainer in trainers.items():
            start = clock()
            loss, tokens, samples = trainer.train_step()
            if step >= 3:  # warm-up steps are not timed
                seconds[packed] += clock() - start
                totals[packed][0] += tokens
                totals[packed][1] += samples
            losses[packed] = loss
        batch = trainers[False].sampler.batch(step)
        real += int(sum(lengths[i] for i in batch))
        padded += int(max(lengths[i] for i in batch)) * len(batch)
        worst = max(worst, abs(losses[True] - losses[False]))
    cfg = trainers[False].cfg
    print(f"demo recipe, instruct stage: batch {cfg.optim.batch_size}, max_length {cfg.data.max_length}, "
          f"{statistics.mean(lengths):.0f} tokens per sample on average (longest {max(lengths)}); "
          f"{args.steps} timed steps each, taking turns")
    print(f"padding in the padded batches: {100 * (1 - real / padded):.1f}% of their positions")
    for packed in trainers:
        tokens, samples = totals[packed]
        print(f"  data.packing {str(packed).lower():5}  {1000 * seconds[packed] / args.steps:7.0f} ms/step "
              f"{samples / seconds[packed]:7.1f} samples/s {tokens / seconds[packed]:8.0f} tokens/s")
    print(f"  packed / padded: {seconds[False] / seconds[True]:.2f}x; largest loss difference {worst:.1e} (bf16)")


# -- workers: one process per variant, for its peak memory ----------------------------------------


def memory_now() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process (Linux /proc; `settle_memory` restarts the peak)."""
    status = Path("/proc/self/status").read_text().split("\n")
    field = lambda name: next(int(line.split()[1]) * 1024 for line in status if line.startswith(name))  # noqa: E731
    return field("VmRSS:"), field("VmHWM:")


def settle_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise), then restart the peak from here."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size starts again from now


def worker(kind: str, variant: str, steps: int, lm: str | None) -> dict:
    from vlmkit.models.lora import trainable_parameters
    from vlmkit.models.vlm import VisionLanguageModel
    from vlmkit.train.efficiency import prepare_model
    from vlmkit.train.optim import build_optimizer

    torch.manual_seed(0)
    if kind == "checkpointing":
        cfg, spec = model_config("mid"), CONFIGS["mid"]
        model = VisionLanguageModel(cfg)
        optim = OptimConfig(activation_checkpointing=variant == "on")
    else:
        model, spec = lora_model(lm)
        cfg = model.config
        for name, p in model.named_parameters():  # as the instruct stage: the tower frozen
            p.requires_grad_(not name.startswith("vision."))
        optim = OptimConfig(lora={"r": 8, "alpha": 16, "target_modules": ["lm"]} if variant == "lora" else None)
    prepare_model(model, optim)
    model.train()
    size = cfg.vision.image_size
    batch = make_batch(spec["batch"], model.image_token_count(size, size), size, spec["text"], cfg.lm.vocab_size,
                       image_id=cfg.image_token_id)
    opt = build_optimizer(model, optim)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"], logits=False).loss
        loss.backward()
        opt.step()

    step()  # warm-up: gradients and optimizer state exist from here on
    settle_memory()
    before, _ = memory_now()
    times = []
    for _ in range(steps):
        start = clock()
        step()
        times.append(clock() - start)
    _, peak = memory_now()
    trainable, total = trainable_parameters(model)
    return {"s_per_step": statistics.median(times), "rss_before": before, "peak": peak,
            "trainable": trainable, "total": total, "samples": spec["batch"],
            "tokens": int(batch["attention_mask"].sum())}


def lora_model(lm: str | None):
    """A VLM (the demo recipe's tower and connector) around the LM of directory `lm`, and its batch spec."""
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.hf.pretrained import build_vlm, model_config_from_parts

    if lm is None:
        from vlmkit.models.vlm import VisionLanguageModel

        return VisionLanguageModel(model_config("mid")), CONFIGS["mid"]
    tokenizer = Tokenizer.load(lm)
    tokenizer.add_image_token()
    parts = {"vision": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "num_layers": 4, "num_heads": 2,
                        "intermediate_size": 512},
             "lm": {"pretrained": lm}, "connector": {"name": "pixel_shuffle", "downsample": 2}}
    model = build_vlm(model_config_from_parts(parts, tokenizer.vocab_size, tokenizer.image_id))
    return model, {"batch": 8, "text": 80}


def compare(kind: str, variants: tuple[str, str], args) -> dict:
    env = dict(os.environ)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, "_worker", kind, variant, str(args.steps),
                                  args.lm or ""], env=env, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}


def print_rows(results: dict) -> None:
    mb = 2**20
    for variant, r in results.items():
        print(f"  {variant:5} {1000 * r['s_per_step']:7.0f} ms/step {r['samples'] / r['s_per_step']:6.1f} samples/s "
              f"{r['tokens'] / r['s_per_step']:6.0f} tokens/s  peak memory {r['peak'] / mb:5.0f} MB "
              f"({r['rss_before'] / mb:.0f} MB between steps)  trainable {r['trainable'] / 1e6:.2f}M "
              f"of {r['total'] / 1e6:.2f}M parameters")


def checkpointing(args) -> None:
    results = compare("checkpointing", ("off", "on"), args)
    print(f"activation checkpointing, mid config (batch {CONFIGS['mid']['batch']}, everything trained, bf16 autocast):")
    print_rows(results)
    off, on = results["off"], results["on"]
    print(f"  on / off: peak memory x{on['peak'] / off['peak']:.2f} (above the memory between steps: "
          f"{(on['peak'] - on['rss_before']) / 2**20:.0f} MB vs {(off['peak'] - off['rss_before']) / 2**20:.0f} MB), "
          f"step time x{on['s_per_step'] / off['s_per_step']:.2f}")


def lora(args) -> None:
    results = compare("lora", ("full", "lora"), args)
    print(f"LoRA (r 8, alpha 16, every linear layer of the LM) vs full fine-tuning of the LM, "
          f"{'LM ' + args.lm if args.lm else 'the mid config'} (tower frozen, connector trained in full):")
    print_rows(results)
    full, adapted = results["full"], results["lora"]
    print(f"  lora / full: step time x{adapted['s_per_step'] / full['s_per_step']:.2f}, peak memory "
          f"x{adapted['peak'] / full['peak']:.2f}, "
          f"trainable parameters x{adapted['trainable'] / full['trainable']:.3f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        kind, variant, steps, lm = sys.argv[2:6]
        print(json.dumps(worker(kind, variant, int(steps), lm or None)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["packing", "checkpointing", "lora"])
    parser.add_argument("--data", help="packing: a `vlmkit demo` data directory (with tokenizer/)")
    parser.add_argument("--lm", help="lora: an HF-format LM directory (e.g. `vlmkit import smollm2`'s)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (packing: 40; others: 3)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per variant (checkpointing, lora)")
    args = parser.parse_args()
    args.steps = args.steps or (40 if args.what == "packing" else 3)
    if args.what == "packing" and not args.data:
        parser.error("packing needs --data DIR")
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{'CPU' if torch.get_num_threads() == 1 else 'wall'} time per step")
    {"packing": packing, "checkpointing": checkpointing, "lora": lora}[args.what](args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
