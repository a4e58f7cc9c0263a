"""Flamingo-style gated cross-attention (Alayrac et al., 2022): the blocks the `cross_attention` fusion
places before LM blocks, and which image tokens each text position may read.

A block is ``x + tanh(a) * attend(norm(x), image tokens)`` then ``x + tanh(b) * ffn(norm(x))`` with the
gates a and b starting at 0, so a pretrained LM computes exactly what it did until training opens them.
The norms and the FFN are the LM's own classes (RMSNorm, SwiGLU MLP), sized by the LM's config; the
attention is `vlmkit.models.attention.attention`.

Which images a position reads (Flamingo's media locations): each image is one `<image>` marker in the
text; a position reads the tokens of the latest image whose marker is at or before it (a marker reads
its own image), or with ``all_previous`` of every image at or before it. Positions before a row's first
image read nothing, and a block leaves them unchanged: Flamingo still runs its FFN on them, but skipping
it makes text before an image compute exactly as it would in a batch without images (where no block
runs at all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlmkit.config import LanguageConfig
from vlmkit.models.attention import attention
from vlmkit.models.language import MLP, RMSNorm

__all__ = ["CrossAttention", "GatedCrossAttentionBlock", "ImageContext"]


@dataclass
class ImageContext:
    """The cross-attention blocks' layer-context value: each row's image tokens, and for each position
    of the fused sequence the latest image at or before it. Positions past that sequence (KV-cached or
    uncached decode steps) come after every marker, so they see the row's last image."""

    tokens: torch.Tensor  # [B, K, D] each row's images' tokens one after another, zero-padded
    image_of_token: torch.Tensor  # [B, K] which of its row's images each token belongs to (-1: padding)
    latest: torch.Tensor  # [B, L] index (within the row) of the latest image at or before each position; -1: none
    all_previous: bool = False  # read every image at or before a position, not only the latest

    @classmethod
    def build(cls, images: list[torch.Tensor], is_marker: torch.Tensor, all_previous: bool = False) -> ImageContext:
        """`images`: one [T_i, D] per marker of `is_marker` [B, L], in reading order (row by row)."""
        per_row = is_marker.sum(dim=1).tolist()
        if sum(per_row) != len(images):
            raise ValueError(f"{sum(per_row)} image markers but {len(images)} images")
        device, empty = is_marker.device, images[0][:0]
        rows, owners, start = [], [], 0
        for n in per_row:
            mine, start = images[start : start + n], start + n
            rows.append(torch.cat(mine) if mine else empty)
            sizes = torch.tensor([t.shape[0] for t in mine], dtype=torch.long, device=device)
            owners.append(torch.arange(n, device=device).repeat_interleave(sizes))
        return cls(tokens=pad_sequence(rows, batch_first=True),
                   image_of_token=pad_sequence(owners, batch_first=True, padding_value=-1),
                   latest=is_marker.long().cumsum(dim=1) - 1, all_previous=all_previous)

    def rows(self) -> list[ImageContext]:
        """Each row's context as its decode steps see it (after every marker: the row's last image), for
        continuous batching (see `LayerContext.rows`)."""
        return [ImageContext(self.tokens[i : i + 1], self.image_of_token[i : i + 1], self.latest[i : i + 1, -1:],
                             self.all_previous) for i in range(self.tokens.shape[0])]

    @classmethod
    def stack(cls, contexts: list[ImageContext | None]) -> ImageContext:
        """One-row contexts (from `rows`) as one batch; None: a row without images, which reads nothing."""
        present = [c for c in contexts if c is not None]
        width = max(c.tokens.shape[1] for c in present)
        template = present[0].tokens
        tokens, owners, latest = [], [], []
        for c in contexts:
            if c is None:
                tokens.append(template.new_zeros(1, width, template.shape[2]))
                owners.append(torch.full((1, width), -1, dtype=torch.long, device=template.device))
                latest.append(torch.full((1, 1), -1, dtype=torch.long, device=template.device))
                continue
            pad = width - c.tokens.shape[1]
            tokens.append(torch.nn.functional.pad(c.tokens, (0, 0, 0, pad)))
            owners.append(torch.nn.functional.pad(c.image_of_token, (0, pad), value=-1))
            latest.append(c.latest[:, -1:])
        return cls(torch.cat(tokens), torch.cat(owners), torch.cat(latest), present[0].all_previous)

    def visible(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions ``start .. start + length - 1``: the attention mask [B, 1, length, K] (True: may
        read that image token) and which positions see any image at all [B, length]."""
        latest = self.latest[:, start : start + length]
        if latest.shape[1] < length:  # decode steps: after every marker of the row
            latest = torch.cat([latest, self.latest[:, -1:].expand(-1, length - latest.shape[1])], dim=1)
        owner, latest = self.image_of_token[:, None, :], latest[:, :, None]
        mask = (owner >= 0) & ((owner <= latest) if self.all_previous else (owner == latest))
        sees = latest[..., 0] >= 0
        # A position that sees nothing may attend everywhere, so the softmax stays finite (no NaN in the
        # forward or the backward); its result is discarded by the block.
        return (mask | ~sees[..., None])[:, None], sees


class CrossAttention(nn.Module):
    """Multi-head attention from text hidden states (queries) to image tokens (keys and values)."""

    def __init__(self, dim: int, image_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(image_dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(image_dim, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], images [B, K, D_img], mask [B, 1, L, K] (True: may attend) -> [B, L, D]."""
        b, n, _ = x.shape
        heads = lambda t: t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = attention(heads(self.q_proj(x)), heads(self.k_proj(images)), heads(self.v_proj(images)), mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block, run on a layer's input before the LM block.

    A layer adapter (see `LayerContext`): called with the hidden states, the `ImageContext` and the
    sequence index of the first given position.
    """

    def __init__(self, cfg: LanguageConfig, image_dim: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = CrossAttention(cfg.hidden_size, image_dim or cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the LM starts unchanged
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, images: ImageContext, start: int = 0) -> torch.Tensor:
        mask, sees = images.visible(start, hidden.shape[1])
        x = hidden + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(hidden), images.tokens, mask)
        x = x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))
        return torch.where(sees[..., None], x, hidden)  # positions before any image: exactly unchanged
