"""Where a request's time goes (`vlmkit profile`): image preprocessing, vision tower, connector, prefill,
time to first token, decode time per token and the total, at several batch sizes; and what an image
costs in tokens and KV-cache bytes at several image sizes.

Stages are timed by forward hooks on the model's own modules around one ordinary `generate` call, so
what is measured is the code path chat and eval run (autocast, quantization, speculative decoding
included), not a re-implementation of it:

- image preprocessing: loading and resizing/normalising the batch's images (one per row)
- vision / connector: the tower's and the connector's forwards
- prefill: the language model's first forward, over the whole prompt (image tokens included)
- time to first token: from the start to the first token's logits (preprocessing, vision, connector,
  embedding and splicing, prefill, the output head)
- decode per token: from the first token to the last, divided by the tokens in between (speculative
  rounds yield several tokens per forward)
- total: the whole request, the answer's tokens as ids at the end

Every row of a batch asks the same question about its own copy of the image; generation runs to
`max_new_tokens` (no end-of-turn stop), so repeats and batch sizes do the same work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.budget import format_bytes, kv_cache_bytes
from vlmkit.data.images import load_image
from vlmkit.data.processor import VLMProcessor
from vlmkit.device import autocast
from vlmkit.models.language import LanguageModel
from vlmkit.models.vlm import VisionLanguageModel

STAGES = ("image_preprocess", "vision", "connector", "prefill", "time_to_first_token", "decode_per_token", "total")
STAGE_NAMES = {"image_preprocess": "image preprocessing", "vision": "vision encoder", "connector": "connector",
               "prefill": "prefill", "time_to_first_token": "time to first token",
               "decode_per_token": "decode, per token", "total": "total"}


class _Clock:
    """Timestamps of module forwards (start and end), in call order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events: list[tuple[str, str, float]] = []  # (module, "start" | "end", seconds)

    def now(self) -> float:
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, module: str, kind: str) -> None:
        self.events.append((module, kind, self.now()))

    def attach(self, modules: dict[str, nn.Module]) -> list:
        handles = []
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.mark(n, "start")))
            handles.append(module.register_forward_hook(lambda *_, n=name: self.mark(n, "end")))
        return handles

    def first(self, module: str, kind: str, after: float = float("-inf")) -> float | None:
        return next((t for m, k, t in self.events if m == module and k == kind and t >= after), None)


def _one_request(model: nn.Module, processor: VLMProcessor, image: str | Path | None, prompt: str, batch: int,
                 max_new_tokens: int, precision: str, speculative: Any, device: torch.device) -> dict[str, float]:
    vlm = model if isinstance(model, VisionLanguageModel) else None
    lm: LanguageModel = vlm.lm if vlm is not None else model
    clock = _Clock(device)
    modules = {"lm": lm, "head": lm.lm_head}
    if vlm is not None:
        modules |= {"vision": vlm.vision, "connector": vlm.connector}
    handles = clock.attach(modules)
    try:
        start = clock.now()
        pixels = None
        if image is not None:
            pixels = torch.stack([processor.preprocess(load_image(image)) for _ in range(batch)]).to(device)
        preprocessed = clock.now()
        sizes = [tuple(pixels.shape[-2:])] if pixels is not None else []
        ids = processor.prompt(prompt, image_sizes=sizes).input_ids
        input_ids = torch.tensor([ids] * batch, device=device)
        extra = {"pixel_values": pixels} if vlm is not None else {}
        with autocast(device, precision):
            tokens = model.generate(input_ids, **extra, max_new_tokens=max_new_tokens, speculative=speculative)
        end = clock.now()
    finally:
        for h in handles:
            h.remove()
    prefill_start, prefill_end = clock.first("lm", "start"), clock.first("lm", "end")
    first_token = clock.first("head", "end", after=prefill_end)
    produced = len(tokens[0])
    times = {"image_preprocess": preprocessed - start, "prefill": prefill_end - prefill_start,
             "time_to_first_token": first_token - start, "total": end - start,
             "decode_per_token": (end - first_token) / (produced - 1) if produced > 1 else float("nan")}
    for stage in ("vision", "connector"):
        began = clock.first(stage, "start")
        times[stage] = clock.first(stage, "end") - began if began is not None else 0.0
    return times


