"""Scaled dot-product attention with a CPU-friendly path for bf16 training.

On CPU, PyTorch's fused SDPA kernel is 2-4x slower than plain matmul + softmax for the short
sequences and bf16 autocast used here (fwd+bwd, measured at [64, 4, 41, 64]: 37 ms vs 8 ms). So
half-precision inputs on CPU take the explicit path when gradients are on, and at inference for
fewer than 16 queries (decode steps, speculative checks: 4-9x faster at batch 16, e.g. [16, 9, 1, 80]
0.13 ms vs 1.2 ms); a longer inference prefill takes SDPA (2x faster at [16, 4, 90, 90]). Everything
else (fp32, CUDA) uses SDPA.

The explicit path is written for few passes over the [B, H, Lq, Lk] scores, which dominate its time
at a few hundred tokens: the causal mask is added inside the score matmul (`baddbmm`), and the softmax
runs in the inputs' dtype (PyTorch's CPU kernel computes it in fp32 and rounds the result once, as a
softmax in fp32 followed by a cast would; its backward then reads the rounded probabilities). Measured
fwd+bwd at [16, 8, 331, 64] causal bf16: 138 ms, against 340 ms with a masked_fill and an fp32 softmax.

Grouped-query attention (fewer k/v heads than q heads) needs no copies of k and v: the explicit path
stacks each k/v head's query heads along the sequence axis, SDPA gets `enable_gqa`. A KV-cached decode
step would otherwise copy the whole cache of every layer.

A float `mask` (a bias such as token merging's log token sizes) takes the general branch of the explicit
path: it is added to the scores in place of the causal `baddbmm`, so biased calls never hit the causal
fast path.

For diagnostics, a `record` callback receives the attention probabilities; it forces the explicit
path (fused kernels never materialise them), computes them in fp32, and costs nothing when not given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, impl: str = "auto",
              record: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for [B, H, L, d] inputs. `mask` is boolean (True = may attend)
    or a float bias added to the logits (e.g. log token sizes under token merging), broadcastable to
    [B, H, Lq, Lk].

    `k` and `v` may have fewer heads than `q` (grouped-query attention): query head h reads key/value
    head h // (H_q / H_kv), as if they were repeated that many times (without making the copies).
    `record`, when given, is called with the fp32 probabilities ``[B, H, Lq, Lk]`` (rows sum to 1).
    """
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if record is not None:
        impl = "math"
    elif impl == "auto":
        cpu_half = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        impl = "math" if cpu_half and (torch.is_grad_enabled() or q.shape[-2] < 16) else "sdpa"
    groups = heads // kv_heads
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # SDPA takes a float bias only in the query's dtype
    if impl == "sdpa":
        n, m = q.shape[-2], k.shape[-2]
        if causal and mask is None and n != m:
            # Queries are the last n of m positions (a chunk after a KV cache). SDPA's is_causal aligns
            # them with the first n instead, so only a square causal pattern may go to it as is_causal.
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              enable_gqa=groups > 1)
    b, h, n, d = q.shape
    m = k.shape[-2]
    # Each key/value head's query heads one after another: [B, H_kv, groups * Lq, d]. Scale q rather
    # than the scores: [.., L, d] is smaller than [.., L, L] once L > d.
    q = (q * d**-0.5).reshape(b, h // groups, groups * n, d)
    if causal and mask is None and n > 1:
        allowed = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        bias = torch.zeros(n, m, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        scores = torch.baddbmm(bias.repeat(groups, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(-1, -2))
        scores = scores.view(b, h // groups, groups * n, m)
    else:
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            mask = mask.expand(b, h, n, m).reshape(b, h // groups, groups * n, m)
            scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    if record is None:
        return (torch.softmax(scores, dim=-1) @ v).view(b, h, n, d)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    record(probs.view(b, h, n, m))
    return (probs.to(v.dtype) @ v).view(b, h, n, d)
