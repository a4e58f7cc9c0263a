"""Per-patch projectors: LLaVA's `linear` and `mlp2x_gelu`, and `pixel_shuffle` (space-to-depth + MLP)."""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig
from vlmkit.models.connectors.base import Connector, mlp2x_gelu


class Linear(Connector):
    """LLaVA v1: one linear projection per patch."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        self.proj = nn.Linear(vision_dim, lm_dim)

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(features)


class MLP2xGELU(Connector):
    """LLaVA-1.5: Linear -> GELU -> Linear per patch."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        self.mlp = mlp2x_gelu(vision_dim, lm_dim)

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.mlp(features)


class PixelShuffle(Connector):
    """Space-to-depth: each r x r block of patches becomes one token of r²·Dv channels, then an MLP.

    r² fewer image tokens for the LM (Idefics3 / SmolVLM style), at no loss of information.
    """

    grid_only = True

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        if cfg.downsample < 1:
            raise ConfigError(f"connector.downsample must be >= 1, got {cfg.downsample}")
        self.r = cfg.downsample
        self.mlp = mlp2x_gelu(vision_dim * self.r**2, lm_dim)

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        self._check(grid)
        return grid[0] // self.r, grid[1] // self.r

    def _check(self, grid: tuple[int, int]) -> None:
        if grid[0] % self.r or grid[1] % self.r:
            raise ValueError(f"pixel_shuffle: patch grid {grid[0]}x{grid[1]} is not divisible by downsample {self.r}")

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        self._check(grid)
        n, _, d = features.shape
        (h, w), r = grid, self.r
        x = features.reshape(n, h // r, r, w // r, r, d).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(x.reshape(n, (h // r) * (w // r), r * r * d))
