"""Decoding speed in one run: vlmkit's KV-cached greedy decoding against transformers' `generate` on the same
weights, then int8 weight-only quantization and speculative decoding.

1. `lm`: SmolLM2-135M-Instruct (`vlmkit import smollm2`), loaded by vlmkit and by transformers'
   LlamaForCausalLM from the same directory, with fp32 and with bf16 weights; vlmkit also with fp32
   weights under bf16 autocast (what `vlmkit chat` / `eval` run). Chat prompts of several lengths,
   left-padded; a fixed number of new tokens (no end-of-turn stop). Tokens must be identical in fp32;
   in bf16 the two implementations round differently, so an exact tie may flip (reported).
2. `vlm`: a VLM of the demo's sizes through `vlmkit export --format llava-hf`, loaded by transformers'
   LlavaForConditionalGeneration. The demo's own model cannot be exported (conv stem, pixel_shuffle
   connector, a final feature norm; the run prints export's refusal), so this one has a patchify stem,
   `mlp2x_gelu` (64 image tokens instead of 16) and random weights. fp32, identical tokens asserted.
3. `quant`: SmolLM2 in bf16 vs int8 weight-only (`quantize_model`, torch's int8 kernel), and fp32 vs
   torch.ao's `quantize_dynamic` (int8 activations too), and torchao's `Int8WeightOnlyConfig` when
   torchao is importable: tokens/s, bytes, and against the float model the largest logit difference and
   top-1 agreement along the float model's greedy answers.
4. `spec`: speculative decoding on SmolLM2 (bf16), chat answers up to the end of turn: prompts whose
   answers repeat the prompt, and open questions; acceptance rate, tokens per forward, speedup over plain
   greedy, and whether the answers equal plain greedy's.

    python bench/decode.py [--lm DIR] [--demo RUN] [--sections lm,vlm,quant,spec] [--batches 1,16] [--rounds 3]
    python bench/decode.py --tiny        # smoke run on random tiny models (a minute)

Tokens/s = batch x new tokens / wall time of a whole generate call (prefill included). Candidates run
round-robin and report medians: the machine may be shared, so read the ratios. `--json OUT` keeps it all.
The whole run took 9 minutes on 2 shared CPU cores; `--sections` runs fewer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import time_round_robin  # noqa: E402

from vlmkit.config import ModelConfig, to_dict  # noqa: E402
from vlmkit.data.processor import VLMProcessor  # noqa: E402
from vlmkit.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from vlmkit.eval.generation import left_pad  # noqa: E402
from vlmkit.hf.llava import ExportError, check_exportable, export_llava_hf  # noqa: E402
from vlmkit.hf.pretrained import load_language_model, load_tokenizer  # noqa: E402
from vlmkit.models.quantize import quantize_model, quantized_bytes  # noqa: E402
from vlmkit.models.speculative import parse_speculative  # noqa: E402
from vlmkit.models.vlm import VisionLanguageModel, resolve_model_dir  # noqa: E402
from vlmkit.train.config import read_yaml  # noqa: E402

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "vlmkit" / "recipes" / "demo.yaml"
DEFAULT_LM = Path(os.environ.get("VLMKIT_CACHE", Path.home() / ".cache" / "vlmkit")) / "models" / "smollm2"
CHAT = ["What is the capital of France?", "Give me three tips for staying healthy.",
        "Explain in two sentences why the sky is blue.", "Write a haiku about autumn leaves.",
        "What is a vision-language model?", "How many legs does a spider have?",
        "Translate 'good morning' into French and Spanish.", "Name the planets of the solar system in order."]
# Answers that repeat their prompt (where prompt lookup pays) and open ones (where it cannot).
SPEC_PROMPTS = {
    "repeats the prompt": [
        "Fix the spelling and repeat the sentence: 'The quick brwon fox jumps ovr the lazy dog near the rivr bank.'",
        "List the colours in this sentence: a red star, a blue circle, a green square and a yellow cross.",
        "Rewrite in the past tense: I walk to the station, I buy a ticket and I wait for the train.",
        "Copy this list in reverse order: apple, banana, cherry, date, elderberry, fig, grape."],
    "open": ["What is the capital of France?", "Explain in two sentences why the sky is blue.",
             "Write a Python function that returns the sum of a list of numbers.",
             "Give me three tips for staying healthy."],
}
SPECULATIVE = ("ngram", "early-exit:layers=15")
VLM_QUESTIONS = ["What color is the star?", "How many objects are there?", "Is there a red circle in the image?",
                 "Describe the image.", "Where is the blue square?", "What shape is the green object?"]


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def timed(candidates: dict, rounds: int) -> tuple[dict, dict]:
    """Median seconds per candidate (round-robin) and each candidate's output of its last call."""
    outputs: dict = {}

    def keeping(name, fn):
        def call():
            outputs[name] = fn()
        return call

    seconds = time_round_robin({name: keeping(name, fn) for name, fn in candidates.items()}, rounds)
    return seconds, outputs


