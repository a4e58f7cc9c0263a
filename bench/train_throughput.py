"""Training throughput: vlmkit's demo VLM vs a same-sized transformers LlavaForConditionalGeneration.

Both models get identical batches (image + ChatML-like text, right-padded) and do the same work per
step: forward, backward, AdamW step, under bf16 autocast (or fp32 with --fp32), every parameter
trained. transformers' Llava is run with both its attention implementations ("sdpa", the default,
and "eager") and the faster one is the peer. Llava has no pixel-shuffle connector, so the
apples-to-apples row uses vlmkit with `mlp2x_gelu` (same 64 image tokens as Llava); the demo's own
`pixel_shuffle` connector (16 image tokens) is reported beside it.

    python bench/train_throughput.py [--steps 10] [--batch-size 32] [--fp32]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from vlmkit.config import ModelConfig
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.config import read_yaml

DEMO = Path(__file__).resolve().parent.parent / "vlmkit" / "recipes" / "demo.yaml"
VOCAB, IMAGE_ID, TEXT_LEN = 512, 3, 40  # the demo tokenizer's size; ~40 text tokens per sample


def demo_model_config(connector: str) -> ModelConfig:
    model = read_yaml(DEMO)["model"]
    data = {**model, "image_token_id": IMAGE_ID, "lm": {**model["lm"], "vocab_size": VOCAB},
            "connector": {"name": connector}}
    return ModelConfig.from_dict(data)


def llava_model(cfg: ModelConfig, attn: str):
    import transformers

    v, lm = cfg.vision, cfg.lm
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu"),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
            num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
            max_position_embeddings=lm.max_position_embeddings, tie_word_embeddings=lm.tie_word_embeddings),
        image_token_index=IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn
    return transformers.LlavaForConditionalGeneration(config)


def make_batch(batch_size: int, image_tokens: int, image_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(TEXT_LEN // 2, TEXT_LEN * 3 // 2, (batch_size,), generator=g)
    width = image_tokens + int(lengths.max())
    ids = torch.zeros(batch_size, width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        text = torch.randint(10, VOCAB, (n,), generator=g)
        ids[i, 1 : 1 + image_tokens] = IMAGE_ID
        ids[i, 1 + image_tokens : image_tokens + n] = text[: n - 1]
        ids[i, 0] = 5
        labels[i, image_tokens + n - 8 : image_tokens + n] = ids[i, image_tokens + n - 8 : image_tokens + n]
        mask[i, : image_tokens + n] = 1
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def make_step(model, loss_fn, bf16: bool):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx:
            loss = loss_fn(model)
        loss.backward()
        opt.step()

    return step


def time_round_robin(steps: dict, rounds: int) -> dict:
    """Median seconds per step for each candidate, measured in interleaved rounds so that drift in
    machine speed (frequency, other load) hits every candidate alike."""
    for step in steps.values():
        step()  # warm-up (allocations, kernel selection)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 autocast")
    args = parser.parse_args()
    bf16 = not args.fp32
    torch.manual_seed(0)
    def report(name: str, seconds: float, batch: dict) -> dict:
        tokens = int(batch["attention_mask"].sum())
        row = {"name": name, "s_per_step": seconds, "samples_per_s": args.batch_size / seconds,
               "tokens_per_s": tokens / seconds}
        print(f"{name:42} {seconds * 1000:8.1f} ms/step {row['samples_per_s']:8.1f} samples/s "
              f"{row['tokens_per_s']:9.0f} tokens/s", flush=True)
        return row

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, median of {args.steps} interleaved rounds")
    candidates, batches = {}, {}
    for connector in ("mlp2x_gelu", "pixel_shuffle"):
        cfg = demo_model_config(connector)
        ours = VisionLanguageModel(cfg)
        size = cfg.vision.image_size
        image_tokens = ours.image_token_count(size, size)  # what the processor expands each <image> to
        batch = make_batch(args.batch_size, image_tokens, size)
        name = f"vlmkit ({connector}, {image_tokens} img tokens)"
        candidates[name] = make_step(ours, lambda m, b=batch: m(b["input_ids"], b["pixel_values"], labels=b["labels"],
                                                               logits=False).loss, bf16)
        batches[name] = batch
    cfg = demo_model_config("mlp2x_gelu")
    batch = make_batch(args.batch_size, 64, cfg.vision.image_size)
    for attn in ("sdpa", "eager"):
        name = f"transformers Llava (attn={attn}, 64 img tokens)"
        candidates[name] = make_step(llava_model(cfg, attn), lambda m: m(**batch).loss, bf16)
        batches[name] = batch
    seconds = time_round_robin(candidates, args.steps)
    rows = {name: report(name, seconds[name], batches[name]) for name in candidates}
    peers = [row for name, row in rows.items() if name.startswith("transformers")]
    results = {"mlp2x_gelu": rows[next(n for n in rows if "mlp2x_gelu" in n)],
               "pixel_shuffle": rows[next(n for n in rows if "pixel_shuffle" in n)]}
    peer = max(peers, key=lambda r: r["samples_per_s"])
    print(f"\npeer = {peer['name']}")
    same = results["mlp2x_gelu"]
    print(f"ratio vlmkit/peer, same architecture (mlp2x_gelu): {same['samples_per_s'] / peer['samples_per_s']:.2f}x "
          f"samples/s, {same['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s")
    demo = results["pixel_shuffle"]
    print(f"ratio vlmkit demo model (pixel_shuffle) / peer: {demo['samples_per_s'] / peer['samples_per_s']:.2f}x "
          f"samples/s")


if __name__ == "__main__":
    main()
