"""Connectors: map vision features [N, P, Dv] to LM-space image tokens [N, T, Dlm].

Each connector knows how many tokens it emits for a patch grid, so the chat format can expand one
`<image>` into exactly that many placeholders. Registry keys are the names used in configs.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig


class Connector(nn.Module):
    """Subclasses implement `project`; `forward` adds the optional grid embedding."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens  # CLS-like tokens before the patch grid
        self.grid_embedding = GridEmbedding(lm_dim) if cfg.grid_embedding else None

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_prefix_tokens + grid[0] * grid[1]

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Rows x columns of the image tokens emitted for a patch grid (prefix tokens aside)."""
        return grid

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        tokens = self.project(features, grid)
        if self.grid_embedding is None:
            return tokens
        rows, cols = self.token_grid(grid)
        prefix, cells = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        return torch.cat([prefix, cells + self.grid_embedding(rows, cols).to(cells.dtype)], dim=1)


class GridEmbedding(nn.Module):
    """Learned row + column embeddings added to the image tokens, in the LM's space.

    The LM sees the image tokens in raster order under 1-D positions, where a token's column is its
    index modulo the row length: hard to read for "left of" or "where is". A row and a column vector
    per token states it directly (factorised, so any grid up to `max_size` per side works).
    """

    def __init__(self, dim: int, max_size: int = 64):
        super().__init__()
        self.rows = nn.Parameter(torch.zeros(max_size, dim))
        self.cols = nn.Parameter(torch.zeros(max_size, dim))

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        if rows > len(self.rows) or cols > len(self.cols):
            raise ValueError(f"grid embedding: {rows}x{cols} tokens exceeds the {len(self.rows)} per side it has")
        return (self.rows[:rows, None] + self.cols[None, :cols]).reshape(rows * cols, -1)


class Linear(Connector):
    """LLaVA v1: one linear projection per patch."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        self.proj = nn.Linear(vision_dim, lm_dim)

    def project(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.proj(features)


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


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

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0):
        super().__init__(cfg, vision_dim, lm_dim, num_prefix_tokens)
        if num_prefix_tokens:
            raise ConfigError("connector pixel_shuffle works on the patch grid only: set vision.keep_cls: false")
        if cfg.downsample < 1:
            raise ConfigError(f"connector.downsample must be >= 1, got {cfg.downsample}")
        self.r = cfg.downsample
        self.mlp = mlp2x_gelu(vision_dim * self.r**2, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        rows, cols = self.token_grid(grid)
        return rows * cols

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


CONNECTORS: dict[str, type[Connector]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGELU,
    "pixel_shuffle": PixelShuffle,
}


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int = 0) -> Connector:
    if cfg.name not in CONNECTORS:
        raise ConfigError(f"connector.name: unknown connector {cfg.name!r}; choose one of {sorted(CONNECTORS)}")
    return CONNECTORS[cfg.name](cfg, vision_dim, lm_dim, num_prefix_tokens)
