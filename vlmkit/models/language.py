"""Decoder-only LM of the Llama / Qwen2 / SmolLM2 family (its caches: models/kv_cache.py; token choice:
models/sampling.py)."""

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
from vlmkit.models.kernels import compute_dtype, joint_linear
from vlmkit.models.kv_cache import KVCache, LayerContext, SlotCache, SlotStep
from vlmkit.models.memory import run_block
from vlmkit.models.sampling import cut_at, sample_next


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps)  # the same numbers, a shorter backward
        # Normalise in fp32 (as the reference implementations do), scale in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm of an fp32 input with a hand-written backward: the forward computes exactly what
    `RMSNorm.forward` does, the backward takes about half the time of autograd's (fewer passes over x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * scale
        ctx.save_for_backward(normed, scale, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, scale, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = grad * weight
            # d/dx of x * rsqrt(mean(x^2)): scale * (g - normed * mean(g * normed))
            grad_x = torch.addcmul(g, normed, (g * normed).mean(-1, keepdim=True), value=-1).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)
        return grad_x, grad_weight, None


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
    # LanguageModel.forward makes cos/sin in the compute dtype (bf16 under autocast); keep q/k's dtype anyway.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


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

    def forward(self, x, cos, sin, mask: torch.Tensor | None, cache: KVCache | None,
                varlen: Varlen | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = joint_linear(x, self.q_proj, self.k_proj, self.v_proj)
        if varlen is not None:  # x is the flat stream [1, T, D]: attention sees one sample per row
            (q, k, v), b, n = (varlen.pad(t) for t in (q, k, v)), varlen.samples, varlen.width
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        # k, v keep their num_kv_heads heads: attention shares each among its group of query heads.
        # Without a mask the plain causal kernel applies (training, unpadded prefill).
        out = attention(q, k, v, mask, causal=mask is None and n > 1, record=self.record)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out if varlen is None else varlen.unpad(out))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), without biases (also the perceiver connector's)."""

    def __init__(self, dim: int, intermediate_size: int, out_dim: int | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, out_dim or dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = joint_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, context: LayerContext | None = None,
                varlen: Varlen | None = None) -> torch.Tensor:
        if context is not None:  # a fusion's adapter for this layer, e.g. cross-attention to the image
            x = context.apply(self.layer_index, x, cache.length if cache is not None else 0)
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache, varlen)
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


