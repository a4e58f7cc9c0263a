"""Training throughput and MFU: vlmkit vs a same-sized transformers LlavaForConditionalGeneration.

Two sizes (same connector, `mlp2x_gelu`, one token per patch, as Llava's projector):

    tiny  image 64 / patch 8 (64 image tokens), ViT 192 x 4, LM 256 x 4, vocab 1k, batch 32, ~104 tokens
    mid   image 96 / patch 8 (144 image tokens), ViT 384 x 6, LM 512 x 8, vocab 4k, batch 16, ~272 tokens

Every candidate gets the same batches (an image + text, right-padded, the loss on the last 8 tokens of
each sample) and does the same work per step: forward, backward and an AdamW step over every
parameter, under bf16 autocast (fp32 with --fp32). transformers' Llava runs with its "sdpa" and its
"eager" attention, and the faster one is the peer. Steps are timed in interleaved rounds (median), so
drift in the machine's speed hits every candidate alike: compare ratios, not absolute numbers.

MFU = model FLOPs per step / step time / peak. Model FLOPs are the matmul FLOPs the model needs: the
linear layers, the patch embedding and attention (causal attention: its lower triangle) over the
samples' real tokens (padding excluded), the LM head on the labelled positions only, and the backward
pass as twice the forward. The peak is this machine's bf16 (fp32 with --fp32) matmul rate, measured
here with a large matmul on the same threads before and after the candidates (the better of the two).

    python bench/train_throughput.py [--configs tiny,mid] [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from vlmkit.config import ModelConfig
from vlmkit.data.collate import collate
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.config import OptimConfig
from vlmkit.train.efficiency import compile_model
from vlmkit.train.optim import build_optimizer

IMAGE_ID, ANSWER = 3, 8  # the image placeholder id; labelled tokens at the end of each sample

CONFIGS = {
    "tiny": {"batch": 32, "text": 40, "model": {
        "vision": {"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_layers": 4, "num_heads": 3,
                   "intermediate_size": 768},
        "lm": {"vocab_size": 1024, "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
               "intermediate_size": 688, "max_position_embeddings": 512}}},
    "mid": {"batch": 16, "text": 128, "model": {
        "vision": {"image_size": 96, "patch_size": 8, "hidden_size": 384, "num_layers": 6, "num_heads": 6,
                   "intermediate_size": 1536},
        "lm": {"vocab_size": 4096, "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
               "intermediate_size": 1376, "max_position_embeddings": 1024}}},
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict({**CONFIGS[name]["model"], "image_token_id": IMAGE_ID,
                                  "connector": {"name": "mlp2x_gelu"}})


def llava_model(cfg: ModelConfig, attn: str):
    import transformers

    v, lm = cfg.vision, cfg.lm
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act="gelu"),
        text_config=transformers.LlamaConfig(
            vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
            num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads,
            max_position_embeddings=lm.max_position_embeddings, tie_word_embeddings=lm.tie_word_embeddings),
        image_token_index=IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn
    return transformers.LlavaForConditionalGeneration(config)


def make_batch(batch_size: int, image_tokens: int, image_size: int, text: int, vocab: int, seed: int = 0,
               image_id: int = IMAGE_ID) -> dict:
    """Samples of one image (first) + `text` tokens on average (uniform in [text/2, 3 text/2))."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(text // 2, text * 3 // 2, (batch_size,), generator=g)
    width = image_tokens + int(lengths.max())
    ids = torch.zeros(batch_size, width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        end = image_tokens + n
        words = torch.randint(10, vocab, (n - 1,), generator=g)
        ids[i, 0] = 5
        ids[i, 1 : 1 + image_tokens] = image_id
        ids[i, 1 + image_tokens : end] = words.masked_fill(words == image_id, 5)
        labels[i, end - ANSWER : end] = ids[i, end - ANSWER : end]
        mask[i, :end] = 1
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def packed(batch: dict, pack_length: int) -> dict:
    """The same samples laid end to end in rows of `pack_length` tokens (vlmkit's `data.packing`)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    samples = [{"input_ids": batch["input_ids"][i, :n], "labels": batch["labels"][i, :n],
                "pixel_values": batch["pixel_values"][i : i + 1], "num_images": 1} for i, n in enumerate(lengths)]
    return collate(samples, pad_id=0, pack_length=pack_length)


def step_flops(cfg: ModelConfig, batch: dict) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward; see the module doc)."""
    v, lm = cfg.vision, cfg.lm
    images = len(batch["pixel_values"])
    patches = (v.image_size // v.patch_size) ** 2
    vit_tokens = patches + (1 if v.use_cls_token else 0)
    vit = images * (2 * 3 * v.patch_size**2 * v.hidden_size * patches
                    + v.num_layers * (vit_tokens * 2 * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
                                      + 4 * vit_tokens**2 * v.hidden_size))
    connector = images * patches * 2 * (v.hidden_size * lm.hidden_size + lm.hidden_size**2)
    lengths = batch["attention_mask"].sum(dim=1).double()
    width = lm.num_heads * lm.head_dim
    per_token = 2 * (2 * lm.hidden_size * width + 2 * lm.hidden_size * lm.num_kv_heads * lm.head_dim
                     + 3 * lm.hidden_size * lm.intermediate_size)
    causal_pairs = float((lengths * (lengths + 1) / 2).sum())
    decoder = lm.num_layers * (float(lengths.sum()) * per_token + 4 * causal_pairs * width)
    head = 2 * lm.hidden_size * lm.vocab_size * int((batch["labels"][:, 1:] != -100).sum())
    return 3.0 * (vit + connector + decoder + head)


def clock() -> float:
    """Seconds: this process's CPU time when torch computes on one thread (on a shared machine the time spent
    waiting for a core is not the model's), else wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` n x n x n matmuls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


def make_step(model, loss_fn, bf16: bool):
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))  # vlmkit's AdamW, for both
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = loss_fn(model)
        loss.backward()
        opt.step()

    return step


def time_round_robin(steps: dict, rounds: int) -> dict:
    """Median seconds per step for each candidate, measured in interleaved rounds so that drift in
    machine speed (frequency, other load) hits every candidate alike."""
    for step in steps.values():
        step()  # warm-up (allocations, kernel selection, compilation)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = clock()
            step()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_config(name: str, args) -> tuple[dict, float, int, int]:
    """Seconds per step of every candidate on config `name`, the step's model FLOPs, samples and tokens."""
    cfg, spec = model_config(name), CONFIGS[name]
    torch.manual_seed(0)
    ours = VisionLanguageModel(cfg)
    size = cfg.vision.image_size
    batch = make_batch(spec["batch"], ours.image_token_count(size, size), size, spec["text"], cfg.lm.vocab_size)
    rows = packed(batch, 4 * batch["input_ids"].shape[1])

    def ours_loss(model, b=batch):
        return model(b["input_ids"], b["pixel_values"], labels=b["labels"], image_counts=b.get("image_counts"),
                     segment_ids=b.get("segment_ids"), logits=False).loss

    bf16 = not args.fp32
    candidates = {"vlmkit": make_step(ours, ours_loss, bf16),
                  "vlmkit (data.packing)": make_step(ours, lambda m: ours_loss(m, rows), bf16)}
    if args.compile:
        compiled = VisionLanguageModel(cfg)
        compile_model(compiled, OptimConfig(compile=True))
        candidates["vlmkit (optim.compile)"] = make_step(compiled, ours_loss, bf16)
        candidates["vlmkit (optim.compile, data.packing)"] = make_step(compiled, lambda m: ours_loss(m, rows), bf16)
    for attn in ("sdpa", "eager"):
        candidates[f"transformers Llava ({attn})"] = make_step(llava_model(cfg, attn), lambda m: m(**batch).loss, bf16)
    tokens = int(batch["attention_mask"].sum())
    print(f"\n{name}: batch {spec['batch']}, {tokens / spec['batch']:.0f} tokens per sample on average "
          f"({batch['input_ids'].shape[1]} padded), {step_flops(cfg, batch) / 1e9:.0f} GFLOP per step", flush=True)
    return time_round_robin(candidates, args.rounds), step_flops(cfg, batch), spec["batch"], tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--compile", action="store_true", help="also time vlmkit with optim.compile (start-up cost)")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 autocast")
    args = parser.parse_args()
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    started = time.perf_counter()
    peak = matmul_peak(dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, median of {args.rounds} interleaved rounds, "
          f"{'CPU' if torch.get_num_threads() == 1 else 'wall'} time")
    results = {name: run_config(name, args) for name in args.configs.split(",")}
    peak = max(peak, matmul_peak(dtype))  # before and after the candidates: the better
    print(f"\n{dtype} matmul peak: {peak / 1e9:.0f} GFLOP/s")
    for name, (seconds, flops, samples, tokens) in results.items():
        print(f"\n{name}:")
        for cand, sec in seconds.items():
            print(f"  {cand:40} {sec * 1000:7.0f} ms/step {samples / sec:6.1f} samples/s {tokens / sec:7.0f} tokens/s"
                  f"  MFU {100 * flops / sec / peak:5.1f}%")
        peer = min((c for c in seconds if c.startswith("transformers")), key=seconds.get)
        for cand in seconds:
            if cand.startswith("vlmkit"):
                print(f"  {cand} vs {peer}: {seconds[peer] / seconds[cand]:.2f}x tokens/s and samples/s")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