def prompt_batch(prompts: list[list[int]], batch: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([prompts[i % len(prompts)] for i in range(batch)], pad_id)


def hf_generate(model, ids, mask, new_tokens: int, **extra) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, **extra)
    return out[:, ids.shape[1]:].tolist()


def with_bf16_autocast(model, *args, **kwargs) -> list[list[int]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.generate(*args, **kwargs)


def load_hf_lm(lm_dir: Path, dtype: torch.dtype):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(lm_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # both run to the token limit
    return model


# -- 1. the language model against transformers -------------------------------------------------


def lm_section(lm_dir: Path, prompts: list[list[int]], pad_id: int, args) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_language_model(lm_dir).eval().to(dtype)
        hf = load_hf_lm(lm_dir, dtype)
        autocast_model = load_language_model(lm_dir).eval() if dtype == torch.bfloat16 else None
        for batch in args.batches:
            ids, mask = prompt_batch(prompts, batch, pad_id)
            n = args.new_tokens
            candidates = {"vlmkit": partial(ours.generate, ids, mask, max_new_tokens=n),
                          "transformers": partial(hf_generate, hf, ids, mask, n)}
            if autocast_model is not None:
                candidates["vlmkit, fp32 weights + bf16 autocast"] = partial(
                    with_bf16_autocast, autocast_model, ids, mask, max_new_tokens=n)
            seconds, outputs = timed(candidates, args.rounds)
            same = sum(a == b for a, b in zip(outputs["vlmkit"], outputs["transformers"]))
            if dtype == torch.float32 and same != batch:
                raise AssertionError(f"fp32 batch {batch}: vlmkit and transformers differ in {batch - same} rows")
            peer = batch * n / seconds["transformers"]
            for name, s in seconds.items():
                rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "decoder": name,
                             "tokens_per_s": batch * n / s, "vs_transformers": batch * n / s / peer,
                             "rows_identical": f"{same}/{batch}" if name == "vlmkit" else ""})
                print(f"  {rows[-1]['dtype']:8} batch {batch:2} {name:38} {rows[-1]['tokens_per_s']:7.1f} tok/s "
                      f"{rows[-1]['vs_transformers']:5.2f}x {rows[-1]['rows_identical']}", flush=True)
        del ours, hf, autocast_model
    return rows


# -- 2. a VLM against transformers' Llava ---------------------------------------------------------


def demo_like_config(demo_dir: Path | None, vocab_size: int, image_token_id: int) -> ModelConfig:
    """The demo model's sizes with what Llava can express: patchify stem, mlp2x_gelu, raw features."""
    if demo_dir is not None:
        data = to_dict(VisionLanguageModel.from_pretrained(demo_dir).config)
    else:  # the demo recipe's sizes
        data = to_dict(ModelConfig.from_dict({**read_yaml(DEMO_RECIPE)["model"], "lm": {
            **read_yaml(DEMO_RECIPE)["model"]["lm"], "vocab_size": vocab_size}, "image_token_id": image_token_id}))
    data["vision"].update(stem="patchify", feature_norm=False)
    data["connector"] = {"name": "mlp2x_gelu"}
    data["lm"]["vocab_size"], data["image_token_id"] = vocab_size, image_token_id
    return ModelConfig.from_dict(data)


