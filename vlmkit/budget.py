"""Token-budget arithmetic: how many visual tokens an image (or its AnyRes tiles, or a clip of frames)
costs the LM, and what they cost in KV cache and attention. Pure integer arithmetic on a few
settings, so a design can be sized before anything is built (`vlmkit tokens`); `TokenSpec.from_model_config`
reads those settings from a model config, and the tests check the counts against real models'
`image_token_count`.

    tokens per image (one resized square)   P = connector tokens of the patch grid
                                            (336 px / patch 14: a 24 x 24 grid, 576 tokens; 672 px: 2,304)
    tokens per image (AnyRes)               N tiles of P_t tokens + a P_0 thumbnail, before unpadding;
                                            exactly: P_0 + rows x (cols + 1) of the unpadded grid
    frames that fit a budget of B tokens    f_max = floor(B / P)
    KV cache (per sequence)                 2 (K and V) x layers x kv heads x head dim x tokens x bytes
    attention cost                          grows as tokens^2 (4x the tokens: 16x the cost)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlmkit.anyres import anyres_token_count, check_grid_pinpoints, select_best_resolution
from vlmkit.config import ModelConfig

GRID_CONNECTORS = ("linear", "mlp2x_gelu", "pixel_shuffle", "c_abstractor")  # tokens keep a rows x cols layout
QUERY_CONNECTORS = ("perceiver", "qformer")  # K learned queries, whatever the grid
CONNECTORS = GRID_CONNECTORS + QUERY_CONNECTORS


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


@dataclass(frozen=True)
class TokenSpec:
    """What decides an image's token count: the patch size, the connector (and its downsample or K
    queries), a CLS token passed on, the fusion, AnyRes tiling (grid pinpoints and tile side) and token
    merging in the tower."""

    patch_size: int
    connector: str = "mlp2x_gelu"
    downsample: int = 2  # pixel_shuffle
    queries: int = 64  # perceiver, qformer, c_abstractor (a square for c_abstractor)
    prefix_tokens: int = 0  # a CLS token kept by the connector
    fusion: str = "splice"  # cross_attention: one placeholder per image in the sequence
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    base: int | None = None  # AnyRes tile side (px)
    token_merging: int = 0  # ToMe: tokens merged away per tower block (see models/token_merging.py)
    merging_blocks: int = 0  # the tower blocks that run (each merges), up to the selected layer
    tower_prefix: int = 0  # tower tokens never merged (a CLS token), passed on or not

    def __post_init__(self) -> None:
        if self.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {self.connector!r}; choose one of {list(CONNECTORS)}")
        if self.connector == "c_abstractor" and round(self.queries**0.5) ** 2 != self.queries:
            raise ValueError(f"c_abstractor pools to a sqrt(K) x sqrt(K) grid: K={self.queries} is not a square")
        if self.grid_pinpoints is not None:
            if self.base is None:
                raise ValueError("AnyRes needs the tile side (base)")
            if self.connector in QUERY_CONNECTORS or self.prefix_tokens:
                raise ValueError("AnyRes joins the tiles' token grids: it needs a grid connector "
                                 f"({', '.join(GRID_CONNECTORS)}) and no CLS token")
            object.__setattr__(self, "grid_pinpoints", tuple(check_grid_pinpoints(self.grid_pinpoints, self.base)))
        if self.token_merging and (self.anyres or self.connector in ("pixel_shuffle", "c_abstractor")):
            raise ValueError("token merging leaves no patch grid: it needs a connector that takes any number of "
                             "tokens (linear, mlp2x_gelu, perceiver, qformer) and no AnyRes")

    @classmethod
    def from_model_config(cls, cfg: Any) -> TokenSpec:
        """The spec of a `ModelConfig` (or its dict, as in a model directory's config.json)."""
        if isinstance(cfg, dict):
            cfg = ModelConfig.from_dict(cfg)
        anyres = cfg.image.anyres
        return cls(patch_size=cfg.vision.patch_size, connector=cfg.connector.name,
                   downsample=cfg.connector.downsample, queries=cfg.connector.num_queries,
                   prefix_tokens=1 if cfg.vision.use_cls_token and cfg.vision.keep_cls else 0, fusion=cfg.fusion,
                   grid_pinpoints=None if anyres is None else tuple(map(tuple, anyres.grid_pinpoints)),
                   base=None if anyres is None else anyres.base, token_merging=cfg.vision.token_merging.r,
                   merging_blocks=cfg.vision.num_selected_blocks, tower_prefix=1 if cfg.vision.use_cls_token else 0)

    @property
    def anyres(self) -> bool:
        return self.grid_pinpoints is not None

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """Rows x cols of the connector's tokens for a patch grid (None: learned queries, no layout)."""
        if self.connector == "pixel_shuffle":
            if grid[0] % self.downsample or grid[1] % self.downsample:
                raise ValueError(f"pixel_shuffle: patch grid {grid[0]}x{grid[1]} is not divisible by downsample "
                                 f"{self.downsample}")
            return grid[0] // self.downsample, grid[1] // self.downsample
        if self.connector == "c_abstractor":
            side = round(self.queries**0.5)
            return side, side
        return None if self.connector in QUERY_CONNECTORS else grid

    def connector_tokens(self, height: int, width: int) -> int:
        """Tokens the connector emits for one `height` x `width` image given to the tower."""
        grid = self.token_grid(patch_grid(height, width, self.patch_size))
        if grid is None:
            return self.queries
        patches = grid[0] * grid[1]
        if self.token_merging:  # imported here: only merging needs the models package (and torch)
            from vlmkit.models.token_merging import merged_token_count

            prefix = self.tower_prefix
            patches = merged_token_count(patches + prefix, self.token_merging, self.merging_blocks, prefix) - prefix
        return self.prefix_tokens + patches

    @property
    def tile_tokens(self) -> tuple[int, int]:
        """AnyRes: the (rows, cols) of tokens one tile (or the thumbnail) becomes."""
        return self.token_grid(patch_grid(self.base, self.base, self.patch_size))

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens the connector emits for an image: a preprocessed `height` x `width` one, or with AnyRes an
        original one (its tiles unpadded, newlines included)."""
        if self.anyres:
            return anyres_token_count((height, width), self.grid_pinpoints, self.base, self.tile_tokens)
        return self.connector_tokens(height, width)

    def placeholders(self, height: int, width: int) -> int:
        """Positions an image takes in the LM's sequence (cross_attention fusion: one per image)."""
        return 1 if self.fusion == "cross_attention" else self.image_tokens(height, width)

    def anyres_bound(self, pinpoint: Sequence[int]) -> dict[str, int]:
        """For one grid pinpoint: N tiles of P_t tokens plus a P_0 thumbnail, and the newlines that end the
        grid's token rows: the most an image choosing this pinpoint costs (unpadding only removes tokens)."""
        th, tw = self.tile_tokens
        rows, cols = pinpoint[0] // self.base, pinpoint[1] // self.base
        tiles, per_tile = rows * cols, th * tw
        return {"tiles": tiles, "tile_tokens": per_tile, "thumbnail_tokens": per_tile,
                "tiles_and_thumbnail": tiles * per_tile + per_tile, "newlines": rows * th,
                "max_tokens": tiles * per_tile + per_tile + rows * th}

    def chosen_pinpoint(self, height: int, width: int) -> tuple[int, int]:
        return select_best_resolution((height, width), self.grid_pinpoints)


def kv_cache_bytes(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int = 2,
                   batch: int = 1) -> int:
    """Keys and values of `tokens` positions in every layer (bf16: 2 bytes a value)."""
    return 2 * num_layers * num_kv_heads * head_dim * tokens * bytes_per_value * batch


def attention_cost(tokens: int) -> int:
    """Query-key pairs of full self-attention over `tokens` positions (relative cost: compare two of these)."""
    return tokens * tokens


def max_frames(budget: int, tokens_per_frame: int) -> int:
    """f_max = floor(B / P): frames of `tokens_per_frame` tokens that fit `budget` tokens."""
    if tokens_per_frame < 1:
        raise ValueError(f"tokens per frame must be >= 1, got {tokens_per_frame}")
    return max(0, budget) // tokens_per_frame


def format_bytes(n: float) -> str:
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
