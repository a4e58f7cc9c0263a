"""Decoder-only LM of the Llama / Qwen2 / SmolLM2 family, with a preallocated KV cache."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import LanguageConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.attention import attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the reference implementations do), scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, L, head_dim] for integer positions [B, L]."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, L, head_dim/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Under autocast q/k are bf16 while cos/sin follow the fp32 residual stream: keep q/k's dtype.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class LayerContext:
    """What a fusion (see models/fusion.py) hands to the decoder layers for one sequence batch.

    Layer i starts with ``hidden = adapters[i](hidden, value, start)`` (an entry may be None: that layer
    is left alone). `start` is the sequence index of `hidden`'s first position: 0 at a prefill or an
    uncached forward, the cache's length at a KV-cached step, so an adapter whose effect depends on
    where a token sits (e.g. which image precedes it) knows which positions it is given. The adapters
    are modules owned by the fusion, outside the LM, so the LM's parameters and state-dict keys never
    depend on the fusion.
    """

    adapters: Sequence[Callable[[torch.Tensor, Any, int], torch.Tensor] | None]
    value: Any

    def apply(self, layer_index: int, hidden: torch.Tensor, start: int = 0) -> torch.Tensor:
        adapter = self.adapters[layer_index]
        return hidden if adapter is None else adapter(hidden, self.value, start)


class KVCache:
    """Keys/values for every layer, preallocated to `max_length` so decoding never reallocates.

    It also keeps the layer context given with its prefill, so every cached decode step sees it too.
    """

    def __init__(self, cfg: LanguageConfig, batch_size: int, max_length: int, device, dtype: torch.dtype):
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0  # positions filled so far (advanced once per forward, after the last layer)
        self.max_length = max_length
        self.context: LayerContext | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions > max_length {self.max_length}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (speculative decoding drops rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length


class Attention(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.record: Callable[[torch.Tensor], None] | None = None  # set by `recording_attention`

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        # k, v keep their num_kv_heads heads (grouped-query attention); without a mask the plain causal
        # kernel applies (training, unpadded prefill).
        out = attention(q, k, v, mask, causal=mask is None and n > 1, record=self.record)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), without biases (also the perceiver connector's)."""

    def __init__(self, dim: int, intermediate_size: int, out_dim: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, out_dim or dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, context: LayerContext | None = None) -> torch.Tensor:
        if context is not None:  # a fusion's adapter for this layer, e.g. cross-attention to the image
            x = context.apply(self.layer_index, x, cache.length if cache is not None else 0)
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_norm(x))


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, L, V]; None when only the loss was asked for
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final normed hidden states [B, L, D]


