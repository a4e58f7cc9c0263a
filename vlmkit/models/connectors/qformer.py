"""BLIP-2's Q-Former: K learned queries read the image through cross-attention, giving K tokens per image.

However many patches the tower gives (a larger image, a finer grid, AnyRes tiles), the LM sees K
tokens, and the queries can be pretrained against a frozen tower on image-text pairs before any LM is
involved (the `qformer` training stage). Layers are BERT's (post-LayerNorm): self-attention among
the queries, cross-attention to the image features every `cross_attention_frequency` layers, a
feed-forward layer. A text path (token embeddings are the caller's) shares the self-attention with
the queries and has its own feed-forward layers, as in BLIP-2; a VLM's connector is built without it.

Numerically the query path is transformers' `Blip2QFormerModel` (weights map with
`vlmkit.hf.hub.qformer_state_dict_from_hf`); BLIP-2's `language_projection` is `projection` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.attention import attention
from vlmkit.models.connectors.base import Connector

LAYER_NORM_EPS = 1e-12  # BERT's, kept by BLIP-2
FFN_RATIO = 4  # feed-forward width / hidden size (BERT, BLIP-2)


class Attention(nn.Module):
    """Multi-head attention inside BERT's post-norm residual: ``norm(x + out(attend(x, context)))``.

    Self-attention without `context`; cross-attention to `context` (of width `context_dim`) with it.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(context_dim or dim, dim)
        self.v_proj = nn.Linear(context_dim or dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        out = attention(heads(self.q_proj(x)), heads(self.k_proj(source)), heads(self.v_proj(source)), mask)
        return self.norm(x + self.out_proj(out.transpose(1, 2).flatten(2)))


class FeedForward(nn.Module):
    """BERT's feed-forward sublayer: ``norm(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, FFN_RATIO * dim)
        self.fc2 = nn.Linear(FFN_RATIO * dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], then cross-attention (queries only, on some layers) and
    separate feed-forward layers for the queries and the text."""

    def __init__(self, dim: int, num_heads: int, vision_dim: int, cross_attention: bool, text: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.cross_attn = Attention(dim, num_heads, vision_dim) if cross_attention else None
        self.query_ffn = FeedForward(dim)
        self.text_ffn = FeedForward(dim) if text else None

    def forward(self, x: torch.Tensor, num_queries: int, features: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, features)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormer(nn.Module):
    """The learned queries, the embedding LayerNorm and the layers (without the projection to the LM)."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, text: bool = False):
        super().__init__()
        dim = cfg.hidden_size or vision_dim  # default: as wide as the tower it reads
        for name in ("num_queries", "num_layers", "num_heads", "cross_attention_frequency"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"connector.{name} must be >= 1 for the qformer connector, got {getattr(cfg, name)}")
        if dim % cfg.num_heads:
            raise ConfigError(f"connector.hidden_size {dim} (the qformer's width) is not divisible by "
                              f"connector.num_heads {cfg.num_heads}")
        self.hidden_size, self.num_queries, self.has_text = dim, cfg.num_queries, text
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, dim) * 0.02)  # BLIP-2's init
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # BERT's embedding norm, on queries and text alike
        self.layers = nn.ModuleList(
            QFormerLayer(dim, cfg.num_heads, vision_dim, i % cfg.cross_attention_frequency == 0, text)
            for i in range(cfg.num_layers))

    def forward(self, features: torch.Tensor | None, text_embeds: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, K + T, H]: the K queries first (only when image `features` [B, P, Dv] are
        given: they cross-attend to them), then the T text positions of `text_embeds` [B, T, H].

        `mask` (boolean, True = may attend, broadcastable to [B, heads, K + T, K + T]) shapes the
        self-attention: padding, or causal text for generation."""
        parts = []
        if features is not None:
            parts.append(self.queries.to(features.dtype).expand(features.shape[0], -1, -1))
        if text_embeds is not None:
            if not self.has_text:
                raise ValueError("this Q-Former was built without its text path (text=False)")
            parts.append(text_embeds)
        if not parts:
            raise ValueError("the Q-Former needs image features, text embeddings or both")
        x = self.norm(torch.cat(parts, dim=1))
        num_queries = self.num_queries if features is not None else 0
        for layer in self.layers:
            x = layer(x, num_queries, features, mask)
        return x

    def query_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the query path: what a VLM's `qformer` connector loads (the text path left out)."""
        return {k: v for k, v in self.state_dict().items() if ".text_ffn." not in k}


class QFormerConnector(Connector):
    """`qformer`: K = `num_queries` tokens per image whatever its grid, then a linear map to the LM's width.

    Reads every feature position the tower passes on (a CLS token with `vision.keep_cls` too, as BLIP-2).
    """

    has_token_grid = False

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        self.qformer = QFormer(cfg, vision_dim)
        self.projection = nn.Linear(self.qformer.hidden_size, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.qformer.num_queries

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        raise ValueError("the qformer connector's tokens have no grid layout")

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.projection(self.qformer(features))
