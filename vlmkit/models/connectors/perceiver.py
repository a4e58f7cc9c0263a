"""`perceiver`: Flamingo's Perceiver Resampler, laid out as Idefics2 has it.

K learned latents read the image through a few cross-attention layers, so every image becomes K
tokens whatever its size: the LM's cost per image is fixed, and large or tiled images stay cheap.
The vision features are first projected into the LM's width (Idefics2's "modality projection"), so
the resampler runs at the LM's width and its output needs no further projection.

Each layer, as in Idefics2 (`transformers`' `Idefics2PerceiverResampler`, to which it is numerically
equal; `vlmkit.hf.hub` maps its weights):

    latents += attn(q = norm(latents), kv = concat[norm(context); norm(latents)])   (grouped kv heads)
    latents += swiglu(norm(latents))                                                 (4 x width)

then one final RMSNorm. Every position of the features is context, CLS-like prefix tokens included;
all are valid (no attention mask). The latents have no grid layout, so `grid_embedding` is refused
when the model is built: the tower's position embeddings already tell the latents where a patch is.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.attention import attention
from vlmkit.models.connectors.base import Connector
from vlmkit.models.language import MLP, RMSNorm


class PerceiverAttention(nn.Module):
    """Latents attend to the context and to themselves; k/v heads may be shared by groups of q heads."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, k, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(b, k, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.k_proj(both).view(b, both.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self.v_proj(both).view(b, both.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        out = attention(q, keys, values)
        return self.o_proj(out.transpose(1, 2).reshape(b, k, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.latents_norm = RMSNorm(dim, eps)
        self.context_norm = RMSNorm(dim, eps)
        self.attn = PerceiverAttention(dim, num_heads, num_kv_heads, head_dim)
        self.post_attention_norm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(self.latents_norm(latents), self.context_norm(context))
        return latents + self.mlp(self.post_attention_norm(latents))


class Perceiver(Connector):
    """Perceiver Resampler: `num_queries` latents, `num_layers` layers of `num_heads` heads
    (`num_kv_heads` k/v heads) over `hidden_size` attention width (default: the LM's width), after
    a SwiGLU projection of inner width `projection_size` (default 4 x the LM's width)."""

    has_token_grid = False

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        width = cfg.hidden_size or lm_dim
        num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        for key, value in (("num_queries", cfg.num_queries), ("num_layers", cfg.num_layers),
                           ("num_heads", cfg.num_heads), ("num_kv_heads", num_kv_heads)):
            if value < 1:
                raise ConfigError(f"connector.{key} must be >= 1 for the perceiver connector, got {value}")
        if width % cfg.num_heads:
            raise ConfigError(f"connector.hidden_size {width} (attention width) is not divisible by "
                              f"connector.num_heads {cfg.num_heads}")
        if cfg.num_heads % num_kv_heads:
            raise ConfigError(f"connector.num_heads {cfg.num_heads} is not a multiple of connector.num_kv_heads "
                              f"{num_kv_heads}")
        self.projection = MLP(vision_dim, cfg.projection_size or 4 * lm_dim, lm_dim)
        # Random, not Idefics2's all-ones init: identical latents would get identical updates forever.
        self.latents = nn.Parameter(torch.randn(cfg.num_queries, lm_dim))
        self.layers = nn.ModuleList(
            PerceiverLayer(lm_dim, cfg.num_heads, num_kv_heads, width // cfg.num_heads, cfg.rms_norm_eps)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(lm_dim, cfg.rms_norm_eps)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return len(self.latents)

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        raise ValueError("perceiver: its tokens are learned latents with no rows x columns layout")

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        context = self.projection(features)
        latents = self.latents.expand(len(features), -1, -1)  # under autocast the residual stays fp32
        for layer in self.layers:
            latents = layer(latents, context)
        return self.norm(latents)
