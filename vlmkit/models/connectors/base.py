"""The connector base class: a connector maps vision features [N, P, Dv] to LM-space image tokens [N, T, Dlm].

Each connector knows how many tokens it emits for a patch grid (`num_tokens`), so the chat format can
expand one `<image>` into exactly that many placeholders, and implements `project`; `forward` adds the
optional grid embedding to the tokens that keep the grid's layout (`token_grid`).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmkit.config import ConfigError, ConnectorConfig


class Connector(nn.Module):
    """Subclasses implement `project`; `forward` adds the optional grid embedding.

    Two class attributes say what a connector can take, so a config it cannot honour fails when the
    model is built, with the setting to change, rather than deep inside a forward pass.
    """

    # Works on the patch grid alone: CLS-like prefix tokens are refused, and so is token merging
    # (vision.token_merging), whose merged tokens form no grid.
    grid_only = False
    has_token_grid = True  # its tokens keep a rows x columns layout, so the grid embedding applies

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, num_prefix_tokens: int):
        super().__init__()
        if num_prefix_tokens and self.grid_only:
            raise ConfigError(f"connector {cfg.name} works on the patch grid only: set vision.keep_cls: false")
        if cfg.grid_embedding and not self.has_token_grid:
            raise ConfigError(f"connector.grid_embedding: the {cfg.name} connector's tokens have no grid layout "
                              "to embed; set grid_embedding: false")
        self.num_prefix_tokens = num_prefix_tokens  # CLS-like tokens before the patch grid
        self.grid_embedding = GridEmbedding(lm_dim) if cfg.grid_embedding else None

    def num_tokens(self, grid: tuple[int, int]) -> int:
        rows, cols = self.token_grid(grid)
        return self.num_prefix_tokens + rows * cols

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


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