def profile_latency(model: nn.Module, processor: VLMProcessor, prompt: str, image: str | Path | None = None,
                    batch_sizes: Sequence[int] = (1, 8), repeats: int = 5, max_new_tokens: int = 32,
                    precision: str = "bf16", speculative: Any = None,
                    on_run: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Per batch size: median and min seconds of every stage over `repeats` requests (after one warm-up),
    and decode tokens/s (batch / median decode time per token). `image` None: a text-only request."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2 to time decoding, got {max_new_tokens}")
    if image is not None and not processor.has_vision:
        raise ValueError("this model has no vision tower: profile it without an image")
    device = next(model.parameters()).device
    model.eval()
    results = []
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"batch sizes must be positive, got {batch}")
        runs = []
        for r in range(repeats + 1):  # the first run warms up (allocations, kernel choice) and is dropped
            runs.append(_one_request(model, processor, image, prompt, batch, max_new_tokens, precision, speculative,
                                     device))
            if on_run is not None:
                on_run(batch, r)
        runs = runs[1:]
        stages = {s: {"median_s": statistics.median(r[s] for r in runs), "min_s": min(r[s] for r in runs)}
                  for s in STAGES}
        results.append({"batch": batch, "repeats": repeats, "stages": stages,
                        "decode_tokens_per_s": batch / stages["decode_per_token"]["median_s"]})
    return results


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    """KV-cache bytes one position of one sequence takes: keys and values of every layer."""
    cfg = (model.lm if isinstance(model, VisionLanguageModel) else model).config
    bytes_per_value = torch.empty(0, dtype=dtype).element_size()
    return kv_cache_bytes(1, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, bytes_per_value)


def image_costs(model: nn.Module, dtype: torch.dtype, sizes: Sequence[int] | None = None, text_tokens: int = 0,
                new_tokens: int = 0, batch: int = 1) -> list[dict[str, Any]]:
    """Per square image size: the connector's tokens, the `<image>` placeholders they take in the sequence
    and the KV-cache bytes of those placeholders, and of a whole request (`batch` rows of `text_tokens` +
    the image + `new_tokens`). `sizes` default: half, once, twice and four times the configured size,
    in whole patches. Sizes the model cannot take are listed with the reason."""
    per_token = kv_bytes_per_token(model, dtype)
    if not isinstance(model, VisionLanguageModel):
        return [{"image_size": None, "connector_tokens": 0, "placeholders": 0, "kv_bytes_image": 0,
                 "kv_bytes_request": batch * (text_tokens + new_tokens) * per_token}]
    vision = model.config.vision
    if sizes is None:
        sizes = sorted({max(vision.patch_size, round(vision.image_size * f / vision.patch_size) * vision.patch_size)
                        for f in (0.5, 1, 2, 4)})
    rows = []
    for size in sizes:
        try:
            tokens, placeholders = model.connector_token_count(size, size), model.image_token_count(size, size)
        except (ValueError, RuntimeError) as err:
            rows.append({"image_size": size, "error": str(err)})
            continue
        rows.append({"image_size": size, "connector_tokens": tokens, "placeholders": placeholders,
                     "kv_bytes_image": placeholders * per_token,
                     "kv_bytes_request": batch * (text_tokens + placeholders + new_tokens) * per_token})
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds == seconds else "-"


def markdown(report: dict[str, Any]) -> str:
    """The latency table (ms, median / min per batch size) and the image-cost table."""
    runs = report["latency"]
    header = "| stage | " + " | ".join(f"batch {r['batch']}: median | min" for r in runs) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(runs)]
    for stage in STAGES:
        if stage in ("vision", "connector", "image_preprocess") and not report.get("image"):
            continue
        cells = " | ".join(f"{_ms(r['stages'][stage]['median_s'])} | {_ms(r['stages'][stage]['min_s'])}" for r in runs)
        lines.append(f"| {STAGE_NAMES[stage]} (ms) | {cells} |")
    lines.append("| decode tokens/s, all rows | " + " | ".join(f"{r['decode_tokens_per_s']:.1f} | -" for r in runs)
                 + " |")
    costs = report["image_costs"]
    dtype = report["kv_dtype"]
    image = "" if costs and costs[0]["image_size"] is None else " + image"
    lines += ["", f"KV cache: {format_bytes(report['kv_bytes_per_token'])} per token ({dtype}); a request = "
                  f"{report['text_tokens']} text{image} + {report['max_new_tokens']} new tokens, batch 1", ""]
    if not image:  # a language model: no image sizes
        lines.append(f"KV cache of the request: {format_bytes(costs[0]['kv_bytes_request'])}")
        return "\n".join(lines)
    lines += ["| image size | connector tokens | placeholders | KV bytes, image | KV bytes, request |",
              "|---:|---:|---:|---:|---:|"]
    for row in costs:
        if "error" in row:
            lines.append(f"| {row['image_size']} | not supported: {row['error']} | | | |")
        else:
            lines.append(f"| {row['image_size']} | {row['connector_tokens']} | {row['placeholders']} | "
                         f"{format_bytes(row['kv_bytes_image'])} | {format_bytes(row['kv_bytes_request'])} |")
    return "\n".join(lines)