@dataclass
class Varlen:
    """A batch run as one flat stream of its real tokens (no padding), sample by sample.

    The linear layers, norms and MLPs see only the T real tokens, as [1, T, D]; attention sees each
    sample in its own row of a [samples, width] layout (width: the longest sample), causal, positions
    from 0. So no token attends to another sample or to padding, and no work goes to padding except
    attention's, which is what padding one sample per row would cost. Built from `segment_ids` [B, L]
    (0: padding; a run of equal ids within a row: one sample), e.g. rows packed by `data.packing`.
    """

    real: torch.Tensor  # [T] index into the B * L positions of each real token, in order
    gather: torch.Tensor  # [samples * width] the real token at (sample, j); past a sample's end its last one
    scatter: torch.Tensor  # [T] index into samples * width of each real token
    positions: torch.Tensor  # [T] each token's position within its sample
    samples: int
    width: int

    @classmethod
    def from_segments(cls, segment_ids: torch.Tensor) -> Varlen:
        flat = segment_ids.reshape(-1)
        real = (flat > 0).nonzero().squeeze(1)
        ids, row = flat[real], real // segment_ids.shape[1]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = (ids[1:] != ids[:-1]) | (row[1:] != row[:-1])
        starts = first.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=starts.new_tensor([len(ids)]))
        width = int(lengths.max())
        sample = first.long().cumsum(0) - 1
        positions = torch.arange(len(ids), device=flat.device) - starts[sample]
        j = torch.arange(width, device=flat.device)
        gather = (starts[:, None] + torch.minimum(j[None], lengths[:, None] - 1)).reshape(-1)
        return cls(real, gather, sample * width + positions, positions, len(starts), width)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[1, T, C] -> [samples, width, C]."""
        return t[0].index_select(0, self.gather).view(self.samples, self.width, -1)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """[samples, width, C] -> [1, T, C] (what lies past each sample's end is dropped)."""
        return t.reshape(self.samples * self.width, -1).index_select(0, self.scatter)[None]


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
        self.activation_checkpointing = False  # recompute each layer in the backward (see models/memory.py)
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

    def new_slot_cache(self, num_slots: int, max_length: int, device=None, dtype=None,
                       initial_length: int = 64) -> SlotCache:
        weight = self.embed_tokens.weight
        return SlotCache(self.config, num_slots, max_length, device or weight.device, dtype or weight.dtype,
                         initial_length)

    @torch.no_grad()
    def prefill_slots(self, cache: SlotCache, slots: Sequence[int], inputs_embeds: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, context: LayerContext | None = None) -> torch.Tensor:
        """Run left-padded prompts [n, L, D] (`attention_mask` [n, L]) and write each row's keys/values
        into its free slot of `cache`; returns the final normed hidden state of each row's last token [n, D].

        Each slot receives only its row's real tokens, at positions 0.., as if prefilled alone; the
        slot keeps the row's share of `context` for its decode steps.
        """
        n, width, _ = inputs_embeds.shape
        if len(slots) != n:
            raise ValueError(f"{n} prompts but {len(slots)} slots")
        if attention_mask is None:
            attention_mask = torch.ones(n, width, dtype=torch.long, device=inputs_embeds.device)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
        busy = [s for s in slots if cache.lengths[s]]
        if busy:
            raise ValueError(f"slots {busy} are in use: release them first")
        lengths = attention_mask.long().sum(dim=1).tolist()
        cache.reserve(max(lengths))
        scratch = self.new_cache(n, width, dtype=cache.keys[0].dtype)
        hidden = self(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), cache=scratch,
                      context=context, logits=False).hidden_states[:, -1]
        for layer in range(len(self.layers)):
            for row, (slot, length) in enumerate(zip(slots, lengths)):
                cache.keys[layer][slot, :, :length] = scratch.keys[layer][row, :, width - length :]
                cache.values[layer][slot, :, :length] = scratch.values[layer][row, :, width - length :]
        row_contexts = context.rows() if context is not None else [None] * n
        for slot, length, row_context in zip(slots, lengths, row_contexts):
            cache.lengths[slot], cache.contexts[slot] = length, row_context
        return hidden

    @torch.no_grad()
    def decode_slots(self, cache: SlotCache, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Advance each of `slots` by one token (`token_ids` [n], one per slot, each at its slot's own
        position); returns the final normed hidden states [n, D] (`lm_head` of them: next-token logits)."""
        slots = list(slots)
        empty = [s for s in slots if not cache.lengths[s]]
        if empty:
            raise ValueError(f"slots {empty} hold no sequence: prefill them first")
        step = SlotStep(cache, slots)
        x = self.embed_tokens(token_ids.reshape(-1, 1))
        cos, sin = self.rotary(step.positions[:, None], x.dtype)
        context = LayerContext.stack([cache.contexts[s] for s in slots])
        for layer in self.layers:
            x = layer(x, cos, sin, step.mask, step, context)
        for s in slots:
            cache.lengths[s] += 1
        return self.norm(x)[:, 0]

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
        segment_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> LMOutput:
        """Run the decoder.

        `attention_mask` [B, past + L] marks real tokens (1) vs padding (0). `segment_ids` [B, L] (no
        cache, no attention_mask, no context) marks rows that may each hold several samples (packed) and
        padding (0): the model then runs on the real tokens only, each sample with its own positions from
        0 and causal attention within it (see `Varlen`); the first label of each sample must be
        IGNORE_INDEX (nothing before it may predict it), and padded positions come out as zeros in
        `hidden_states` (and as zero logits). With `labels` [B, L]
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
        if segment_ids is not None:
            return self._forward_varlen(x, segment_ids, labels, logits, (attention_mask, position_ids, cache, context))
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past:]
            else:
                position_ids = torch.arange(past, past + n, device=x.device).expand(b, n)
        cos, sin = self.rotary(position_ids, compute_dtype(x))  # cast once, not in every layer
        mask = attention_mask_for(attention_mask, n, past)
        if mask is None and past > 0 and n > 1:
            # Chunked prefill on top of a cache needs an explicit causal mask.
            mask = attention_mask_for(torch.ones(b, past + n, dtype=torch.long, device=x.device), n, past)
        if cache is not None:
            if context is not None:
                cache.context = context
            context = cache.context
        for layer in self.layers[:num_layers]:
            x = run_block(self, layer, x, cos, sin, mask, cache, context)
        if cache is not None:
            cache.length += n
        h = self.norm(x)
        loss = self.loss(h, labels) if labels is not None else None
        return LMOutput(logits=self.lm_head(h) if logits else None, loss=loss, hidden_states=h)

    def _forward_varlen(self, x: torch.Tensor, segment_ids: torch.Tensor, labels: torch.Tensor | None,
                        logits: bool, unsupported: tuple) -> LMOutput:
        """`forward` on the real tokens of `segment_ids`' samples, as one flat stream (see `Varlen`)."""
        if any(value is not None for value in unsupported):
            raise ValueError("segment_ids go without attention_mask, position_ids, a cache or a layer context")
        b, n, d = x.shape
        varlen = Varlen.from_segments(segment_ids)
        flat = x.reshape(b * n, d).index_select(0, varlen.real)[None]
        positions = torch.arange(varlen.width, device=x.device)[None]
        cos, sin = self.rotary(positions, compute_dtype(x))
        for layer in self.layers:
            flat = run_block(self, layer, flat, cos, sin, None, None, None, varlen)
        h = self.norm(flat)[0]
        loss = None
        if labels is not None:  # each token's next label in its row (a sample's last token: the next one's first)
            following = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
            loss = self.token_loss(h, following.reshape(-1).index_select(0, varlen.real))
        hidden = h.new_zeros(b * n, d).index_copy(0, varlen.real, h).view(b, n, d)
        return LMOutput(logits=self.lm_head(hidden) if logits else None, loss=loss, hidden_states=hidden)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose next label is not IGNORE_INDEX."""
        return self.token_loss(hidden[:, :-1], labels[:, 1:])

    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the tokens `targets` over the positions where it is not IGNORE_INDEX."""
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[keep])
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
            # The cache holds keys/values in the dtype they are computed in (autocast's when it is on): a wider
            # cache would only be cast back, whole, at every step.
            cache = self.new_cache(b, prompt_len + max_new_tokens, dtype=compute_dtype(embeds)) if use_cache else None
            hidden = self(inputs_embeds=embeds, attention_mask=mask, cache=cache, context=context,
                          logits=False).hidden_states[:, -1]
            new_tokens = torch.empty(b, 0, dtype=torch.long, device=device)
            done = torch.zeros(b, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                next_token = sample_next(self.lm_head(hidden).float(), temperature, top_p, generator)
                new_tokens = torch.cat([new_tokens, next_token[:, None]], dim=1)
                if eos_token_id is not None:
                    done |= next_token == eos_token_id
                    if bool(done.all()):
                        break
                if step == max_new_tokens - 1:
                    break  # the last token needs no forward of its own
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                step_embeds = self.embed_tokens(next_token[:, None])
                if cache is not None:  # the cache carries the context from the prefill
                    out = self(inputs_embeds=step_embeds, attention_mask=mask, cache=cache, logits=False)
                else:
                    embeds = torch.cat([embeds, step_embeds], dim=1)
                    out = self(inputs_embeds=embeds, attention_mask=mask, context=context, logits=False)
                hidden = out.hidden_states[:, -1]
            return [cut_at(row, eos_token_id) for row in new_tokens.tolist()]
