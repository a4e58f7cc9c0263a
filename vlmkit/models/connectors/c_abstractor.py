"""`c_abstractor`: Honeybee's C-Abstractor (Cha et al., 2024), a convolutional resampler.

Like the perceiver it gives a fixed K tokens per image, but by convolution and pooling rather than
learned queries, so each token still stands for a region of the image (locality) and the tokens
keep a sqrt(K) x sqrt(K) layout (the grid embedding applies to them):

    patch grid [N, Dv, H, W] -> num_layers residual blocks -> adaptive average pool to sqrt(K) x sqrt(K)
                             -> num_layers residual blocks -> per-token MLP (mlp2x_gelu) into the LM

The blocks are RegNet-style bottlenecks (see `ResidualBlock`) without Honeybee's squeeze-excitation.
Any grid works, not square ones only; a grid smaller than sqrt(K) per side is pooled up by repeating
cells. Only the patch grid is read: CLS-like prefix tokens are refused (`vision.keep_cls: false`), as
they have no place in the grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.connectors.base import Connector, mlp2x_gelu


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [N, C, H, W] map (the "LayerNorm2d" Honeybee's blocks use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualBlock(nn.Module):
    """RegNet-style bottleneck: 1x1 conv -> 3x3 depthwise conv -> 1x1 conv, a channel norm after each
    and SiLU after the first two; then the input is added (through a 1x1 conv + norm when the width
    changes) and SiLU applied. The 3x3 conv mixes each patch with its neighbours before pooling."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(in_dim, dim, 1, bias=False), ChannelNorm(dim)
        self.conv2, self.norm2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), ChannelNorm(dim)
        self.conv3, self.norm3 = nn.Conv2d(dim, dim, 1, bias=False), ChannelNorm(dim)
        self.shortcut = (nn.Identity() if in_dim == dim else
                         nn.Sequential(nn.Conv2d(in_dim, dim, 1, bias=False), ChannelNorm(dim)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.act(self.norm2(self.conv2(h)))
        return self.act(self.norm3(self.conv3(h)) + self.shortcut(x))


def _stage(num_blocks: int, in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(in_dim if i == 0 else dim, dim) for i in range(num_blocks)))


class CAbstractor(Connector):
    """K = `num_queries` tokens (a perfect square) from `num_layers` blocks before and after pooling, at
    `hidden_size` channels (default: the tower's width)."""

    grid_only = True

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        self.side = math.isqrt(max(cfg.num_queries, 0))
        if cfg.num_queries < 1 or self.side**2 != cfg.num_queries:
            near = max(self.side, 1)
            raise ConfigError(f"connector.num_queries must be a perfect square for c_abstractor (it pools to a "
                              f"sqrt(K) x sqrt(K) grid), got {cfg.num_queries}; e.g. {near**2} or {(near + 1)**2}")
        if cfg.num_layers < 0:
            raise ConfigError(f"connector.num_layers must be >= 0 for c_abstractor, got {cfg.num_layers}")
        width = (cfg.hidden_size or vision_dim) if cfg.num_layers else vision_dim
        self.before = _stage(cfg.num_layers, vision_dim, width)
        self.pool = nn.AdaptiveAvgPool2d(self.side)
        self.after = _stage(cfg.num_layers, width, width)
        self.readout = mlp2x_gelu(width, lm_dim)

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return self.side, self.side

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, positions, dim = features.shape
        rows, cols = grid
        if positions != rows * cols:
            raise ValueError(f"c_abstractor: {positions} feature positions do not form the {rows}x{cols} patch grid")
        x = features.transpose(1, 2).reshape(n, dim, rows, cols)
        x = self.after(self.pool(self.before(x)))
        return self.readout(x.flatten(2).transpose(1, 2))