@contextlib.contextmanager
def recording_attention(model: LanguageModel, on_probs: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, every forward of every attention layer calls ``on_probs(layer_index, probs)``
    with its probabilities ``[B, num_heads, queries, keys]`` (fp32; keys include cached positions).

    Layers are called in order, so ``layer_index == 0`` starts a new forward pass. Recording uses the
    explicit softmax path, which matches SDPA to float rounding; outside the block nothing changes.
    """
    layers = [layer.attn for layer in model.layers]
    for attn in layers:
        attn.record = partial(on_probs, attn.layer_index)
    try:
        yield
    finally:
        for attn in layers:
            attn.record = None


def attention_mask_for(attention_mask: torch.Tensor | None, query_length: int, past_length: int) -> torch.Tensor | None:
    """Boolean SDPA mask [B, 1, q, k] combining causality with key padding, or None if no padding.

    `attention_mask` is [B, past_length + query_length] with 1 for real tokens. Each query may
    always see itself, so rows of left padding never become all-masked (which would give NaNs).
    """
    total = past_length + query_length
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {total}")
    if attention_mask is None or bool(attention_mask.all()):
        return None
    device = attention_mask.device
    q_pos = torch.arange(past_length, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    causal = k_pos <= q_pos  # [q, k]
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LanguageModel(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_length: int, device=None, dtype=None) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_length, device or weight.device, dtype or weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits: bool = True,
        context: LayerContext | None = None,
        num_layers: int | None = None,
    ) -> LMOutput:
        """Run the decoder.

        `attention_mask` [B, past + L] marks real tokens (1) vs padding (0). With `labels` [B, L]
        (IGNORE_INDEX where no loss), the next-token loss is computed on labelled positions only;
        `logits=False` then skips the full-vocabulary projection elsewhere (a large saving when
        most tokens are image or prompt tokens). `context` (from a fusion) reaches every layer; given
        with a `cache`, the cache keeps it for the later steps, which may then omit it. `num_layers` runs
        only the first layers, then the final norm (and head): a self-speculative draft of the model.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + n, device=x.device).expand(b, n)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = attention_mask_for(attention_mask, n, past)
        if mask is None and past > 0 and n > 1:
            # Chunked prefill on top of a cache needs an explicit causal mask.
            mask = attention_mask_for(torch.ones(b, past + n, dtype=torch.long, device=x.device), n, past)
        if cache is not None:
            if context is not None:
                cache.context = context
            context = cache.context
        for layer in self.layers[:num_layers]:
            x = layer(x, cos, sin, mask, cache, context)
        if cache is not None:
            cache.length += n
        h = self.norm(x)
        loss = self.loss(h, labels) if labels is not None else None
        return LMOutput(logits=self.lm_head(h) if logits else None, loss=loss, hidden_states=h)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose next label is not IGNORE_INDEX."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep])
        if logits.shape[0] == 0:
            return hidden.sum() * 0.0  # nothing to learn in this batch; keeps the graph valid
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        context: LayerContext | None = None,
        speculative: Any = None,
        prompt_ids: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Generate up to `max_new_tokens` per row; rows are left-padded prompts (ids or embeddings).

        Greedy when `temperature` == 0, else temperature + nucleus (top-p) sampling. Returns each
        row's new tokens, cut before the first `eos_token_id`. `context` (a fusion's, e.g. the image)
        reaches the layers at the prefill and at every decode step. `speculative` (a drafter of
        models/speculative.py; greedy only) proposes tokens that one forward verifies: the result is
        plain greedy decoding's. `prompt_ids` [B, L] are the prompt's ids when `inputs_embeds` are given,
        for drafters that read the text.
        """
        # Autocast keeps its low-precision copies of the weights only outside inference mode; inside it,
        # every decode step would cast every weight again (most of a bf16 step's time on SmolLM2-135M).
        with torch.inference_mode(False), torch.no_grad():
            embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            b, prompt_len, _ = embeds.shape
            device = embeds.device
            if attention_mask is None:
                attention_mask = torch.ones(b, prompt_len, dtype=torch.long, device=device)
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
            mask = attention_mask.long()
            if speculative is not None:
                if temperature > 0 or not use_cache:
                    raise ValueError("speculative decoding is greedy and KV-cached: use temperature 0 and use_cache")
                ids = input_ids if prompt_ids is None else prompt_ids
                return speculative.generate(self, embeds, mask, ids, max_new_tokens, eos_token_id, context)
            cache = self.new_cache(b, prompt_len + max_new_tokens, dtype=cache_dtype(embeds)) if use_cache else None
            hidden = self(inputs_embeds=embeds, attention_mask=mask, cache=cache, context=context,
                          logits=False).hidden_states[:, -1]
            new_tokens = torch.empty(b, 0, dtype=torch.long, device=device)
            done = torch.zeros(b, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                next_token = _pick(self.lm_head(hidden).float(), temperature, top_p, generator)
                new_tokens = torch.cat([new_tokens, next_token[:, None]], dim=1)
                if eos_token_id is not None:
                    done |= next_token == eos_token_id
                    if bool(done.all()):
                        break
                if step == max_new_tokens - 1:
                    break  # the last token needs no forward of its own
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                step = self.embed_tokens(next_token[:, None])
                if cache is not None:  # the cache carries the context from the prefill
                    out = self(inputs_embeds=step, attention_mask=mask, cache=cache, logits=False)
                else:
                    embeds = torch.cat([embeds, step], dim=1)
                    out = self(inputs_embeds=embeds, attention_mask=mask, context=context, logits=False)
                hidden = out.hidden_states[:, -1]
            return [cut_at(row, eos_token_id) for row in new_tokens.tolist()]


def cache_dtype(embeds: torch.Tensor) -> torch.dtype:
    """The KV cache's dtype: autocast's when it is on (keys and values are computed in it; a wider cache
    would only be cast back, whole, at every step), else the embeddings'."""
    device = embeds.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else embeds.dtype


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens
