"""AnyRes packing (LLaVA-NeXT's ``spatial_unpad``): an image's tile tokens -> one sequence for the LM.

The tower and connector see an image as tiles (the thumbnail, then a rows x cols grid; see
`vlmkit.anyres`), each becoming a th x tw grid of tokens. `AnyResPacking` joins the grid tiles' tokens
into one (rows * th) x (cols * tw) grid, drops the rows or columns that show only padding, ends every
remaining row with a learned `image_newline` embedding (so the LM can tell where a row ends; the grid's
width changes from image to image) and puts the thumbnail's tokens first. As transformers'
`LlavaNextModel.pack_image_features`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vlmkit.anyres import anyres_token_count, num_tiles, tile_grid, unpadded_region
from vlmkit.config import AnyResConfig


class AnyResPacking(nn.Module):
    def __init__(self, cfg: AnyResConfig, lm_dim: int):
        super().__init__()
        self.grid_pinpoints = [tuple(p) for p in cfg.grid_pinpoints]
        self.base = cfg.base
        # Scaled like a token embedding (transformers starts it the same way).
        self.image_newline = nn.Parameter(torch.randn(lm_dim) / math.sqrt(lm_dim))

    def num_tiles(self, size: Sequence[int]) -> int:
        """Tiles (thumbnail included) an image of original (height, width) `size` is cut into."""
        return num_tiles(size, self.grid_pinpoints, self.base)

    def token_count(self, size: Sequence[int], tile_tokens: tuple[int, int]) -> int:
        """Tokens of an image of original `size` when each tile becomes a `tile_tokens` (th, tw) grid."""
        return anyres_token_count(size, self.grid_pinpoints, self.base, tile_tokens)

    def forward(self, tokens: torch.Tensor, sizes: Sequence[Sequence[int]],
                tile_tokens: tuple[int, int]) -> list[torch.Tensor]:
        """`tokens` [n_tiles, th * tw, D]: the tiles of every image in order (each image's thumbnail
        first); `sizes`: each image's original (height, width) -> one [T_i, D] per image."""
        th, tw = tile_tokens
        counts = [self.num_tiles(size) for size in sizes]
        if sum(counts) != len(tokens) or tokens.shape[1] != th * tw:
            raise ValueError(f"AnyRes: images of sizes {[tuple(s) for s in sizes]} make {sum(counts)} tiles of "
                             f"{th * tw} tokens, but {tuple(tokens.shape[:2])} were given")
        out = []
        for size, image in zip(sizes, tokens.split(counts)):
            rows, cols = tile_grid(size, self.grid_pinpoints, self.base)
            d = image.shape[-1]
            grid = image[1:].reshape(rows, cols, th, tw, d).permute(0, 2, 1, 3, 4).reshape(rows * th, cols * tw, d)
            top, bottom, left, right = unpadded_region(size, (rows * th, cols * tw))
            grid = grid[top:bottom, left:right]
            newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, d)
            out.append(torch.cat([image[0], torch.cat([grid, newline], dim=1).reshape(-1, d)]))
        return out
