"""Vision Transformer with the options CLIP-ViT, SigLIP and DINOv2 checkpoints need."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.models.attention import attention
from vlmkit.models.kernels import joint_linear
from vlmkit.models.memory import run_block
from vlmkit.models.token_merging import bipartite_merge, merged_token_count

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """log2(patch_size) 3x3 stride-2 convs (BatchNorm + GELU), channels doubling up to hidden_size.

    With the 1x1 `proj` after it, it replaces the patchify conv (Xiao et al. 2021): same token grid,
    but local features first, which a small ViT otherwise has to learn from little data.
    """
    depth = cfg.patch_size.bit_length() - 1
    widths = [cfg.num_channels] + [max(8, cfg.hidden_size >> (depth - 1 - i)) for i in range(depth)]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*layers)


class PatchEmbedding(nn.Module):
    """Patchify conv (or a conv stem + 1x1 conv) + optional CLS token + learned position embeddings
    (bicubic-resized on demand)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        if cfg.stem == "conv":
            self.stem = conv_stem(cfg)
            stem_width = self.stem[-3].out_channels
            self.proj = nn.Conv2d(stem_width, cfg.hidden_size, 1, bias=cfg.patch_bias)
        else:
            self.stem = None
            self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                  bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02) if cfg.use_cls_token else None
        num_positions = cfg.native_grid_size**2 + (1 if cfg.use_cls_token else 0)
        self.position_embedding = nn.Parameter(torch.randn(num_positions, cfg.hidden_size) * 0.02)
        self.base_grid = cfg.native_grid_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels if self.stem is None else self.stem(pixels)).flatten(2).transpose(1, 2)  # [B, P, D]
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        pos = self.positions_for(grid)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return x + pos.to(x.dtype)

    def positions_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a (rows, cols) patch grid: bicubic (align_corners=False, in fp32)
        resampling of the stored grid, as transformers' DINOv2 does; the stored ones at the native size."""
        if grid == (self.base_grid, self.base_grid):
            return self.position_embedding
        n_prefix = 0 if self.cls_token is None else 1
        prefix, patches = self.position_embedding[:n_prefix], self.position_embedding[n_prefix:]
        dim = patches.shape[-1]
        patches = patches.reshape(1, self.base_grid, self.base_grid, dim).permute(0, 3, 1, 2)
        # Interpolate in fp32: bicubic resampling in half precision shifts the embeddings.
        patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
        patches = patches.to(prefix.dtype).permute(0, 2, 3, 1).reshape(-1, dim)
        return torch.cat([prefix, patches], dim=0)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output [B, N, D] and the keys averaged over heads [B, N, D / heads] (what token
        merging compares); `bias` [B, 1, 1, N] is added to the logits."""
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2)
                   for t in joint_linear(x, self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), k.mean(dim=1)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each optionally layer-scaled."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.ls1 = LayerScale(cfg.hidden_size, cfg.layerscale_init) if cfg.layerscale else nn.Identity()
        self.ls2 = LayerScale(cfg.hidden_size, cfg.layerscale_init) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, merge: TokenMerge | None = None) -> torch.Tensor:
        """With `merge`, attention is proportional to the tokens' sizes and `merge.r` tokens are merged
        between the attention and the MLP, as in ToMe."""
        h, keys = self.attn(self.norm1(x), None if merge is None else merge.attention_bias())
        x = x + self.ls1(h)
        if merge is not None:
            x = merge(x, keys)
        return x + self.ls2(self.mlp(self.norm2(x)))


class TokenMerge:
    """Token merging through one forward pass: `r` per block, and each token's size (the patches it
    stands for, [B, T] float32), which weights the averages and, with `proportional`, the attention."""

    def __init__(self, x: torch.Tensor, r: int, num_prefix: int, proportional: bool):
        self.r, self.num_prefix, self.proportional = r, num_prefix, proportional
        self.sizes = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        self.merged = False

    def attention_bias(self) -> torch.Tensor | None:
        """log(size) per key [B, 1, 1, T]; None before the first merge (every size is 1, the bias 0)."""
        return self.sizes.log()[:, None, None, :] if self.proportional and self.merged else None

    def __call__(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x, self.sizes = bipartite_merge(x, self.sizes, keys, self.r, self.num_prefix)
        self.merged = self.merged or x.shape[1] < keys.shape[1]
        return x


def _merging_block(block: Block, x: torch.Tensor, merge: TokenMerge) -> tuple[torch.Tensor, TokenMerge]:
    """`block(x, merge)` on a copy of the merge state, returned: the state given stays as it was, so that
    activation checkpointing, which runs the block again in the backward pass, replays the same merges."""
    merge = copy.copy(merge)
    return block(x, merge), merge


class ViT(nn.Module):
    """Vision Transformer.

    `forward` returns the features a VLM consumes: the hidden state at `select_layer` (index into
    [embeddings, block 1, ..., block N], as in HF `hidden_states`), passed through the final norm
    when `feature_norm`, without the CLS token unless `keep_cls`. Blocks after the selected layer
    are not run. `hidden_states` returns all of them.

    With `token_merging.r` > 0 (ToMe, see models/token_merging.py) each block merges r patch tokens,
    so the features are `num_feature_tokens(grid)` size-weighted averages in no grid order.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = PatchEmbedding(cfg)
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.post_layernorm else None
        self.activation_checkpointing = False  # recompute each block in the backward (see models/memory.py)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.config.use_cls_token else 0

    def grid_for(self, image_height: int, image_width: int) -> tuple[int, int]:
        p = self.config.patch_size
        if image_height % p or image_width % p:
            raise ValueError(f"image size {image_height}x{image_width} is not a multiple of the patch size {p}")
        return image_height // p, image_width // p

    def merged_patch_count(self, grid: tuple[int, int]) -> int:
        """Patch tokens left after the selected layer for a (rows, cols) patch grid: rows x cols, fewer
        with token merging (deterministic: each block merges min(r, (tokens - prefix) // 2))."""
        patches = grid[0] * grid[1]
        if not self.config.merges_tokens:
            return patches
        prefix = self.num_prefix_tokens
        return merged_token_count(patches + prefix, self.config.token_merging.r, self.config.num_selected_blocks,
                                  prefix) - prefix

    def num_feature_tokens(self, grid: tuple[int, int]) -> int:
        """Positions `forward` returns for a (rows, cols) patch grid: the (merged) patches, + CLS with keep_cls."""
        return self.merged_patch_count(grid) + (self.num_prefix_tokens if self.config.keep_cls else 0)

    def _run(self, pixels: torch.Tensor, num_blocks: int | None) -> tuple[list[torch.Tensor], TokenMerge | None]:
        self.grid_for(pixels.shape[-2], pixels.shape[-1])
        x = self.embeddings(pixels)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        tome = self.config.token_merging
        merge = TokenMerge(x, tome.r, self.num_prefix_tokens, tome.proportional_attention) if tome.r else None
        states = [x]
        for block in self.blocks[: len(self.blocks) if num_blocks is None else num_blocks]:
            if merge is None:
                x = run_block(self, block, x)
            else:
                x, merge = run_block(self, _merging_block, block, x, merge)
            states.append(x)
        return states, merge

    def hidden_states(self, pixels: torch.Tensor, num_blocks: int | None = None) -> list[torch.Tensor]:
        """[embeddings, output of block 1, ..., output of block `num_blocks`] (default: all blocks); with
        token merging each block's output is shorter than its input."""
        return self._run(pixels, num_blocks)[0]

    def features_and_sizes(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`'s features and, with token merging, each position's size [B, T] (the patches it
        stands for; a CLS token has size 1); None without merging (every size is 1)."""
        states, merge = self._run(pixels, self.config.num_selected_blocks)
        features = states[-1]
        if self.config.feature_norm:
            features = self.post_layernorm(features)
        sizes = None if merge is None else merge.sizes
        if not self.config.keep_cls:
            features = features[:, self.num_prefix_tokens :]
            sizes = None if sizes is None else sizes[:, self.num_prefix_tokens :]
        return features, sizes

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features_and_sizes(pixels)[0]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """One vector per image from the last layer (CLS if present, else the mean over patches, weighted
        by size under token merging), post-normalised."""
        states, merge = self._run(pixels, None)
        last = states[-1]
        if self.config.use_cls_token:
            pooled = last[:, 0]
        elif merge is None:
            pooled = last.mean(dim=1)
        else:
            pooled = (last * merge.sizes[..., None]).sum(dim=1) / merge.sizes.sum(dim=1, keepdim=True)
        return self.post_layernorm(pooled) if self.post_layernorm is not None else pooled