def vlm_section(demo_dir: Path | None, args) -> list[dict]:
    import transformers

    if demo_dir is not None:
        try:
            check_exportable(VisionLanguageModel.from_pretrained(demo_dir))
        except ExportError as err:
            print(f"  the demo model: {err}")
        tok = Tokenizer.load(demo_dir)
    else:
        tok = train_tokenizer([q.lower() for q in VLM_QUESTIONS] * 20 + ["a red star left of a blue square"] * 20,
                              vocab_size=300)
    torch.manual_seed(0)
    model = VisionLanguageModel(demo_like_config(demo_dir, tok.vocab_size, tok.image_id)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_llava_hf(model, tok, Path(tmp) / "llava")
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(Path(tmp) / "llava").eval()
    hf.generation_config.eos_token_id = None
    processor = VLMProcessor.for_model(model, tok)
    size = model.config.vision.image_size
    print(f"  stand-in VLM: {size} px, {model.tokens_per_image} image tokens, LM {model.config.lm.num_layers} x "
          f"{model.config.lm.hidden_size}, random weights")
    prompts = [processor.prompt(q).input_ids for q in VLM_QUESTIONS]
    rows = []
    for batch in args.batches:
        ids, mask = prompt_batch(prompts, batch, tok.pad_id)
        pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        n = args.new_tokens
        seconds, outputs = timed({
            "vlmkit": partial(model.generate, ids, mask, pixel_values=pixels, max_new_tokens=n),
            "transformers": partial(hf_generate, hf, ids, mask, n, pixel_values=pixels)}, args.rounds)
        if outputs["vlmkit"] != outputs["transformers"]:
            raise AssertionError(f"VLM batch {batch}: vlmkit and transformers Llava produce different tokens")
        peer = batch * n / seconds["transformers"]
        for name, s in seconds.items():
            rows.append({"batch": batch, "decoder": name, "tokens_per_s": batch * n / s,
                         "vs_transformers": batch * n / s / peer})
            print(f"  fp32 batch {batch:2} {name:14} {rows[-1]['tokens_per_s']:8.1f} tok/s "
                  f"{rows[-1]['vs_transformers']:5.2f}x (tokens identical)", flush=True)
    return rows


# -- 3. int8 ------------------------------------------------------------------------------------


def torchao_int8(model: nn.Module) -> nn.Module | None:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(None):
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception:  # not installed, or built for another torch
        return None
    quantize_(model, Int8WeightOnlyConfig())
    return model


def dynamic_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


@torch.no_grad()
def agreement(model, reference, prompts: list[list[int]], answers: list[list[int]]) -> tuple[float, float]:
    """Largest |logit difference| and top-1 agreement over the answer positions (teacher-forced)."""
    diffs, agree, total = [], 0, 0
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        at = slice(len(prompt) - 1, -1)  # the logits that predict the answer's tokens
        a, b = model(ids).logits[0, at].float(), reference(ids).logits[0, at].float()
        diffs.append(float((a - b).abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(answer)
    return max(diffs), agree / total


def _mb(value: float | None) -> str:
    return "     ? MB" if value is None else f"{value:6.0f} MB"


def quant_section(lm_dir: Path, prompts: list[list[int]], pad_id: int, args) -> list[dict]:
    bf16 = load_language_model(lm_dir).eval().to(torch.bfloat16)
    fp32 = load_language_model(lm_dir).eval()
    variants = {"bf16": (bf16, None), "int8 (quantize_model)": (
        quantize_model(load_language_model(lm_dir).eval().to(torch.bfloat16)), bf16),
        "fp32": (fp32, None), "fp32 + quantize_dynamic int8": (dynamic_int8(load_language_model(lm_dir).eval()), fp32)}
    ao = torchao_int8(load_language_model(lm_dir).eval().to(torch.bfloat16))
    if ao is not None:
        variants["torchao Int8WeightOnly (bf16)"] = (ao, bf16)
    else:
        print("  torchao not importable: its row is left out")
    answers = {ref: ref.generate(*left_pad(prompts, pad_id), max_new_tokens=args.new_tokens) for ref in (bf16, fp32)}
    rows = []
    quality = {}
    for name, (model, ref) in variants.items():
        if ref is not None:
            quality[name] = agreement(model, ref, prompts, answers[ref])
    for batch in args.batches:
        ids, mask = prompt_batch(prompts, batch, pad_id)
        n = args.new_tokens
        seconds, _ = timed({name: partial(m.generate, ids, mask, max_new_tokens=n)
                            for name, (m, _) in variants.items()}, args.rounds)
        for name, (model, _) in variants.items():
            base = "bf16" if name in ("bf16", "int8 (quantize_model)", "torchao Int8WeightOnly (bf16)") else "fp32"
            diff, agree = quality.get(name, (0.0, 1.0))
            rows.append({"batch": batch, "model": name, "tokens_per_s": batch * n / seconds[name],
                         "vs_float": seconds[base] / seconds[name],
                         # torch.ao keeps its packed weights outside parameters and buffers: not counted
                         "MB": None if "dynamic" in name else quantized_bytes(model) / 1e6,
                         "max_logit_diff": diff, "top1_agreement": agree})
            print(f"  batch {batch:2} {name:32} {rows[-1]['tokens_per_s']:7.1f} tok/s {rows[-1]['vs_float']:5.2f}x "
                  f"vs {base}  {_mb(rows[-1]['MB'])}  max|dlogit| {diff:.3f}  top-1 agree {agree:.3f}", flush=True)
    return rows


# -- 4. speculative decoding ----------------------------------------------------------------------


def spec_section(lm, groups: dict[str, list[list[int]]], eos: int | None, pad_id: int, args) -> list[dict]:
    rows = []
    n = args.spec_tokens
    for batch in args.batches:
        for group, prompts in groups.items():
            # Batch 1: each prompt on its own; larger batches: the prompts repeated to fill one batch.
            batches = [left_pad([p], pad_id) for p in prompts] if batch == 1 else [prompt_batch(prompts, batch, pad_id)]
            drafters = {spec: parse_speculative(spec) for spec in SPECULATIVE}

            def run(batches, drafter=None):
                return [lm.generate(ids, mask, max_new_tokens=n, eos_token_id=eos, speculative=drafter)
                        for ids, mask in batches]

            candidates = {"plain": partial(run, batches)} | {spec: partial(run, batches, d)
                                                             for spec, d in drafters.items()}
            seconds, outputs = timed(candidates, args.rounds)
            tokens = sum(len(r) for out in outputs["plain"] for r in out)
            for spec, drafter in drafters.items():
                same = sum(a == b for x, y in zip(outputs[spec], outputs["plain"]) for a, b in zip(x, y))
                stats = drafter.stats  # summed over every call: its rates are each call's
                rows.append({"batch": batch, "prompts": group, "drafter": spec,
                             "acceptance": stats.acceptance_rate, "tokens_per_forward": stats.tokens_per_round,
                             "speedup": seconds["plain"] / seconds[spec],
                             "plain_tokens_per_s": tokens / seconds["plain"],
                             "rows_identical": f"{same}/{len(prompts) if batch == 1 else batch}"})
                print(f"  batch {batch:2} {group:18} {spec:22} acceptance {stats.acceptance_rate:.2f}  "
                      f"tokens/forward {rows[-1]['tokens_per_forward']:.2f}  speedup {rows[-1]['speedup']:.2f}x  "
                      f"(plain {rows[-1]['plain_tokens_per_s']:.1f} tok/s)  identical {rows[-1]['rows_identical']}",
                      flush=True)
    return rows


# -- the run ------------------------------------------------------------------------------------


def tiny_lm_dir(tmp: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "tiny-llama")
    return tmp / "tiny-llama"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=DEFAULT_LM, help="SmolLM2 directory (vlmkit import smollm2)")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo/instruct"),
                        help="the demo's final run (its sizes and tokenizer); absent: the demo recipe's sizes")
    parser.add_argument("--sections", default="lm,vlm,quant,spec")
    parser.add_argument("--batches", default="1,16", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--spec-tokens", type=int, default=48, help="answer limit in the speculative section")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="random tiny models: a smoke run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sections = args.sections.split(",")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.rounds} interleaved "
          f"rounds after a warm-up; tokens/s include the prefill")
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            global SPECULATIVE
            SPECULATIVE = ("ngram", "early-exit:layers=2")
            lm_dir, tok = tiny_lm_dir(Path(tmp)), None
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, 320, (int(n),), generator=g).tolist() for n in (12, 20, 31, 9)]
            groups = {"random": prompts}
            pad_id, eos = 0, None
        else:
            if not (args.lm / "config.json").is_file():
                raise SystemExit(f"{args.lm} is not a model directory: run `vlmkit import smollm2 --out {args.lm}`")
            lm_dir, tok = args.lm, load_tokenizer(args.lm)
            processor = VLMProcessor.text_only(tok)
            prompts = [processor.prompt(q, with_image=False).input_ids for q in CHAT]
            groups = {g: [processor.prompt(q, with_image=False).input_ids for q in qs]
                      for g, qs in SPEC_PROMPTS.items()}
            pad_id, eos = tok.pad_id, processor.end_of_turn_id
        demo = resolve_model_dir(args.demo) if (resolve_model_dir(args.demo) / "config.json").is_file() else None
        if "lm" in sections:
            print(f"\n## 1. {lm_dir.name}: vlmkit vs transformers LlamaForCausalLM, {args.new_tokens} new tokens")
            results["lm"] = lm_section(lm_dir, prompts, pad_id, args)
        if "vlm" in sections:
            print(f"\n## 2. demo-sized VLM: vlmkit vs transformers LlavaForConditionalGeneration, {args.new_tokens} "
                  "new tokens")
            results["vlm"] = vlm_section(None if args.tiny else demo, args)
        if "quant" in sections:
            print(f"\n## 3. int8 on {lm_dir.name}")
            results["quant"] = quant_section(lm_dir, prompts, pad_id, args)
        if "spec" in sections:
            dtype = torch.float32 if args.tiny else torch.bfloat16
            print(f"\n## 4. speculative decoding on {lm_dir.name} ({str(dtype).removeprefix('torch.')}), answers up "
                  f"to {args.spec_tokens} tokens")
            lm = load_language_model(lm_dir).eval().to(dtype)
            results["spec"] = spec_section(lm, groups, eos, pad_id, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
