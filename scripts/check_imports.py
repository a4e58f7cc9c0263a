"""Check `vlmkit import smollm2` and `vlmkit import dinov2-small` against independent implementations.

    python scripts/check_imports.py [--models-dir DIR]

1. SmolLM2: transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`) vs the converted
   directory loaded by transformers: weights and logits; transformers' GGUF tokenizer vs ours.
2. SmolLM2: vlmkit's own LM (`vlmkit.load_language_model` + `load_tokenizer`) vs transformers on the
   same prompt, and a greedy answer to "What is the capital of France?" that must mention Paris.
3. `vlmkit chat <smollm2-dir> "What is the capital of France?"` (text-only) mentions Paris.
4. DINOv2: ONNX Runtime's backbone output (the graph's final-LayerNorm output, added as a graph
   output) vs transformers' Dinov2Model and vlmkit's ViT from the converted directory, on a real
   photo (scikit-image's astronaut, 224 px, ImageNet-normalised). Must agree within 1e-4.

Needs transformers, accelerate, gguf, onnx, onnxruntime and scikit-image (the last two only here).
Prints one line per measurement and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vlmkit
from vlmkit.hf.importers import SOURCES, import_model

QUESTION = "What is the capital of France?"
SAMPLE_TEXTS = [QUESTION, "In 2024, 1234567 apples cost $3.50!", "  two spaces\n\nnew lines\ttabs",
                "héllo wörld 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n"]
VISION_TOLERANCE = 1e-4
failures: list[str] = []


def report(name: str, value, ok: bool) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}")
    if not ok:
        failures.append(name)


def render_chat(template: str, messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


@torch.no_grad()
def greedy(lm, ids: list[int], eos_id: int, max_new_tokens: int = 40) -> list[int]:
    """Greedy decoding with vlmkit's LM and its KV cache."""
    cache = lm.new_cache(1, len(ids) + max_new_tokens)
    logits = lm(torch.tensor([ids]), cache=cache).logits[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token == eos_id:
            break
        out.append(token)
        logits = lm(torch.tensor([[token]]), cache=cache).logits[:, -1]
    return out


def check_smollm2(directory: Path) -> None:
    import transformers

    gguf_file = SOURCES["smollm2"].model_file()
    t = time.perf_counter()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    converted = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    print(f"     (transformers loads: {time.perf_counter() - t:.1f} s)")
    ref_state, our_state = reference.state_dict(), converted.state_dict()
    report("smollm2 weight names, transformers GGUF vs converted", "same" if set(ref_state) == set(our_state)
           else sorted(set(ref_state) ^ set(our_state))[:5], set(ref_state) == set(our_state))
    weight_diff = max((ref_state[k] - our_state[k]).abs().max().item() for k in ref_state)
    report("smollm2 max abs weight difference", f"{weight_diff:.3g}", weight_diff == 0.0)

    tok = vlmkit.load_tokenizer(directory)
    same = [ref_tok.encode(s, add_special_tokens=False) == tok.encode(s) for s in SAMPLE_TEXTS]
    report("smollm2 tokenizer, transformers GGUF vs vlmkit", f"{sum(same)}/{len(same)} texts encode alike", all(same))
    messages = [{"role": "user", "content": QUESTION}]
    prompt = render_chat(tok.chat_template, messages)
    ref_prompt = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    report("smollm2 chat template rendering, vlmkit vs transformers", repr(prompt[-60:]), prompt == ref_prompt)
    ids = tok.encode(prompt)

    lm = vlmkit.load_language_model(directory).eval()
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits
        conv_logits = converted(torch.tensor([ids])).logits
        our_logits = lm(torch.tensor([ids])).logits
    diff = (ref_logits - conv_logits).abs().max().item()
    report("smollm2 max abs logit difference, transformers GGUF vs converted", f"{diff:.3g}", diff == 0.0)
    diff = (ref_logits - our_logits).abs().max().item()
    report("smollm2 max abs logit difference, transformers GGUF vs vlmkit LM (fp32)", f"{diff:.3g}", diff < 1e-3)

    t = time.perf_counter()
    answer_ids = greedy(lm, ids, tok.eos_id)
    answer = tok.decode(answer_ids)
    seconds = time.perf_counter() - t
    ref_ids = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    ref_answer = ref_tok.decode(ref_ids, skip_special_tokens=True)
    report(f"smollm2 vlmkit greedy answer to {QUESTION!r} ({len(answer_ids)} tokens, {seconds:.2f} s)",
           repr(answer), "Paris" in answer)
    report("smollm2 same answer from transformers (GGUF) greedy", repr(ref_answer),
           ref_answer.strip() == answer.strip())


def check_chat_command(directory: Path) -> None:
    command = [sys.executable, "-m", "vlmkit.cli", "chat", str(directory), QUESTION]
    t = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    answer = result.stdout.strip()
    report(f"`vlmkit chat <smollm2> {QUESTION!r}` ({time.perf_counter() - t:.1f} s, exit {result.returncode})",
           repr(answer or result.stderr.strip()[-200:]), result.returncode == 0 and "Paris" in answer)


def astronaut_pixels(size: int = 224) -> np.ndarray:
    from PIL import Image
    from skimage import data

    from vlmkit.hf.importers.onnx_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    image = Image.fromarray(data.astronaut()).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(image, dtype=np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def onnx_backbone_output(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """The backbone's last hidden state: the output of its final LayerNorm, exposed as a graph output."""
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path))
    last = next(n.output[0] for n in reversed(model.graph.node) if n.name.startswith("/backbone/layernorm/"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    print(f"     (ONNX backbone output: {last})")
    return session.run([last], {session.get_inputs()[0].name: pixels})[0]


def check_dinov2(directory: Path) -> None:
    import transformers

    pixels = astronaut_pixels()
    reference = onnx_backbone_output(SOURCES["dinov2-small"].model_file(), pixels)
    hf = transformers.Dinov2Model.from_pretrained(directory).eval()
    vit = vlmkit.load_vision_tower(directory).eval()
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        hf_out = hf(x).last_hidden_state.numpy()
        ours = vit.post_layernorm(vit.hidden_states(x)[-1]).numpy()
    print(f"     (output {tuple(reference.shape)}, max |value| {np.abs(reference).max():.2f})")
    diff = float(np.abs(reference - hf_out).max())
    report("dinov2 max abs difference, ONNX Runtime vs transformers Dinov2Model", f"{diff:.3g}",
           diff < VISION_TOLERANCE)
    diff = float(np.abs(reference - ours).max())
    report("dinov2 max abs difference, ONNX Runtime vs vlmkit ViT", f"{diff:.3g}", diff < VISION_TOLERANCE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", help="where the imports live or go (default: the vlmkit cache)")
    parser.add_argument("--only", choices=["smollm2", "dinov2"], help="run one family of checks")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name, check in (("smollm2", check_smollm2), ("dinov2-small", check_dinov2)):
        if args.only and not name.startswith(args.only):
            continue
        out = Path(args.models_dir) / name if args.models_dir else None
        directory, _ = import_model(name, out, log=lambda m: print(f"     ({m})"))
        print(f"== {name}: {directory}")
        check(directory)
        if name == "smollm2":
            check_chat_command(directory)
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
